"""The outbox feed (cdc/core/feed.py) fed real pgoutput bytes.

Messages are built byte by byte per PostgreSQL's "Logical Replication Message Formats"
(protocol v1, no streaming, no two-phase: what START_REPLICATION asks for). When captured
fixtures exist in tests/fixtures/pgoutput/*.json they are replayed too.
"""

from __future__ import annotations

import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import pytest

from cdc.core.feed import OutboxFeed
from cdc.core.lsn import format_lsn, parse_lsn
from cdc.core.outbox import Malformed, OutboxEvent
from cdc.core.watermark import Watermark
from cdc.errors import ProtocolError
from cdc.wire import pgoutput
from cdc.wire.replication import parse_copy_data

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "pgoutput"

# -- pgoutput message builders ---------------------------------------------------------------

UUID, VARCHAR, TEXT, INT4, JSONB, TIMESTAMPTZ, INT8 = 2950, 1043, 25, 23, 3802, 1184, 20
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _ts(when: datetime) -> int:
    delta = when - PG_EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def begin(final_lsn: int, when: datetime, xid: int) -> bytes:
    return b"B" + struct.pack(">QqI", final_lsn, _ts(when), xid)


def commit(commit_lsn: int, end_lsn: int, when: datetime) -> bytes:
    return b"C" + struct.pack(">BQQq", 0, commit_lsn, end_lsn, _ts(when))


def relation(oid: int, namespace: str, name: str, columns) -> bytes:
    out = b"R" + struct.pack(">I", oid) + _s(namespace) + _s(name) + b"d"
    out += struct.pack(">H", len(columns))
    for col_name, type_oid, typmod in columns:
        flags = 1 if col_name == "id" else 0
        out += struct.pack(">B", flags) + _s(col_name) + struct.pack(">Ii", type_oid, typmod)
    return out


def tuple_data(values) -> bytes:
    out = struct.pack(">H", len(values))
    for value in values:
        if value is None:
            out += b"n"
        else:
            raw = value.encode() if isinstance(value, str) else value
            out += b"t" + struct.pack(">i", len(raw)) + raw
    return out


def insert(oid: int, values) -> bytes:
    return b"I" + struct.pack(">I", oid) + b"N" + tuple_data(values)


def update(oid: int, values) -> bytes:
    return b"U" + struct.pack(">I", oid) + b"N" + tuple_data(values)


def delete(oid: int, key) -> bytes:
    return b"D" + struct.pack(">I", oid) + b"K" + tuple_data(key)


def truncate(*oids: int, options: int = 0) -> bytes:
    return b"T" + struct.pack(f">IB{len(oids)}I", len(oids), options, *oids)


def logical_message(prefix: str, content: bytes, lsn: int, transactional: bool = True) -> bytes:
    head = struct.pack(">BQ", 1 if transactional else 0, lsn)
    return b"M" + head + _s(prefix) + struct.pack(">i", len(content)) + content


def origin(lsn: int, name: str) -> bytes:
    return b"O" + struct.pack(">Q", lsn) + _s(name)


def type_message(oid: int, namespace: str, name: str) -> bytes:
    return b"Y" + struct.pack(">I", oid) + _s(namespace) + _s(name)


def xlogdata(start: int, payload: bytes) -> bytes:
    return b"w" + struct.pack(">QQq", start, start + len(payload), 0) + payload


# -- the scene: the seed's outbox table plus a busy neighbour ---------------------------------

OUTBOX_OID, ORDERS_OID = 16390, 16402
OUTBOX_COLUMNS = [
    ("id", UUID, -1),
    ("aggregate_type", VARCHAR, 104),
    ("aggregate_id", VARCHAR, 259),
    ("event_type", VARCHAR, 259),
    ("payload", JSONB, -1),
    ("headers", JSONB, -1),
    ("status", VARCHAR, 24),
    ("retry_count", INT4, -1),
    ("error_message", TEXT, -1),
    ("last_error_at", TIMESTAMPTZ, -1),
    ("published_at", TIMESTAMPTZ, -1),
    ("created_at", TIMESTAMPTZ, -1),
]
ORDERS_COLUMNS = [("id", INT8, -1), ("total", TEXT, -1)]

