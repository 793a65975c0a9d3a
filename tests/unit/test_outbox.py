"""Outbox routing (cdc/core/outbox.py): a decoded outbox INSERT becomes the message of the contract.

docs/contract.md, "Message" and "Parking": body = payload as PostgreSQL prints it,
message_id = id, routing key = event_type, timestamp = created_at, headers = the row's
``headers`` object, then aggregate_type, aggregate_id, commit_lsn, commit_time, created_at
(the relay's keys win). Malformed rows become ``Malformed`` with a reason and the row kept.
"""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.core.lsn import parse_lsn
from cdc.core.outbox import Malformed, OutboxColumns, OutboxEvent, route, route_snapshot
from cdc.wire.pgoutput import BinaryValue, Column, Relation

# Type OIDs as pg_type has them.
UUID, VARCHAR, TEXT, INT4, JSONB, TIMESTAMPTZ, INT8 = 2950, 1043, 25, 23, 3802, 1184, 20

#: The seed's legacy table (event_outbox as the platform's services write it today).
LEGACY = [
    ("id", UUID, -1, 1),
    ("aggregate_type", VARCHAR, 104, 0),
    ("aggregate_id", VARCHAR, 259, 0),
    ("event_type", VARCHAR, 259, 0),
    ("payload", JSONB, -1, 0),
    ("status", VARCHAR, 24, 0),
    ("retry_count", INT4, -1, 0),
    ("error_message", TEXT, -1, 0),
    ("last_error_at", TIMESTAMPTZ, -1, 0),
    ("published_at", TIMESTAMPTZ, -1, 0),
    ("created_at", TIMESTAMPTZ, -1, 0),
]
#: cdc/sql/001_outbox_table.sql: the same plus ``headers`` jsonb after payload.
WITH_HEADERS = [*LEGACY[:5], ("headers", JSONB, -1, 0), *LEGACY[5:]]
#: The relay's columns first, legacy ones scattered, in another order.
SHUFFLED = [LEGACY[i] for i in (10, 5, 3, 0, 7, 4, 2, 9, 1, 6, 8)] + [("headers", JSONB, -1, 0)]
#: After ``ALTER TABLE event_outbox ADD COLUMN tenant_id bigint``.
ADDED = [*WITH_HEADERS, ("tenant_id", INT8, -1, 0)]
#: The relay's required columns only.
MINIMAL = [("id", UUID, -1, 1), ("event_type", TEXT, -1, 0), ("payload", JSONB, -1, 0)]

COMMIT_LSN = parse_lsn("0/16B3748")
COMMIT_TIME = datetime(2026, 12, 2, 18, 35, 58, 4321, tzinfo=UTC)

ROW = {
    "id": "7c3f2a1e-8d4b-4e1a-9f0c-2b6d5e8a9c01",
    "aggregate_type": "device",
    "aggregate_id": "dev-42",
    "event_type": "device.started",
    "payload": '{"deviceId": "dev-42", "userId": "u-7", "startedAt": "2026-12-02T18:35:57Z"}',
    "headers": None,
    "status": "pending",
    "retry_count": "0",
    "error_message": None,
    "last_error_at": None,
    "published_at": None,
    "created_at": "2026-12-02 18:35:57.123456+00",
    "tenant_id": "17",
}


def relation(columns, oid: int = 16390) -> Relation:
    return Relation(
        xid=None,
        oid=oid,
        namespace="public",
        name="event_outbox",
        replica_identity="d",
        columns=tuple(Column(flags, name, type_oid, mod) for name, type_oid, mod, flags in columns),
    )


def tuple_for(rel: Relation, values: dict):
    """The tuple pgoutput sends: text form bytes in the relation's column order."""
    out = []
    for col in rel.columns:
        value = values.get(col.name)
        out.append(value.encode() if isinstance(value, str) else value)
    return tuple(out)


def run(columns, **changes):
    rel = relation(columns)
    values = {**ROW, **changes}
    return route(
        OutboxColumns.of(rel),
        tuple_for(rel, values),
        commit_lsn=COMMIT_LSN,
        commit_time=COMMIT_TIME,
    )


LAYOUTS = pytest.mark.parametrize(
    "columns",
    [LEGACY, WITH_HEADERS, SHUFFLED, ADDED],
    ids=["legacy", "with-headers", "shuffled", "added-column"],
)


# -- OutboxColumns ---------------------------------------------------------------------------------


