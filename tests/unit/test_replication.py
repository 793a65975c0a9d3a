"""The streaming-replication sub-protocol (cdc/wire/replication.py) from and to bytes.

PostgreSQL "Streaming Replication Protocol": inside COPY BOTH the server sends XLogData
('w' + Int64 walStart + Int64 walEnd + Int64 sendTime + data) and Primary keepalive
('k' + Int64 walEnd + Int64 sendTime + Byte1 reply); the client sends Standby status
update ('r' + Int64 written + Int64 flushed + Int64 applied + Int64 clock + Byte1 reply).
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest

from cdc.core.lsn import parse_lsn
from cdc.errors import ProtocolError
from cdc.wire.replication import (
    PG_EPOCH,
    Keepalive,
    XLogData,
    create_slot_command,
    parse_copy_data,
    pgoutput_version,
    standby_status,
    start_replication_command,
    unix_us_to_pg,
)

NOW_PG_US = 849_551_757_123_456  # 2026-12-02 18:35:57.123456 UTC in PostgreSQL's epoch
BEGIN = b"B" + struct.pack(">QqI", parse_lsn("0/16B3748"), NOW_PG_US, 735)


def xlogdata(start: int, end: int, sent: int, payload: bytes) -> bytes:
    return b"w" + struct.pack(">qqq", start, end, sent) + payload


def keepalive(end: int, sent: int, reply: int) -> bytes:
    return b"k" + struct.pack(">qqB", end, sent, reply)


# -- XLogData -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "payload"),
    [
        (parse_lsn("0/16B3748"), parse_lsn("0/16B3790"), BEGIN),
        (parse_lsn("16/B374D848"), parse_lsn("16/B374D848"), b"C" + bytes(25)),
        (0, 0, b""),  # an empty XLogData is legal framing
        ((1 << 63) - 1, (1 << 63) - 1, b"\xff" * 3),
    ],
    ids=["begin", "commit", "empty", "max"],
)
@pytest.mark.parametrize("as_view", [False, True], ids=["bytes", "memoryview"])
def test_xlogdata_is_parsed(start, end, payload, as_view):
    frame = xlogdata(start, end, NOW_PG_US, payload)
    msg = parse_copy_data(memoryview(frame) if as_view else frame)
    assert isinstance(msg, XLogData)
    assert (msg.wal_start, msg.wal_end, msg.send_time_us) == (start, end, NOW_PG_US)
    assert isinstance(msg.payload, memoryview)
    assert bytes(msg.payload) == payload


def test_xlogdata_lsns_above_2_63_are_unsigned():
    lsn = parse_lsn("FFFFFFFF/FFFFFF00")
    frame = b"w" + struct.pack(">QQq", lsn, lsn + 0x10, -1) + BEGIN
    msg = parse_copy_data(frame)
    assert msg.wal_start == lsn
    assert msg.wal_end == lsn + 0x10
    assert msg.send_time_us == -1  # TimestampTz is signed


def test_xlogdata_payload_is_a_view_without_a_copy():
    frame = bytearray(xlogdata(1, 2, 3, BEGIN))
    msg = parse_copy_data(frame)
    frame[25] = ord("X")
    assert bytes(msg.payload[:1]) == b"X"


@pytest.mark.parametrize("length", range(1, 25))
def test_truncated_xlogdata_header_is_a_protocol_error(length):
    frame = xlogdata(parse_lsn("0/16B3748"), parse_lsn("0/16B3790"), NOW_PG_US, BEGIN)
    with pytest.raises(ProtocolError, match="truncated XLogData header") as info:
        parse_copy_data(frame[:length])
    assert info.value.offset == length
    assert info.value.lsn is None


# -- keepalive ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("end", "sent", "reply", "requested"),
    [
        (parse_lsn("0/16B3790"), NOW_PG_US, 0, False),
        (parse_lsn("0/16B3790"), NOW_PG_US, 1, True),
        (0, 0, 0, False),
        ((1 << 63) - 1, -5, 1, True),
    ],
    ids=["no-reply", "reply", "zero", "extremes"],
)
def test_keepalive_is_parsed(end, sent, reply, requested):
    msg = parse_copy_data(keepalive(end, sent, reply))
    assert msg == Keepalive(end, sent, requested)


@pytest.mark.parametrize("length", range(1, 18))
def test_truncated_keepalive_is_a_protocol_error_with_offset(length):
    frame = keepalive(parse_lsn("0/16B3790"), NOW_PG_US, 1)
    with pytest.raises(ProtocolError, match="keepalive must be 18 bytes") as info:
        parse_copy_data(frame[:length])
    assert info.value.offset == length


def test_overlong_keepalive_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="got 19") as info:
        parse_copy_data(keepalive(1, 2, 0) + b"\0")
    assert info.value.offset == 18


@pytest.mark.parametrize(
    "frame",
    [b"r" + bytes(33), b"K" + bytes(17), b"W" + bytes(24), b"\x00", b"d"],
    ids=["status-update", "upper-k", "upper-w", "nul", "copy-data-tag"],
)
def test_unknown_tag_is_a_protocol_error_at_offset_0(frame):
    with pytest.raises(ProtocolError, match="unknown replication message tag") as info:
        parse_copy_data(frame)
    assert info.value.offset == 0


def test_empty_copy_data_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="empty") as info:
        parse_copy_data(b"")
    assert info.value.offset == 0


# -- standby status update ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lsn", "now_us", "reply", "expected_hex"),
    [
        (
            parse_lsn("0/16B3790"),
            NOW_PG_US,
            False,
            "72"
            + "00000000016b3790" * 3
            + struct.pack(">q", NOW_PG_US).hex()
            + "00",
        ),
        (
            parse_lsn("16/B374D848"),
            1,
            True,
            "72" + "00000016b374d848" * 3 + "0000000000000001" + "01",
        ),
        (0, 0, False, "72" + "00" * 32 + "00"),
        ((1 << 64) - 1, -1, False, "72" + "ff" * 32 + "00"),
    ],
    ids=["typical", "reply", "zero", "max-lsn-negative-clock"],
)
def test_standby_status_exact_bytes(lsn, now_us, reply, expected_hex):
    out = standby_status(lsn, now_us, reply=reply)
    assert isinstance(out, bytes)
    assert len(out) == 34
    assert out.hex() == expected_hex
    tag, written, flushed, applied, clock, flag = struct.unpack(">cQQQqB", out)
    assert tag == b"r"
    assert written == flushed == applied == lsn
    assert (clock, flag) == (now_us, int(reply))


def test_standby_status_reply_defaults_to_off():
    assert standby_status(5, 6)[-1:] == b"\x00"


# -- clocks ---------------------------------------------------------------------------------


def test_clock_conversions():
    moment = datetime(2026, 12, 2, 18, 35, 57, 123456, tzinfo=UTC)
    unix_us = int(moment.timestamp()) * 1_000_000 + moment.microsecond
    assert unix_us_to_pg(unix_us) == NOW_PG_US
    assert PG_EPOCH + timedelta(microseconds=NOW_PG_US) == moment
    assert datetime(2000, 1, 1, tzinfo=UTC) == PG_EPOCH
    assert unix_us_to_pg(946_684_800_000_000) == 0


# -- protocol negotiation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_version", "proto"),
    [
        (100023, 1),
        (130014, 1),
        (139999, 1),
        (140000, 2),
        (140011, 2),
        (150000, 3),
        (150007, 3),
        (160000, 4),
        (160003, 4),
        (170002, 4),
        (180000, 4),
    ],
)
def test_pgoutput_version_per_server_version(server_version, proto):
    assert pgoutput_version(server_version) == proto


@pytest.mark.parametrize(
    ("slot", "publication", "proto", "expected"),
    [
        (
            "cdc_outbox",
            "cdc_outbox",
            1,
            "START_REPLICATION SLOT \"cdc_outbox\" LOGICAL 0/0 "
            "(proto_version '1', publication_names '\"cdc_outbox\"')",
        ),
        (
            "relay_2",
            "Outbox$Pub",
            4,
            "START_REPLICATION SLOT \"relay_2\" LOGICAL 0/0 "
            "(proto_version '4', publication_names '\"Outbox$Pub\"')",
        ),
        (
            # Not reachable through the settings model, but quoting must still hold.
            'we"ird',
            "it's",
            2,
            "START_REPLICATION SLOT \"we\"\"ird\" LOGICAL 0/0 "
            "(proto_version '2', publication_names '\"it''s\"')",
        ),
    ],
    ids=["default", "mixed-case", "hostile"],
)
def test_start_replication_command(slot, publication, proto, expected):
    command = start_replication_command(slot, publication, proto)
    assert isinstance(command, bytes)
    assert command.decode() == expected


def test_start_replication_asks_for_neither_streaming_nor_two_phase():
    command = start_replication_command("cdc_outbox", "cdc_outbox", 4).decode()
    for option in ("streaming", "two_phase", "binary", "messages", "origin"):
        assert option not in command
    assert command.startswith("START_REPLICATION SLOT ")
    assert " LOGICAL 0/0 " in command  # 0/0: resume at the slot's confirmed_flush_lsn
    assert ";" not in command


@pytest.mark.parametrize(
    ("slot", "failover", "expected"),
    [
        ("cdc_outbox", False,
         "CREATE_REPLICATION_SLOT \"cdc_outbox\" LOGICAL pgoutput (SNAPSHOT 'export')"),
        ("cdc_outbox", True,
         "CREATE_REPLICATION_SLOT \"cdc_outbox\" LOGICAL pgoutput "
         "(SNAPSHOT 'export', FAILOVER true)"),
        ('we"ird', False,
         "CREATE_REPLICATION_SLOT \"we\"\"ird\" LOGICAL pgoutput (SNAPSHOT 'export')"),
    ],
    ids=["default", "failover", "hostile"],
)
def test_create_slot_command(slot, failover, expected):
    command = create_slot_command(slot, failover=failover)
    assert isinstance(command, bytes)
    assert command.decode() == expected
    assert ";" not in command.decode()