WHEN = datetime(2026, 12, 2, 18, 35, 58, 4321, tzinfo=UTC)
LATER = datetime(2026, 12, 2, 18, 36, 1, 250000, tzinfo=UTC)
TX1 = (parse_lsn("0/16B3748"), parse_lsn("0/16B3790"))  # (commit lsn, end lsn)
TX2 = (parse_lsn("0/16B4A10"), parse_lsn("0/16B4A58"))


def outbox_row(n: int, event_type: str = "device.started", **changes):
    row = {
        "id": f"7c3f2a1e-8d4b-4e1a-9f0c-{n:012d}",
        "aggregate_type": "device",
        "aggregate_id": f"dev-{n}",
        "event_type": event_type,
        "payload": f'{{"deviceId": "dev-{n}", "n": {n}}}',
        "headers": None,
        "status": "pending",
        "retry_count": "0",
        "error_message": None,
        "last_error_at": None,
        "published_at": None,
        "created_at": "2026-12-02 18:35:57.123456+00",
        **changes,
    }
    return row


def values(row: dict, columns=OUTBOX_COLUMNS):
    return [row.get(name) for name, _, _ in columns]


class Scene:
    """One replication connection's feed, its watermark and the ignored counter."""

    def __init__(self, schema: str = "public", table: str = "event_outbox") -> None:
        self.watermark = Watermark()
        self.ignored: list[str] = []
        self.feed = OutboxFeed(schema, table, self.watermark, self.ignored.append)
        self.lsn = parse_lsn("0/16B0000")

    def send(self, *messages: bytes):
        items = []
        for message in messages:
            self.lsn += 8
            item = self.feed.handle(memoryview(message), self.lsn)
            if item is not None:
                items.append(item)
        return items


def test_transaction_with_two_inserts_gives_two_items_and_flushes_after_both_confirms():
    scene = Scene()
    first, second = outbox_row(1), outbox_row(2, "device.stopped")
    items = scene.send(
        begin(TX1[0], WHEN, 735),
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        insert(OUTBOX_OID, values(first)),
        insert(OUTBOX_OID, values(second)),
        commit(*TX1, WHEN),
    )
    assert len(items) == 2
    (txn_a, event_a), (txn_b, event_b) = items
    assert txn_a is txn_b
    assert txn_a.commit_lsn == TX1[0]
    assert txn_a.end_lsn == TX1[1]
    assert txn_a.commit_time == WHEN.timestamp()
    assert isinstance(event_a, OutboxEvent)
    assert isinstance(event_b, OutboxEvent)
    assert [event_a.message_id, event_b.message_id] == [first["id"], second["id"]]
    assert [event_a.routing_key, event_b.routing_key] == ["device.started", "device.stopped"]
    assert event_a.body == first["payload"].encode()
    assert event_a.headers["commit_lsn"] == "0/16B3748"
    assert event_a.headers["commit_time"] == "2026-12-02T18:35:58.004321+00:00"
    assert not scene.feed.in_transaction
    assert scene.ignored == []

    wm = scene.watermark
    assert (wm.flushed, wm.in_flight) == (0, 2)
    wm.confirm(txn_b)  # out of order
    assert (wm.flushed, wm.in_flight) == (0, 1)
    wm.confirm(txn_a)
    assert (wm.flushed, wm.in_flight) == (TX1[1], 0)


def test_in_transaction_tracks_begin_and_commit():
    scene = Scene()
    assert not scene.feed.in_transaction
    scene.send(begin(TX1[0], WHEN, 735))
    assert scene.feed.in_transaction
    assert scene.watermark.oldest_pending_commit() is not None
    scene.send(commit(*TX1, WHEN))
    assert not scene.feed.in_transaction
    assert scene.watermark.flushed == TX1[1]


def test_two_transactions_keep_commit_order_and_flush_independently():
    scene = Scene()
    scene.send(relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS))
    items = scene.send(
        begin(TX1[0], WHEN, 735),
        insert(OUTBOX_OID, values(outbox_row(1))),
        commit(*TX1, WHEN),
        begin(TX2[0], LATER, 736),
        insert(OUTBOX_OID, values(outbox_row(2))),
        insert(OUTBOX_OID, values(outbox_row(3))),
        commit(*TX2, LATER),
    )
    assert [event.message_id[-1] for _, event in items] == ["1", "2", "3"]
    t1, t2 = items[0][0], items[1][0]
    assert t1 is not t2
    assert items[2][0] is t2
    assert items[1][1].headers["commit_lsn"] == format_lsn(TX2[0])
    assert items[1][1].headers["commit_time"] == LATER.isoformat()
    wm = scene.watermark
    wm.confirm(t2)
    wm.confirm(t2)
    assert wm.flushed == 0, "TX2 confirmed, but TX1 is not"
    wm.confirm(t1)
    assert wm.flushed == TX2[1]