@LAYOUTS
def test_layout_finds_columns_by_name_whatever_the_order(columns):
    layout = OutboxColumns.of(relation(columns))
    names = [c[0] for c in columns]
    for name in ("id", "event_type", "payload", "aggregate_type", "aggregate_id", "created_at"):
        assert layout.index[name] == names.index(name)
    assert ("headers" in layout.index) == ("headers" in names)
    assert layout.missing == ()
    # Legacy and unknown columns are not part of the layout.
    assert not {"status", "retry_count", "tenant_id"} & set(layout.index)


@pytest.mark.parametrize(
    ("drop", "missing"),
    [
        ({"id"}, ("id",)),
        ({"payload"}, ("payload",)),
        ({"event_type", "id"}, ("id", "event_type")),
        ({"id", "event_type", "payload"}, ("id", "event_type", "payload")),
    ],
)
def test_layout_reports_missing_required_columns(drop, missing):
    layout = OutboxColumns.of(relation([c for c in LEGACY if c[0] not in drop]))
    assert layout.missing == missing


# -- the happy path --------------------------------------------------------------------------


@LAYOUTS
def test_row_becomes_the_contract_message(columns):
    event = run(columns)
    assert isinstance(event, OutboxEvent)
    assert event.message_id == ROW["id"]
    assert event.routing_key == "device.started"
    assert event.body == ROW["payload"].encode()
    assert event.timestamp == datetime(2026, 12, 2, 18, 35, 57, 123456, tzinfo=UTC)
    assert event.headers == {
        "aggregate_type": "device",
        "aggregate_id": "dev-42",
        "commit_lsn": "0/16B3748",
        "commit_time": "2026-12-02T18:35:58.004321+00:00",
        "created_at": "2026-12-02T18:35:57.123456+00:00",
    }


def test_minimal_table_has_null_aggregate_headers_and_no_timestamp():
    event = run(MINIMAL)
    assert isinstance(event, OutboxEvent)
    assert event.timestamp is None
    assert event.headers["aggregate_type"] is None
    assert event.headers["aggregate_id"] is None
    assert event.headers["created_at"] is None
    assert event.headers["commit_lsn"] == "0/16B3748"


@pytest.mark.parametrize(
    ("lsn", "text"),
    [(0, "0/0"), (parse_lsn("16/B374D848"), "16/B374D848"), ((1 << 64) - 1, "FFFFFFFF/FFFFFFFF")],
)
def test_commit_lsn_header_is_postgres_text(lsn, text):
    rel = relation(LEGACY)
    columns = OutboxColumns.of(rel)
    event = route(columns, tuple_for(rel, ROW), commit_lsn=lsn, commit_time=COMMIT_TIME)
    assert event.headers["commit_lsn"] == text


@pytest.mark.parametrize(
    ("created_at", "timestamp", "header"),
    [
        (
            "2026-12-02 18:35:57.123456+00",
            datetime(2026, 12, 2, 18, 35, 57, 123456, tzinfo=UTC),
            "2026-12-02T18:35:57.123456+00:00",
        ),
        (
            # PostgreSQL trims trailing zeros of the fraction.
            "2026-12-02 18:35:57.12+00",
            datetime(2026, 12, 2, 18, 35, 57, 120000, tzinfo=UTC),
            "2026-12-02T18:35:57.120000+00:00",
        ),
        (
            # A session TimeZone other than UTC: same instant, offset kept.
            "2026-12-03 00:05:57.5+05:30",
            datetime(2026, 12, 2, 18, 35, 57, 500000, tzinfo=UTC),
            "2026-12-03T00:05:57.500000+05:30",
        ),
        (
            "2026-12-02 13:35:57.000001-05",
            datetime(2026, 12, 2, 18, 35, 57, 1, tzinfo=UTC),
            "2026-12-02T13:35:57.000001-05:00",
        ),
    ],
    ids=["utc", "short-fraction", "plus-0530", "minus-05"],
)
def test_created_at_becomes_timestamp_and_iso_header(created_at, timestamp, header):
    event = run(LEGACY, created_at=created_at)
    assert isinstance(event, OutboxEvent)
    assert event.timestamp == timestamp
    assert event.timestamp.tzinfo is not None
    assert event.headers["created_at"] == header
    assert datetime.fromisoformat(event.headers["created_at"]) == timestamp


