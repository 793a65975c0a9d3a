"""Settings (cdc/config.py), log redaction (cdc/service/logs.py), LSN text (cdc/core/lsn.py),
backoff."""

from __future__ import annotations

import io
import json
import logging
import random
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from cdc.config import DEFAULT_EXCHANGE, DEFAULT_PARKING_QUEUE, RelaySettings
from cdc.core.lsn import MAX_LSN, format_lsn, parse_lsn
from cdc.errors import CdcError, ConfigError, ProtocolError
from cdc.service import logs
from cdc.service.backoff import Backoff
from cdc.service.settings import load

pytestmark = pytest.mark.usefixtures("no_cdc_env")

DB_URL = "postgresql://relay:s3cr3t-db@db.internal:5432/cloudphone"
AMQP_URL = "amqp://cdc:s3cr3t-mq@rabbit.internal:5672/%2F"


def settings(**overrides) -> RelaySettings:
    return RelaySettings(database_url=DB_URL, amqp_url=AMQP_URL, **overrides)


# -- settings -------------------------------------------------------------------------------


def test_defaults_match_the_contract():
    s = settings()
    assert s.slot_name == "cdc_outbox"
    assert s.publication_name == "cdc_outbox"
    assert s.outbox_table == "public.event_outbox"
    assert (s.table_schema, s.table_name) == ("public", "event_outbox")
    assert s.exchange == DEFAULT_EXCHANGE == "cloudphone.events"
    assert s.parking_queue == DEFAULT_PARKING_QUEUE == "cdc.outbox.parked"
    assert s.metrics_port == 9190
    assert s.metrics_host == "0.0.0.0"
    assert s.max_in_flight == 2000
    assert s.confirm_timeout == 30
    assert s.status_interval == 10
    assert (s.reconnect_min_delay, s.reconnect_max_delay) == (0.5, 30)
    assert s.standby_poll_interval == 2
    assert s.shutdown_timeout == 10
    assert (s.log_format, s.log_level) == ("text", "INFO")


@pytest.mark.parametrize(
    "slot", ["Bad", "a-b", "x;drop", "a" * 64, "", "slot name", "ślot", "cdc_outbox\nx"]
)
def test_bad_slot_names_are_refused(slot):
    with pytest.raises(ValidationError, match="slot_name"):
        settings(slot_name=slot)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("slot_name", "cdc_outbox\n"),
        ("publication_name", "cdc_outbox\n"),
        ("outbox_table", "public.event_outbox\n"),
        ("outbox_table", "event_outbox\n"),
    ],
)
def test_a_trailing_newline_is_not_a_valid_identifier(field, value):
    """Values mounted from files (a ConfigMap made with ``--from-file``) often end in "\\n".

    The patterns end in ``$``, which in Python also matches just before a final newline, so
    ``re.match`` accepts them. The name then reaches PostgreSQL as is: `cdc setup` creates a
    table ``public."event_outbox\\n"`` (CREATE TABLE IF NOT EXISTS) and a publication on it
    that no writer uses, and the relay streams nothing. Validation must refuse the newline
    (``fullmatch`` or ``\\Z``) as it refuses any other non-identifier character.
    """
    with pytest.raises(ValidationError, match=field):
        settings(**{field: value})


@pytest.mark.parametrize("slot", ["cdc_outbox", "a" * 63, "0", "relay_2", "_"])
def test_good_slot_names(slot):
    assert settings(slot_name=slot).slot_name == slot


@pytest.mark.parametrize("publication", ["1pub", "pub-x", "p;drop", "", "a" * 64, "p q"])
def test_bad_publication_names_are_refused(publication):
    with pytest.raises(ValidationError, match="publication_name"):
        settings(publication_name=publication)


@pytest.mark.parametrize(
    "table",
    [
        "a.b.c",
        "1x",
        "x;drop",
        "public.",
        ".x",
        "",
        "event outbox",
        "public.event-outbox",
        'public."event_outbox"',
        "public.x; DROP TABLE users",
        "a" * 64,
    ],
)
def test_bad_table_names_are_refused(table):
    with pytest.raises(ValidationError, match="outbox_table"):
        settings(outbox_table=table)