def test_inserts_into_other_tables_are_ignored_and_counted():
    scene = Scene()
    items = scene.send(
        begin(TX1[0], WHEN, 735),
        relation(ORDERS_OID, "public", "orders", ORDERS_COLUMNS),
        insert(ORDERS_OID, ["1", "9.99"]),
        insert(ORDERS_OID, ["2", "19.99"]),
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        insert(OUTBOX_OID, values(outbox_row(1))),
        insert(ORDERS_OID, ["3", "29.99"]),
        commit(*TX1, WHEN),
    )
    assert len(items) == 1
    assert scene.ignored == ["other_table"] * 3
    assert scene.watermark.in_flight == 1


def test_transaction_touching_only_other_tables_flushes_at_commit():
    scene = Scene()
    scene.send(
        begin(TX1[0], WHEN, 735),
        relation(ORDERS_OID, "public", "orders", ORDERS_COLUMNS),
        insert(ORDERS_OID, ["1", "9.99"]),
        commit(*TX1, WHEN),
    )
    assert scene.watermark.flushed == TX1[1]
    assert scene.watermark.in_flight == 0


@pytest.mark.parametrize(
    ("schema", "table"),
    [("audit", "event_outbox"), ("public", "event_outbox_archive"), ("public", "Event_Outbox")],
)
def test_same_looking_tables_elsewhere_are_not_the_outbox(schema, table):
    scene = Scene()
    items = scene.send(
        begin(TX1[0], WHEN, 735),
        relation(OUTBOX_OID, schema, table, OUTBOX_COLUMNS),
        insert(OUTBOX_OID, values(outbox_row(1))),
        commit(*TX1, WHEN),
    )
    assert items == []
    assert scene.ignored == ["other_table"]


def test_outbox_in_a_custom_schema():
    scene = Scene("billing", "outbox")
    items = scene.send(
        begin(TX1[0], WHEN, 735),
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        relation(OUTBOX_OID + 1, "billing", "outbox", OUTBOX_COLUMNS),
        insert(OUTBOX_OID, values(outbox_row(1))),
        insert(OUTBOX_OID + 1, values(outbox_row(2))),
        commit(*TX1, WHEN),
    )
    assert [event.message_id for _, event in items] == [outbox_row(2)["id"]]
    assert scene.ignored == ["other_table"]


def test_relation_resent_with_an_added_column_remaps_columns():
    scene = Scene()
    before = outbox_row(1)
    items = scene.send(
        begin(TX1[0], WHEN, 735),
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        insert(OUTBOX_OID, values(before)),
        commit(*TX1, WHEN),
    )
    # ALTER TABLE event_outbox ADD COLUMN tenant_id bigint: the server re-sends the Relation
    # before the next change; rows now carry 13 columns.
    added = [*OUTBOX_COLUMNS, ("tenant_id", INT8, -1)]
    after = outbox_row(2, "user.updated", tenant_id="17", headers='{"trace": "t-2"}')
    items += scene.send(
        begin(TX2[0], LATER, 736),
        relation(OUTBOX_OID, "public", "event_outbox", added),
        insert(OUTBOX_OID, values(after, added)),
        commit(*TX2, LATER),
    )
    assert [type(e) for _, e in items] == [OutboxEvent, OutboxEvent]
    event = items[1][1]
    assert event.message_id == after["id"]
    assert event.routing_key == "user.updated"
    assert event.body == after["payload"].encode()
    assert event.headers["trace"] == "t-2"
    assert "tenant_id" not in event.headers