def test_created_at_on_a_whole_second_still_carries_microseconds():
    """Contract: created_at header is "ISO 8601 text, microseconds".

    PostgreSQL prints a whole-second timestamptz without a fraction; the header should still
    have the fixed microsecond form, like every other row's (consumers parse one format).
    """
    event = run(LEGACY, created_at="2026-12-02 18:35:57+00")
    assert isinstance(event, OutboxEvent)
    assert event.timestamp == datetime(2026, 12, 2, 18, 35, 57, tzinfo=UTC)
    assert event.headers["created_at"] == "2026-12-02T18:35:57.000000+00:00"


def _postgres_text(when: datetime) -> str:
    """A UTC timestamptz as the relay's session prints it (no trailing zeros in the fraction)."""
    text = f"{when.year:04d}-{when:%m-%d %H:%M:%S}"
    fraction = f"{when.microsecond:06d}".rstrip("0")
    return f"{text}.{fraction}+00" if fraction else f"{text}+00"


@given(
    st.datetimes(
        min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31), timezones=st.just(UTC)
    )
)
def test_created_at_header_is_the_iso_form_of_the_parsed_time(when):
    # The header is built from the text for speed; it must equal the datetime's own format.
    event = run(LEGACY, created_at=_postgres_text(when))
    assert isinstance(event, OutboxEvent)
    assert event.headers["created_at"] == when.isoformat(timespec="microseconds")


@pytest.mark.parametrize("created_at", ["infinity", "-infinity", "0044-03-15 12:00:00+00 BC"])
def test_unrepresentable_created_at_keeps_the_text_and_skips_the_timestamp(created_at):
    event = run(LEGACY, created_at=created_at)
    assert isinstance(event, OutboxEvent)
    assert event.timestamp is None
    assert event.headers["created_at"] == created_at


def test_created_at_before_1970_keeps_the_header_and_skips_the_timestamp():
    # AMQP timestamps are unsigned: the property is left out, the header still has the time.
    event = run(LEGACY, created_at="1969-12-31 23:59:59.5+00")
    assert isinstance(event, OutboxEvent)
    assert event.timestamp is None
    assert event.headers["created_at"] == "1969-12-31T23:59:59.500000+00:00"
    at_epoch = run(LEGACY, created_at="1970-01-01 00:00:00+00")
    assert isinstance(at_epoch, OutboxEvent)
    assert at_epoch.timestamp == datetime(1970, 1, 1, tzinfo=UTC)


def test_id_longer_than_a_message_id_can_hold_is_malformed():
    rel = relation(MINIMAL)
    row = {"id": "i" * 256, "event_type": "device.started", "payload": "{}"}
    bad = route(OutboxColumns.of(rel), tuple_for(rel, row), commit_lsn=1, commit_time=COMMIT_TIME)
    assert isinstance(bad, Malformed)
    assert bad.message_id is None and bad.row["id"] == "i" * 256
    assert "255 bytes" in bad.reason
    row["id"] = "i" * 255
    ok = route(OutboxColumns.of(rel), tuple_for(rel, row), commit_lsn=1, commit_time=COMMIT_TIME)
    assert isinstance(ok, OutboxEvent) and ok.message_id == "i" * 255


def test_commit_time_header_is_iso_utc():
    rel = relation(LEGACY)
    when = datetime(2027, 1, 1, 0, 0, 0, 1, tzinfo=UTC)
    event = route(OutboxColumns.of(rel), tuple_for(rel, ROW), commit_lsn=1, commit_time=when)
    assert event.headers["commit_time"] == "2027-01-01T00:00:00.000001+00:00"
    assert datetime.fromisoformat(event.headers["commit_time"]).utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "payload",
    [
        '{"name": "Zoë", "city": "Zürich"}',
        '{"msg": "设备已启动", "emoji": "📱🚀"}',
        '{"rtl": "مرحبا", "combining": "e\u0301", "nbsp": "a\u00a0b"}',
        '{"escaped": "quote \\" backslash \\\\ newline \\n"}',
        '[1, 2.50, {"a": null}]',
        '"just a string"',
        "{}",
    ],
    ids=["latin", "cjk-emoji", "rtl-combining", "escapes", "array", "scalar", "empty"],
)
def test_payload_bytes_pass_through_unchanged(payload):
    raw = payload.encode()
    rel = relation(LEGACY)
    row = tuple_for(rel, {**ROW, "payload": None})
    row = tuple(raw if c.name == "payload" else v for c, v in zip(rel.columns, row, strict=True))
    event = route(OutboxColumns.of(rel), row, commit_lsn=1, commit_time=COMMIT_TIME)
    assert isinstance(event, OutboxEvent)
    assert event.body == raw  # byte-for-byte, no re-serialisation