@pytest.mark.parametrize(
    ("table", "full", "schema", "name"),
    [
        ("x", "public.x", "public", "x"),
        ("event_outbox", "public.event_outbox", "public", "event_outbox"),
        ("billing.outbox", "billing.outbox", "billing", "outbox"),
        ("public.event_outbox", "public.event_outbox", "public", "event_outbox"),
    ],
)
def test_table_without_schema_is_in_public(table, full, schema, name):
    s = settings(outbox_table=table)
    assert s.outbox_table == full
    assert (s.table_schema, s.table_name) == (schema, name)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("metrics_port", -1),
        ("metrics_port", 65536),
        ("max_in_flight", 0),
        ("confirm_timeout", 0),
        ("status_interval", 0),
        ("status_interval", 3601),
        ("shutdown_timeout", -1),
        ("log_format", "xml"),
        ("log_level", "TRACE"),
        ("exchange", "cloudphone events"),
        ("exchange", ""),
        ("parking_queue", "q/1"),
    ],
)
def test_out_of_range_values_are_refused(field, value):
    with pytest.raises(ValidationError, match=field):
        settings(**{field: value})


def test_environment_with_cdc_prefix(monkeypatch):
    monkeypatch.setenv("CDC_DATABASE_URL", DB_URL)
    monkeypatch.setenv("CDC_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("CDC_SLOT_NAME", "relay_b")
    monkeypatch.setenv("CDC_PUBLICATION_NAME", "outbox_pub")
    monkeypatch.setenv("CDC_OUTBOX_TABLE", "outbox")
    monkeypatch.setenv("CDC_EXCHANGE", "cloudphone.events.v2")
    monkeypatch.setenv("CDC_METRICS_PORT", "0")
    monkeypatch.setenv("CDC_MAX_IN_FLIGHT", "250")
    monkeypatch.setenv("CDC_LOG_FORMAT", "json")
    monkeypatch.setenv("SLOT_NAME", "unprefixed_is_ignored")
    s = RelaySettings()
    assert s.database_url.get_secret_value() == DB_URL
    assert s.amqp_url.get_secret_value() == AMQP_URL
    assert s.slot_name == "relay_b"
    assert s.publication_name == "outbox_pub"
    assert s.outbox_table == "public.outbox"
    assert s.exchange == "cloudphone.events.v2"
    assert s.metrics_port == 0
    assert s.max_in_flight == 250
    assert s.log_format == "json"


def test_environment_values_are_validated_too(monkeypatch):
    monkeypatch.setenv("CDC_DATABASE_URL", DB_URL)
    monkeypatch.setenv("CDC_AMQP_URL", AMQP_URL)
    monkeypatch.setenv("CDC_SLOT_NAME", "Bad-Slot")
    with pytest.raises(ValidationError, match="slot_name"):
        RelaySettings()


def test_urls_are_required_by_the_commands_that_use_them(monkeypatch):
    monkeypatch.setenv("CDC_AMQP_URL", AMQP_URL)
    assert RelaySettings().database_url is None  # optional in the model: `dlq` needs none
    with pytest.raises(ConfigError, match="CDC_DATABASE_URL: is not set"):
        load(RelaySettings, {}, needs=("database_url",))


def test_secrets_never_show_in_repr_str_or_dumps():
    s = settings()
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        assert "s3cr3t" not in text
    assert s.database_url.get_secret_value() == DB_URL


# -- redaction ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DB_URL, "postgresql://relay:***@db.internal:5432/cloudphone"),
        (AMQP_URL, "amqp://cdc:***@rabbit.internal:5672/%2F"),
        ("amqps://u:p%40ss%2Fw@mq:5671/vh", "amqps://u:***@mq:5671/vh"),
        ("postgres://relay:@db/app", "postgres://relay:***@db/app"),
        (
            "connect to postgresql://a:x@h1/d and amqp://b:y@h2/ failed",
            "connect to postgresql://a:***@h1/d and amqp://b:***@h2/ failed",
        ),
        ("host=db user=relay password=s3cr3t dbname=app",
         "host=db user=relay password=*** dbname=app"),
        ("host=db password = 's3 cr\\'et x' port=5432", "host=db password = *** port=5432"),
        ("PASSWORD='two words' host=db", "PASSWORD=*** host=db"),
        ("PGPASSWORD=hunter2", "PGPASSWORD=***"),
        ("postgresql://db/app?user=r&password=s3cr3t", "postgresql://db/app?user=r&password=***"),
    ],
    ids=[
        "pg-url", "amqp-url", "encoded", "empty-password", "two-urls", "dsn", "dsn-quoted",
        "upper", "env", "query",
    ],
)
def test_redact_removes_passwords(text, expected):
    assert logs.redact(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "postgresql://relay@db:5432/app",
        "amqp://rabbit:5672/",
        'FATAL:  password authentication failed for user "relay"',
        "slot cdc_outbox at 0/16B3748",
        "http://[::1]:9190/metrics",
    ],
)
def test_redact_leaves_secret_free_text_alone(text):
    assert logs.redact(text) == text