def test_relation_resent_with_columns_moved_remaps_by_name():
    # DROP COLUMN headers; ADD COLUMN headers: it is now last, everything after it moved.
    scene = Scene()
    moved = [c for c in OUTBOX_COLUMNS if c[0] != "headers"] + [("headers", JSONB, -1)]
    row = outbox_row(5, "billing.charged", headers='{"attempt": 2}')
    items = scene.send(
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        begin(TX1[0], WHEN, 735),
        relation(OUTBOX_OID, "public", "event_outbox", moved),
        insert(OUTBOX_OID, values(row, moved)),
        commit(*TX1, WHEN),
    )
    [(_, event)] = items
    assert isinstance(event, OutboxEvent)
    assert event.headers["attempt"] == 2
    assert event.headers["created_at"] == "2026-12-02T18:35:57.123456+00:00"


def test_relation_renamed_away_stops_routing():
    # ALTER TABLE event_outbox RENAME TO event_outbox_old: same oid, new name.
    scene = Scene()
    items = scene.send(
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        begin(TX1[0], WHEN, 735),
        relation(OUTBOX_OID, "public", "event_outbox_old", OUTBOX_COLUMNS),
        insert(OUTBOX_OID, values(outbox_row(1))),
        commit(*TX1, WHEN),
    )
    assert items == []
    assert scene.ignored == ["other_table"]


def test_malformed_outbox_row_is_an_item_that_must_be_confirmed():
    scene = Scene()
    items = scene.send(
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        begin(TX1[0], WHEN, 735),
        insert(OUTBOX_OID, values(outbox_row(1, event_type=None))),
        insert(OUTBOX_OID, values(outbox_row(2))),
        commit(*TX1, WHEN),
    )
    [(txn, bad), (_, good)] = items
    assert isinstance(bad, Malformed)
    assert bad.message_id == outbox_row(1)["id"]
    assert isinstance(good, OutboxEvent)
    wm = scene.watermark
    wm.confirm(txn)
    assert wm.flushed == 0, "the parked row must be confirmed too before the commit flushes"
    wm.confirm(txn)
    assert wm.flushed == TX1[1]


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (update(OUTBOX_OID, values(outbox_row(1, status="published"))), "update"),
        (delete(OUTBOX_OID, [outbox_row(1)["id"]] + [None] * 11), "delete"),
        (truncate(OUTBOX_OID), "truncate"),
        (truncate(OUTBOX_OID, ORDERS_OID, options=3), "truncate"),
        (update(ORDERS_OID, ["1", "10.00"]), "update"),
        (logical_message("app", b'{"k": 1}', TX1[0]), "logical_message"),
        (origin(TX1[0], "node_a"), "origin"),
        (type_message(16500, "public", "mood"), "type"),
    ],
    ids=[
        "outbox-update", "outbox-delete", "truncate", "truncate-cascade", "other-update",
        "message", "origin", "type",
    ],
)
def test_non_insert_changes_are_counted_as_ignored(message, reason):
    scene = Scene()
    items = scene.send(
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        relation(ORDERS_OID, "public", "orders", ORDERS_COLUMNS),
        begin(TX1[0], WHEN, 735),
        message,
        commit(*TX1, WHEN),
    )
    assert items == []
    assert scene.ignored == [reason]
    assert scene.watermark.flushed == TX1[1]


def test_non_transactional_logical_message_outside_a_transaction_is_ignored():
    scene = Scene()
    assert scene.send(logical_message("hb", b"", TX1[0], transactional=False)) == []
    assert scene.ignored == ["logical_message"]


def test_relation_outside_a_transaction_is_accepted():
    scene = Scene()
    assert scene.send(relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS)) == []
    assert scene.ignored == []


@pytest.mark.parametrize("after_commit", [False, True], ids=["never-begun", "after-commit"])
def test_outbox_insert_outside_a_transaction_is_a_protocol_error(after_commit):
    scene = Scene()
    scene.send(relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS))
    if after_commit:
        scene.send(begin(TX1[0], WHEN, 735), commit(*TX1, WHEN))
    lsn = parse_lsn("0/16B5000")
    with pytest.raises(ProtocolError, match="Insert outside a transaction") as info:
        scene.feed.handle(memoryview(insert(OUTBOX_OID, values(outbox_row(1)))), lsn)
    assert info.value.lsn == lsn
    assert "0/16B5000" in str(info.value)
    assert scene.watermark.in_flight == 0