def test_unicode_routing_key_and_headers_are_text():
    event = run(WITH_HEADERS, event_type="gerät.gestartet", aggregate_id="gerät-1")
    assert event.routing_key == "gerät.gestartet"
    assert event.headers["aggregate_id"] == "gerät-1"


# -- row headers -----------------------------------------------------------------------------


def test_row_headers_are_merged_and_relay_keys_win():
    row_headers = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tenant": 17,
        "priority": 2.5,
        "sampled": True,
        "nothing": None,
        "tags": ["a", "b", 3],
        "nested": {"k": "v", "n": [1, {"x": False}]},
        # Relay keys: the row's values must lose.
        "aggregate_type": "forged",
        "commit_lsn": "FF/FF",
        "created_at": "1999-01-01",
    }
    event = run(WITH_HEADERS, headers=json.dumps(row_headers))
    assert isinstance(event, OutboxEvent)
    expected = {k: v for k, v in row_headers.items()}
    expected.update(
        aggregate_type="device",
        aggregate_id="dev-42",
        commit_lsn="0/16B3748",
        commit_time="2026-12-02T18:35:58.004321+00:00",
        created_at="2026-12-02T18:35:57.123456+00:00",
    )
    assert event.headers == expected


RESERVED = {
    "CC": ["billing.secret"],
    "BCC": ["audit.#"],
    "cc": "lower.case",
    "x-cdc-attempt": 99,
    "x-cdc-routing-key": "user.updated",
    "X-CDC-Origin-Queue": "elsewhere",
    "cdc-retry-queue": "svc.retry.5s",
    "x-death": [{"queue": "svc.retry.5s", "reason": "expired"}],
    "x-delivery-count": 7,
    "x-first-death-queue": "svc.retry.5s",
    "x-last-death-reason": "expired",
    "x-parked-kind": "unroutable",
    "x-original-routing-key": "x",
    "x-delay": 60000,
    "x-opt-sequence-number": 1,
    "x-stream-filter-value": "f",
    "x-received-from": [],
}


def test_reserved_row_headers_are_renamed_not_obeyed():
    ordinary = {"x-trace-id": "t-1", "tenant": "acme", "ccx": 1}
    event = run(WITH_HEADERS, headers=json.dumps({**RESERVED, **ordinary}))
    assert isinstance(event, OutboxEvent)
    for key, value in RESERVED.items():
        assert key not in event.headers, key
        assert event.headers[f"outbox-{key}"] == value, key
    for key, value in ordinary.items():
        assert event.headers[key] == value  # x- keys nobody owns pass as they are


def test_a_row_holding_the_renamed_key_keeps_its_own_value():
    event = run(WITH_HEADERS, headers=json.dumps({"CC": ["a"], "outbox-CC": "mine"}))
    assert isinstance(event, OutboxEvent)
    assert event.headers["outbox-CC"] == "mine" and "CC" not in event.headers


def test_a_reserved_key_too_long_once_renamed_is_malformed():
    key = "x-cdc-" + "k" * 249  # 255 bytes: fits, but not with the prefix
    got = run(WITH_HEADERS, headers=json.dumps({key: 1}))
    assert isinstance(got, Malformed)


@pytest.mark.parametrize("headers", [None, "{}"], ids=["null", "empty-object"])
def test_null_or_empty_row_headers_add_nothing(headers):
    event = run(WITH_HEADERS, headers=headers)
    assert isinstance(event, OutboxEvent)
    assert set(event.headers) == {
        "aggregate_type", "aggregate_id", "commit_lsn", "commit_time", "created_at",
    }


@pytest.mark.parametrize(
    "value", [-(2**63), 2**63 - 1, 0], ids=["int64-min", "int64-max", "zero"]
)
def test_int64_header_values_are_carried(value):
    event = run(WITH_HEADERS, headers=json.dumps({"n": value}))
    assert isinstance(event, OutboxEvent)
    assert event.headers["n"] == value
    assert type(event.headers["n"]) is int


# -- malformed rows --------------------------------------------------------------------------