@pytest.fixture
def root_logger():
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("aiormq").level)
    yield root
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("aiormq").setLevel(saved[2])


def _capture(monkeypatch, fmt: str) -> io.StringIO:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    logs.configure(fmt, "DEBUG")
    return stream


def test_configure_installs_one_handler_and_quiets_aiormq(monkeypatch, root_logger):
    _capture(monkeypatch, "text")
    _capture(monkeypatch, "json")
    assert len(root_logger.handlers) == 1
    assert root_logger.level == logging.DEBUG
    assert logging.getLogger("aiormq").level == logging.CRITICAL


RECORDS = [
    # (message, args, extra) -- things the relay really logs
    ("session ended (%s): %s", ("database", f"could not connect to {DB_URL}"), {}),
    ("connecting", (), {"amqp_url": AMQP_URL, "slot": "cdc_outbox"}),
    ("libpq said: host=db password=s3cr3t-db user=relay", (), {}),
    ("libpq said: host=db user=relay password=s3cr3t-db", (), {}),
    ("connecting", (), {"dsn": "host=db password=s3cr3t-db"}),
    ("quoted", (), {"dsn": "host=db password='s3cr3t-db' user=relay"}),
]
RECORD_IDS = [
    "url-in-arg", "url-in-extra", "dsn-mid-message", "dsn-end-of-message", "dsn-end-of-extra",
    "dsn-quoted-extra",
]


@pytest.mark.parametrize(("msg", "args", "extra"), RECORDS, ids=RECORD_IDS)
def test_json_lines_are_valid_json_and_redacted(monkeypatch, root_logger, msg, args, extra):
    """Redaction runs on the dumped JSON text; it must not eat JSON syntax.

    orjson writes compact JSON (no spaces), so a ``password=...`` value that ends a string
    is followed by ``"`` and the next field with no whitespace in between.
    """
    stream = _capture(monkeypatch, "json")
    logging.getLogger("cdc.shell.relay").warning(msg, *args, extra=extra)
    line = stream.getvalue()
    assert "s3cr3t" not in line
    assert line.endswith("\n") and line.count("\n") == 1
    try:
        doc = json.loads(line)  # must stay one valid JSON document after redaction
    except ValueError:
        pytest.fail(f"redaction broke the JSON line: {line!r}")
    assert doc["level"] == "warning"
    assert doc["logger"] == "cdc.shell.relay"
    assert set(extra) <= set(doc), "extra fields must survive redaction"
    assert doc["msg"].startswith(msg.split("%")[0].split("password")[0])


def test_json_line_carries_a_redacted_traceback(monkeypatch, root_logger):
    stream = _capture(monkeypatch, "json")
    try:
        raise ConnectionError(f"connection to {DB_URL} refused")
    except ConnectionError:
        logging.getLogger("cdc.shell.source").exception("replication connection lost")
    doc = json.loads(stream.getvalue())
    assert doc["msg"] == "replication connection lost"
    assert "ConnectionError" in doc["exc"]
    assert "postgresql://relay:***@db.internal" in doc["exc"]
    assert "s3cr3t" not in stream.getvalue()
    assert doc["ts"].endswith("+00:00")


@pytest.mark.parametrize(("msg", "args", "extra"), RECORDS, ids=RECORD_IDS)
def test_text_lines_are_redacted(monkeypatch, root_logger, msg, args, extra):
    stream = _capture(monkeypatch, "text")
    logging.getLogger("cdc.shell.relay").warning(msg, *args, extra=extra)
    line = stream.getvalue()
    assert "s3cr3t" not in line
    assert " WARNING cdc.shell.relay: " in line
    for key in extra:
        assert f" {key}=" in line