def test_commit_without_begin_is_a_protocol_error():
    scene = Scene()
    with pytest.raises(ProtocolError, match="Commit without Begin"):
        scene.send(commit(*TX1, WHEN))
    assert scene.watermark.flushed == 0


_GID = "_gid_1"
UNEXPECTED = [
    ("StreamStart", b"S" + struct.pack(">IB", 740, 1)),
    ("StreamStop", b"E"),
    ("StreamCommit", b"c" + struct.pack(">IBQQq", 740, 0, *TX1, _ts(WHEN))),
    ("StreamAbort", b"A" + struct.pack(">II", 740, 741)),
    ("StreamAbort", b"A" + struct.pack(">IIQq", 740, 741, TX1[0], _ts(WHEN))),
    ("BeginPrepare", b"b" + struct.pack(">QQqI", *TX1, _ts(WHEN), 740) + _s(_GID)),
    ("Prepare", b"P" + struct.pack(">BQQqI", 0, *TX1, _ts(WHEN), 740) + _s(_GID)),
    ("CommitPrepared", b"K" + struct.pack(">BQQqI", 0, *TX1, _ts(WHEN), 740) + _s(_GID)),
    (
        "RollbackPrepared",
        b"r" + struct.pack(">BQQqqI", 0, *TX1, _ts(WHEN), _ts(LATER), 740) + _s(_GID),
    ),
    ("StreamPrepare", b"p" + struct.pack(">BQQqI", 0, *TX1, _ts(WHEN), 740) + _s(_GID)),
]


@pytest.mark.parametrize(
    ("kind", "message"), UNEXPECTED, ids=[f"{k}-{i}" for i, (k, _) in enumerate(UNEXPECTED)]
)
def test_stream_and_two_phase_messages_are_protocol_errors(kind, message):
    assert type(pgoutput.decode(message)).__name__ == kind  # the bytes are valid pgoutput
    scene = Scene()
    lsn = parse_lsn("0/16B6000")
    with pytest.raises(ProtocolError, match=f"unexpected {kind} message") as info:
        scene.feed.handle(memoryview(message), lsn)
    assert info.value.lsn == lsn
    assert scene.ignored == []
    assert scene.watermark.oldest_pending_commit() is None


@pytest.mark.parametrize("cut", [1, 5, 10, 20])
def test_truncated_insert_is_a_protocol_error_at_its_lsn(cut):
    scene = Scene()
    scene.send(relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS))
    scene.send(begin(TX1[0], WHEN, 735))
    message = insert(OUTBOX_OID, values(outbox_row(1)))
    lsn = parse_lsn("0/16B7000")
    with pytest.raises(ProtocolError) as info:
        scene.feed.handle(memoryview(message[:-cut]), lsn)
    assert info.value.lsn == lsn
    assert 0 <= info.value.offset <= len(message) - cut
    assert scene.watermark.in_flight == 0


def test_a_new_connection_needs_the_relation_again():
    first = Scene()
    first.send(relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS))
    # Reconnected: a new feed. The server re-sends the Relation before the first change.
    second = Scene()
    items = second.send(
        begin(TX1[0], WHEN, 735),
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        insert(OUTBOX_OID, values(outbox_row(1))),
        commit(*TX1, WHEN),
    )
    assert len(items) == 1


def test_xlogdata_frames_feed_through_replication_parsing():
    scene = Scene()
    start = TX1[0] - 0x100
    frames = [
        begin(TX1[0], WHEN, 735),
        relation(OUTBOX_OID, "public", "event_outbox", OUTBOX_COLUMNS),
        insert(OUTBOX_OID, values(outbox_row(1, payload='{"text": "Grüße 👋"}'))),
        commit(*TX1, WHEN),
    ]
    items = []
    for payload in frames:
        data = parse_copy_data(xlogdata(start, payload))
        item = scene.feed.handle(data.payload, data.wal_start)
        if item is not None:
            items.append(item)
        start += len(payload)
    [(txn, event)] = items
    assert event.body == '{"text": "Grüße 👋"}'.encode()
    scene.watermark.confirm(txn)
    assert scene.watermark.flushed == TX1[1]


# -- captured fixtures (when present) -------------------------------------------------------

_REFUSED = set(b"SEcAbPKrp")  # stream and two-phase tags: never requested, always refused


def _fixture_files():
    return sorted(FIXTURES.glob("*.json")) if FIXTURES.is_dir() else []