MALFORMED = [
    # (columns, row changes, expected message_id, expected routing key, reason fragment)
    (LEGACY, {"id": None}, None, None, "id is NULL"),
    (LEGACY, {"event_type": None}, ROW["id"], None, "event_type is NULL or empty"),
    (LEGACY, {"event_type": ""}, ROW["id"], None, "event_type is NULL or empty"),
    (LEGACY, {"event_type": "   \t"}, ROW["id"], None, "event_type is NULL or empty"),
    (LEGACY, {"event_type": "e" * 256}, ROW["id"], None, "longer than 255 bytes"),
    # 128 two-byte characters: 128 characters, 256 bytes.
    (LEGACY, {"event_type": "é" * 128}, ROW["id"], None, "longer than 255 bytes"),
    (LEGACY, {"payload": None}, ROW["id"], "device.started", "payload is NULL"),
    (WITH_HEADERS, {"headers": "[1, 2]"}, ROW["id"], "device.started", "not a JSON object"),
    (WITH_HEADERS, {"headers": '"text"'}, ROW["id"], "device.started", "not a JSON object"),
    (WITH_HEADERS, {"headers": "42"}, ROW["id"], "device.started", "not a JSON object"),
    (WITH_HEADERS, {"headers": "null"}, ROW["id"], "device.started", "not a JSON object"),
    (WITH_HEADERS, {"headers": "{not json"}, ROW["id"], "device.started", "not valid JSON"),
    (
        WITH_HEADERS,
        {"headers": '{"big": 9223372036854775808}'},
        ROW["id"],
        "device.started",
        "AMQP cannot carry",
    ),
    (
        WITH_HEADERS,
        {"headers": '{"deep": {"list": [18446744073709551615]}}'},
        ROW["id"],
        "device.started",
        "AMQP cannot carry",
    ),
    (
        WITH_HEADERS,
        {"headers": json.dumps({"k" * 256: 1})},
        ROW["id"],
        "device.started",
        "AMQP cannot carry",
    ),
    (
        [c for c in LEGACY if c[0] not in ("id", "event_type")],
        {},
        None,
        None,
        "lacks required columns: id, event_type",
    ),
]


@pytest.mark.parametrize(
    ("columns", "changes", "message_id", "key", "reason"),
    MALFORMED,
    ids=[
        "null-id", "null-type", "empty-type", "blank-type", "type-256-ascii", "type-256-bytes",
        "null-payload", "headers-array", "headers-string", "headers-number", "headers-null-json",
        "headers-invalid", "headers-int64-overflow",
        "headers-nested-uint64", "headers-long-key", "no-id-type-columns",
    ],
)
def test_malformed_rows_are_kept_with_a_reason(columns, changes, message_id, key, reason):
    result = run(columns, **changes)
    assert isinstance(result, Malformed), result
    assert reason in result.reason
    assert result.message_id == message_id
    assert result.routing_key == key
    names = [c[0] for c in columns]
    expected_row = {name: {**ROW, **changes}.get(name) for name in names}
    assert result.row == expected_row


def test_table_lacking_payload_parks_every_row_with_its_id():
    """After ``ALTER TABLE event_outbox DROP COLUMN payload`` every row is parked.

    Contract, "Parking": a malformed row is parked with ``message_id`` = id *if any*; the id
    column is still there, so the parked message must carry it (consumers dedupe on it).
    """
    columns = [c for c in LEGACY if c[0] != "payload"]
    result = run(columns)
    assert isinstance(result, Malformed)
    assert "lacks required columns: payload" in result.reason
    assert result.row["id"] == ROW["id"]
    assert result.message_id == ROW["id"]


def test_event_type_of_exactly_255_bytes_is_routable():
    key = "a." + "é" * 126 + "b"  # 2 + 252 + 1 = 255 bytes
    assert len(key.encode()) == 255
    event = run(LEGACY, event_type=key)
    assert isinstance(event, OutboxEvent)
    assert event.routing_key == key


@pytest.mark.parametrize(
    "number",
    [
        "18446744073709551616",  # 2**64: orjson turns it into a float
        "-9223372036854775809",  # -(2**63) - 1
        "123456789012345678901234567890",
    ],
    ids=["2**64", "int64-min-minus-1", "30-digits"],
)
def test_header_integers_beyond_int64_are_malformed_not_rounded(number):
    """A jsonb integer outside int64 is parked like 2**63 is, never silently made a float."""
    result = run(WITH_HEADERS, headers='{"n": ' + number + "}")
    assert isinstance(result, Malformed), (
        f"headers {{'n': {number}}} became {result.headers['n']!r}"
        if isinstance(result, OutboxEvent)
        else result
    )
    assert "AMQP cannot carry" in result.reason