# -- LSNs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/16B3748", 0x16B3748),
        ("16/B374D848", 0x16_B374D848),
        ("16/b374d848", 0x16_B374D848),
        ("FFFFFFFF/FFFFFFFF", MAX_LSN),
        ("00000000/00000001", 1),
        ("1/0", 1 << 32),
        (" 0/16B3748\n", 0x16B3748),
    ],
)
def test_parse_lsn(text, value):
    assert parse_lsn(text) == value


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0/0"), (0x16B3748, "0/16B3748"), (1 << 32, "1/0"),
     (0x16_B374D848, "16/B374D848"), (MAX_LSN, "FFFFFFFF/FFFFFFFF")],
)
def test_format_lsn_like_postgres(value, text):
    assert format_lsn(value) == text


@pytest.mark.parametrize(
    "text",
    ["", "0", "0/", "/0", "G/0", "0/G", "123456789/0", "0/123456789", "0/0/0", "-1/0",
     "0x1/0", "+1/0", "1 /0", "0.0", "\u0661/\u0660"],
)
def test_parse_lsn_refuses_bad_text(text):
    with pytest.raises(ConfigError, match="not an LSN") as info:
        parse_lsn(text)
    assert isinstance(info.value, CdcError)


@pytest.mark.parametrize("value", [-1, MAX_LSN + 1, -(1 << 64)])
def test_format_lsn_refuses_out_of_range(value):
    with pytest.raises(ValueError, match="out of range"):
        format_lsn(value)


@given(st.integers(0, MAX_LSN))
def test_a_protocol_error_writes_its_lsn_like_format_lsn(value):
    assert f"at LSN {format_lsn(value)})" in str(ProtocolError("bad", offset=3, lsn=value))


@given(st.integers(0, MAX_LSN))
def test_lsn_round_trip(value):
    text = format_lsn(value)
    assert parse_lsn(text) == value
    assert parse_lsn(text.lower()) == value
    high, low = text.split("/")
    assert text == text.upper()
    assert not (len(high) > 1 and high.startswith("0"))
    assert not (len(low) > 1 and low.startswith("0"))


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_lsn_halves(high, low):
    assert parse_lsn(f"{high:X}/{low:08x}") == (high << 32) | low


# -- backoff --------------------------------------------------------------------------------


def _bounds(monkeypatch, backoff: Backoff, n: int) -> list[tuple[float, float]]:
    calls: list[tuple[float, float]] = []

    def uniform(a: float, b: float) -> float:
        calls.append((a, b))
        return b

    monkeypatch.setattr(random, "uniform", uniform)
    for _ in range(n):
        delay = backoff.next_delay()
        assert delay == calls[-1][1]
    return calls


def test_backoff_ceiling_doubles_up_to_the_maximum(monkeypatch):
    b = Backoff(0.5, 30.0)
    calls = _bounds(monkeypatch, b, 9)
    assert [hi for _, hi in calls] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert all(lo == 0.25 for lo, _ in calls)
    assert b.attempts == 9


def test_backoff_reset_starts_over(monkeypatch):
    b = Backoff(0.5, 30.0)
    _bounds(monkeypatch, b, 5)
    b.reset()
    assert b.attempts == 0
    calls = _bounds(monkeypatch, b, 2)
    assert [hi for _, hi in calls] == [0.5, 1]


def test_backoff_survives_very_many_attempts(monkeypatch):
    b = Backoff(0.5, 30.0, attempts=10_000)
    [(lo, hi)] = _bounds(monkeypatch, b, 1)
    assert (lo, hi) == (0.25, 30.0)


@pytest.mark.parametrize(("minimum", "maximum"), [(0.5, 30.0), (0.1, 1.0), (2.0, 2.0)])
def test_backoff_delays_stay_within_bounds(minimum, maximum):
    random.seed(1202)
    b = Backoff(minimum, maximum)
    delays = [b.next_delay() for _ in range(200)]
    for attempt, delay in enumerate(delays):
        ceiling = min(maximum, minimum * 2**attempt)
        assert minimum / 2 <= delay <= ceiling
    assert max(delays) <= maximum
    # Jitter: the delays are not all the same once the ceiling is reached.
    assert len(set(delays[10:])) > 1