_IGNORED = {
    pgoutput.Update: "update",
    pgoutput.Delete: "delete",
    pgoutput.Truncate: "truncate",
    pgoutput.LogicalMessage: "logical_message",
    pgoutput.Origin: "origin",
    pgoutput.TypeMessage: "type",
}


def _outbox_of(messages) -> tuple[str, str]:
    """The first relation with the outbox's required columns plays the outbox; failing that
    the captured ``items`` table does (its rows then park as malformed)."""
    for entry in messages:
        raw = bytes.fromhex(entry["hex"])
        if not entry.get("in_stream") and raw[:1] == b"R":
            rel = pgoutput.decode(raw)
            if {"id", "event_type", "payload"} <= {c.name for c in rel.columns}:
                return rel.namespace, rel.name
    return "public", "items"


@pytest.mark.skipif(not _fixture_files(), reason="no captured pgoutput fixtures yet")
@pytest.mark.parametrize("path", _fixture_files(), ids=lambda p: p.stem)
def test_captured_sessions_replay_through_the_feed(path):
    """Replay captured server bytes: inserts into the target inside a transaction become
    items, everything else is counted as ignored, stream/2PC messages are refused, and
    confirming every item flushes to the highest commit end."""
    messages = json.loads(path.read_text())
    target = _outbox_of(messages)
    scene = Scene(*target)
    target_oids: set[int] = set()
    items, expected, ignored, ends = [], 0, [], []
    in_txn = False
    skipping = False  # inside a stream block or a prepared transaction's changes
    for index, entry in enumerate(messages):
        raw = bytes.fromhex(entry["hex"])
        if raw[0] in _REFUSED:
            with pytest.raises(ProtocolError, match="unexpected"):
                scene.feed.handle(memoryview(raw), index)
            if raw[:1] in (b"S", b"b"):
                skipping = True
            elif raw[:1] in (b"E", b"P"):
                skipping = False
            continue
        if entry.get("in_stream") or skipping:
            continue
        msg = pgoutput.decode(raw)
        if isinstance(msg, pgoutput.Relation):
            if (msg.namespace, msg.name) == target:
                target_oids.add(msg.oid)
            else:
                target_oids.discard(msg.oid)
        elif isinstance(msg, pgoutput.Begin):
            in_txn = True
        elif isinstance(msg, pgoutput.Commit):
            in_txn = False
            ends.append(msg.end_lsn)
        elif isinstance(msg, pgoutput.Insert):
            if msg.relation_oid in target_oids:
                assert in_txn, f"{path.name}[{index}]: insert outside a transaction"
                expected += 1
            else:
                ignored.append("other_table")
        elif type(msg) in _IGNORED:
            ignored.append(_IGNORED[type(msg)])
        item = scene.feed.handle(memoryview(raw), index)
        if item is not None:
            items.append(item)
    assert len(items) == expected
    assert scene.ignored == ignored
    for txn, item in items:
        if target == ("public", "items"):
            assert isinstance(item, Malformed)
            assert "lacks required columns: event_type, payload" in item.reason
            assert item.row["id"] is not None
        scene.watermark.confirm(txn)
    assert scene.watermark.in_flight == 0
    assert not in_txn
    assert scene.watermark.flushed == max(ends, default=0)


def test_captured_item_row_is_kept_as_text():
    path = FIXTURES / "v1.json"
    if not path.is_file():
        pytest.skip("no captured pgoutput fixtures yet")
    by_name = {e["name"]: bytes.fromhex(e["hex"]) for e in json.loads(path.read_text())}
    scene = Scene("public", "items")
    [(txn, item)] = scene.send(
        *(by_name[f"insert/{kind}"] for kind in ("begin", "relation", "insert", "commit"))
    )
    assert isinstance(item, Malformed)
    assert item.row == {
        "id": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "name": "widget",
        "attrs": '{"color": "red", "sizes": [1, 2]}',
        "created_at": "2024-05-01 12:34:56.789+00",
        "qty": "42",
        "note": None,
    }
    commit_msg = pgoutput.decode(by_name["insert/commit"])
    assert scene.watermark.flushed == 0
    scene.watermark.confirm(txn)
    assert scene.watermark.flushed == commit_msg.end_lsn