def test_malformed_row_keeps_every_column_as_text_including_binary():
    rel = relation(LEGACY)
    row = list(tuple_for(rel, {**ROW, "id": None}))
    row[6] = BinaryValue(b"\x00\x00\x00\x03")  # retry_count in binary form
    result = route(OutboxColumns.of(rel), tuple(row), commit_lsn=1, commit_time=COMMIT_TIME)
    assert isinstance(result, Malformed)
    assert result.row["retry_count"] == "00000003"
    assert result.row["id"] is None
    assert result.row["payload"] == ROW["payload"]
    assert list(result.row) == [c[0] for c in LEGACY]


def test_routing_is_independent_of_column_order():
    base = run(WITH_HEADERS, headers='{"trace": "t1"}')
    names = list(WITH_HEADERS)
    rng = random.Random(20261202)
    for _ in range(20):
        rng.shuffle(names)
        assert run(list(names), headers='{"trace": "t1"}') == base


def test_created_at_in_other_zone_types():
    # A timestamp without time zone column (text has no offset) is taken as UTC.
    event = run(LEGACY, created_at="2026-12-02 18:35:57.654321")
    assert event.timestamp == datetime(2026, 12, 2, 18, 35, 57, 654321, tzinfo=UTC)
    # A fractional-hour offset survives.
    event = run(LEGACY, created_at="2026-12-02 18:35:57.1+05:45")
    assert event.timestamp.utcoffset() == timedelta(hours=5, minutes=45)
    assert event.timestamp.tzinfo == timezone(timedelta(hours=5, minutes=45))


@LAYOUTS
def test_snapshot_row_is_the_streamed_message_without_commit_headers(columns):
    """Backfill/recovery messages: same body, properties and headers, source instead of commit."""
    rel = relation(columns)
    row = tuple_for(rel, {**ROW, "headers": '{"trace": "t-1"}'})
    streamed = route(OutboxColumns.of(rel), row, commit_lsn=COMMIT_LSN, commit_time=COMMIT_TIME)
    read = route_snapshot(OutboxColumns.of(rel), row, source="backfill", snapshot="750:760:752")
    assert isinstance(streamed, OutboxEvent) and isinstance(read, OutboxEvent)
    assert (read.message_id, read.routing_key, read.body, read.timestamp) == (
        streamed.message_id, streamed.routing_key, streamed.body, streamed.timestamp,
    )
    expected = {k: v for k, v in streamed.headers.items() if k not in ("commit_lsn", "commit_time")}
    expected.update({"x-cdc-source": "backfill", "x-cdc-snapshot": "750:760:752"})
    assert read.headers == expected


def test_snapshot_headers_win_over_the_rows_and_malformed_rows_stay_malformed():
    rel = relation(WITH_HEADERS)
    row = {**ROW, "headers": '{"x-cdc-source": "forged"}'}
    event = route_snapshot(
        OutboxColumns.of(rel), tuple_for(rel, row), source="recovery", snapshot="1:1:"
    )
    assert isinstance(event, OutboxEvent)
    assert event.headers["x-cdc-source"] == "recovery"
    empty_type = tuple_for(rel, {**ROW, "event_type": ""})
    bad = route_snapshot(OutboxColumns.of(rel), empty_type, source="backfill", snapshot="1:1:")
    assert isinstance(bad, Malformed) and bad.reason == "event_type is NULL or empty"


@pytest.mark.parametrize(
    "headers",
    [{"k" * 129: 1}, {"ok": {"n" * 129: 1}}, {"ok": [{"é" * 65: 1}]}],
    ids=["top-level", "nested-table", "in-array-multibyte"],
)
def test_header_keys_over_the_field_name_limit_are_malformed_not_cut(headers):
    """AMQP field names hold 128 bytes (pamqp cuts longer ones): park, never cut silently."""
    result = run(WITH_HEADERS, headers=json.dumps(headers))
    assert isinstance(result, Malformed), result
    assert "field-name limit of 128 bytes" in result.reason, result.reason


def test_header_key_of_exactly_128_bytes_is_kept_whole():
    key = "é" * 64  # 128 bytes
    event = run(WITH_HEADERS, headers=json.dumps({key: "v"}))
    assert isinstance(event, OutboxEvent)
    assert event.headers[key] == "v"
