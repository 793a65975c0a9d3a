"""The streaming-replication sub-protocol carried inside COPY BOTH, sans-I/O.

Server to client: XLogData (``'w'``) and Primary keepalive (``'k'``) messages.
Client to server: Standby status update (``'r'``).
Functions here only turn bytes into frozen dataclasses and back; the socket lives in
``cdc/shell/source.py``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import UTC, datetime

from cdc.errors import ProtocolError
from cdc.wire import slots

#: PostgreSQL timestamps count microseconds from 2000-01-01 UTC.
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_UNIX_US = 946_684_800_000_000

_XLOG_HEADER = struct.Struct("!QQq")
_KEEPALIVE = struct.Struct("!QqB")
_STATUS = struct.Struct("!cQQQqB")


@dataclass(frozen=True, slots=True)
class XLogData:
    """A chunk of WAL data: here, exactly one pgoutput message."""

    wal_start: int
    wal_end: int
    send_time_us: int
    payload: memoryview


@dataclass(frozen=True, slots=True)
class Keepalive:
    """The server's heartbeat; ``reply_requested`` means answer at once or be timed out."""

    wal_end: int
    send_time_us: int
    reply_requested: bool


# Every event's XLogData is built through its slots (cdc.wire.slots says why).
_set_start, _set_end, _set_sent, _set_payload = slots.setters(
    XLogData, "wal_start", "wal_end", "send_time_us", "payload"
)


def parse_copy_data(buf: bytes | memoryview) -> XLogData | Keepalive:
    """Decode one CopyData payload received during START_REPLICATION."""
    view = memoryview(buf)
    if not view:
        raise ProtocolError("empty CopyData message", offset=0)
    tag = view[0]
    if tag == 0x77:  # 'w'
        if len(view) < 1 + _XLOG_HEADER.size:
            raise ProtocolError("truncated XLogData header", offset=len(view))
        start, end, sent = _XLOG_HEADER.unpack_from(view, 1)
        msg = slots.new(XLogData)
        _set_start(msg, start)
        _set_end(msg, end)
        _set_sent(msg, sent)
        _set_payload(msg, view[1 + _XLOG_HEADER.size :])
        return msg
    if tag == 0x6B:  # 'k'
        if len(view) != 1 + _KEEPALIVE.size:
            raise ProtocolError(
                f"keepalive must be {1 + _KEEPALIVE.size} bytes, got {len(view)}",
                offset=min(len(view), 1 + _KEEPALIVE.size),
            )
        end, sent, reply = _KEEPALIVE.unpack_from(view, 1)
        return Keepalive(end, sent, bool(reply))
    raise ProtocolError(f"unknown replication message tag {chr(tag)!r}", offset=0)


def standby_status(lsn: int, now_us: int, *, reply: bool = False) -> bytes:
    """Encode a Standby status update reporting ``lsn`` as written, flushed and applied.

    The relay has no separate write/apply stages: everything up to ``lsn`` is durable in
    the broker, so all three positions are the same watermark.
    """
    return _STATUS.pack(b"r", lsn, lsn, lsn, now_us, 1 if reply else 0)


def unix_us_to_pg(unix_us: int) -> int:
    """Convert microseconds since the Unix epoch to PostgreSQL's epoch."""
    return unix_us - _PG_EPOCH_UNIX_US


def pgoutput_version(server_version: int) -> int:
    """The highest pgoutput ``proto_version`` a server of ``server_version_num`` speaks."""
    if server_version >= 160000:
        return 4
    if server_version >= 150000:
        return 3
    if server_version >= 140000:
        return 2
    return 1


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def start_replication_command(slot: str, publication: str, proto_version: int) -> bytes:
    """Build START_REPLICATION for the simple query protocol (it takes no parameters).

    Names arrive validated by the settings model and are quoted here anyway. Streaming of
    in-progress transactions and two-phase decoding stay off on purpose: then the server
    sends each transaction whole, after its commit (COMMIT PREPARED for 2PC), which is
    exactly the "only committed transactions" rule of the contract.
    """
    options = ", ".join(
        [
            f"proto_version {_quote_literal(str(proto_version))}",
            f"publication_names {_quote_literal(_quote_ident(publication))}",
        ]
    )
    return f"START_REPLICATION SLOT {_quote_ident(slot)} LOGICAL 0/0 ({options})".encode()


#: Asks a walsender for the system identifier, timeline, WAL position and database.
IDENTIFY_SYSTEM = b"IDENTIFY_SYSTEM"


def create_slot_command(slot: str, *, failover: bool = False) -> bytes:
    """Build CREATE_REPLICATION_SLOT for a pgoutput slot that exports its snapshot.

    The exported snapshot is the slot's starting point as a transaction snapshot: a
    transaction that imports it sees exactly the rows committed before the first change the
    slot will stream. ``failover`` (PostgreSQL 17+) lets the slot be synchronized to
    standbys. The option-list syntax needs PostgreSQL 15+.
    """
    options = ["SNAPSHOT 'export'"]
    if failover:
        options.append("FAILOVER true")
    return (
        f"CREATE_REPLICATION_SLOT {_quote_ident(slot)} LOGICAL pgoutput ({', '.join(options)})"
    ).encode()
