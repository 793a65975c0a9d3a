"""Sans-I/O decoder for the ``pgoutput`` logical replication protocol, versions 1 to 4.

Contract:

* :func:`decode` takes the bytes of exactly one message (the payload of an XLogData
  message, or one row of ``pg_logical_slot_get_binary_changes``) and returns one frozen
  dataclass per message type. It does no I/O and keeps no state.
* The caller tracks the stream state: between Stream Start and Stream Stop it passes
  ``in_stream=True``, because there Relation, Type, Insert, Update, Delete, Truncate and
  Message carry a leading xid. The only thing inferred from the bytes is the Stream Abort
  form: abort_lsn/abort_time are read when the message is long enough to hold them (they
  are sent only by protocol v4 with ``streaming=parallel``, and nothing else marks them).
* Tuple values are not interpreted: ``bytes`` of the text form, :class:`BinaryValue` for
  the binary form, ``None`` for SQL NULL, :data:`UNCHANGED_TOAST` for a toasted value the
  UPDATE did not change. One exception, for memory: an Insert handed over as a
  ``memoryview`` of at least :data:`LARGE` bytes is decoded in place, and its text values of
  at least :data:`LARGE` bytes are ``memoryview`` slices of that buffer (no copy), so a
  50 MB payload is not held two or three times while it is published. Times are aware UTC
  datetimes, LSNs and xids plain ints.
* Malformed input (unknown tag, truncation, missing string terminator, unknown tuple column
  kind, invalid UTF-8, out-of-range timestamp, trailing bytes) raises
  :class:`~cdc.errors.ProtocolError` carrying the byte offset inside the message; no other
  exception escapes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeAlias

from cdc.errors import ProtocolError
from cdc.wire import slots
from cdc.wire.pgoutput_messages import (
    UNCHANGED_TOAST,
    Begin,
    BeginPrepare,
    BinaryValue,
    Column,
    Commit,
    CommitPrepared,
    Delete,
    Insert,
    LogicalMessage,
    Message,
    Origin,
    Prepare,
    Relation,
    RollbackPrepared,
    StreamAbort,
    StreamCommit,
    StreamPrepare,
    StreamStart,
    StreamStop,
    Truncate,
    TupleData,
    TypeMessage,
    UnchangedToast,
    Update,
)

#: The messages are part of this module's interface: callers write ``pgoutput.Insert``.
__all__ = [
    "LARGE", "UNCHANGED_TOAST", "Begin", "BeginPrepare", "BinaryValue", "Column", "Commit",
    "CommitPrepared", "Delete", "Insert", "LogicalMessage", "Message", "Origin", "Prepare",
    "Relation", "RollbackPrepared", "StreamAbort", "StreamCommit", "StreamPrepare", "StreamStart",
    "StreamStop", "Truncate", "TupleData", "TypeMessage", "UnchangedToast", "Update", "decode",
]

_PG_EPOCH: Final = datetime(2000, 1, 1, tzinfo=UTC)
#: Size from which an Insert message is decoded without copying, and a text value kept as a
#: view of the message (smaller ones are copied: bytes are cheaper to use downstream).
LARGE: Final = 1 << 20


class _Struct:
    """A fixed run of big-endian fields read with one precompiled ``struct.Struct``.

    ``spec`` is ``"name:code ..."`` in struct codes, plus ``t`` for a TimestampTz (Int64
    microseconds, returned as datetime) and, after all the others, ``z`` for NUL-terminated
    strings. Names and offsets are kept so that a short buffer is reported as the first
    field that does not fit, at the byte where it starts.
    """

    __slots__ = ("_fields", "_strings", "_times", "_unpack", "size", "what")

    def __init__(self, what: str, spec: str) -> None:
        parsed = [field.split(":") for field in spec.split()]
        self._strings = [name for name, code in parsed if code == "z"]
        fields = [(name, code) for name, code in parsed if code != "z"]
        codes = ["q" if code == "t" else code for _, code in fields]
        st = struct.Struct(">" + "".join(codes))
        self._unpack = st.unpack_from
        self.size = st.size
        self.what = what
        at = [struct.calcsize(">" + "".join(codes[:i])) for i in range(len(codes) + 1)]
        self._fields = [(name, at[i], at[i + 1]) for i, (name, _) in enumerate(fields)]
        self._times = [(i, name, at[i]) for i, (name, code) in enumerate(fields) if code == "t"]

    def read(self, buf: bytes | memoryview, pos: int, lsn: int | None) -> tuple[Any, ...]:
        """Unpack the fields at ``pos``; raise ProtocolError naming the first missing one."""
        try:
            values: tuple[Any, ...] = self._unpack(buf, pos)
        except struct.error:
            name, start, end = next(f for f in self._fields if pos + f[2] > len(buf))
            raise ProtocolError(
                f"truncated {self.what}: expected Int{8 * (end - start)} {name}, "
                f"{max(len(buf) - pos - start, 0)} of {end - start} bytes left",
                offset=min(pos + start, len(buf)),
                lsn=lsn,
            ) from None
        if self._times:
            out = list(values)
            for index, name, offset in self._times:
                micros = values[index]
                try:
                    out[index] = _PG_EPOCH + timedelta(microseconds=micros)
                except OverflowError:
                    raise ProtocolError(
                        f"{self.what}: {name} {micros} us after 2000-01-01 is out of range",
                        offset=pos + offset,
                        lsn=lsn,
                    ) from None
            values = tuple(out)
        return values

    def read_all(self, buf: bytes, pos: int, lsn: int | None) -> tuple[tuple[Any, ...], int]:
        """Like :meth:`read` plus the trailing strings; also return the offset after them."""
        values = self.read(buf, pos, lsn)
        pos += self.size
        for name in self._strings:
            text, pos = _string(buf, pos, f"{self.what} {name}", lsn)
            values = (*values, text)
        return values, pos


def _string(buf: bytes, pos: int, what: str, lsn: int | None) -> tuple[str, int]:
    end = buf.find(b"\0", pos)
    if end < 0:
        raise ProtocolError(
            f"truncated {what}: expected a NUL-terminated string",
            offset=min(pos, len(buf)),
            lsn=lsn,
        )
    try:
        return buf[pos:end].decode(), end + 1
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{what}: invalid UTF-8", offset=pos + exc.start, lsn=lsn) from None


def _bad_length(
    buf: bytes | memoryview, pos: int, length: int, what: str, lsn: int | None
) -> ProtocolError:
    """The error for a length-prefixed value at ``pos`` that is negative or overruns ``buf``."""
    if length < 0:
        return ProtocolError(f"{what}: negative length {length}", offset=pos - 4, lsn=lsn)
    return ProtocolError(
        f"truncated {what}: expected {length} bytes, {len(buf) - pos} left", offset=pos, lsn=lsn
    )


_XID: Final = _Struct("streamed change", "xid:I")
_NCOLS: Final = _Struct("tuple data", "column_count:H")
_LEN: Final = struct.Struct(">i")
_OID: Final = struct.Struct(">I").unpack_from
_T, _B, _N, _U = b"tbnu"


def _tuple(
    buf: bytes | memoryview, pos: int, what: str, lsn: int | None
) -> tuple[TupleData, int]:
    # The hot path: a text value costs one compare, one unpack and one slice; the bounds are
    # left to the unpack and the index (whose errors are turned into ProtocolError below).
    size = len(buf)
    if pos + 2 > size:
        _NCOLS.read(buf, pos, lsn)  # raises the truncation error
    ncols = buf[pos] << 8 | buf[pos + 1]
    pos += 2
    values: list[bytes | memoryview | UnchangedToast | BinaryValue | None] = []
    append = values.append
    unpack_len = _LEN.unpack_from
    view = type(buf) is memoryview
    index = 0
    try:
        for index in range(ncols):
            kind = buf[pos]
            if kind == _T:
                (length,) = unpack_len(buf, pos + 1)
                start = pos + 5
                pos = start + length
                if length < 0 or pos > size:
                    raise _bad_length(buf, start, length, f"{what} column {index} value", lsn)
                value = buf[start:pos]
                # Only a large message is a view; its small values are copied.
                append(value.tobytes() if view and length < LARGE else value)  # type: ignore[union-attr]
            elif kind == _N:
                append(None)
                pos += 1
            elif kind == _U:
                append(UNCHANGED_TOAST)
                pos += 1
            elif kind == _B:
                (length,) = unpack_len(buf, pos + 1)
                start = pos + 5
                pos = start + length
                if length < 0 or pos > size:
                    raise _bad_length(buf, start, length, f"{what} column {index} value", lsn)
                append(BinaryValue(bytes(buf[start:pos])))
            else:
                raise ProtocolError(
                    f"{what}: unknown kind {bytes((kind,))!r} of column {index}; "
                    "expected 'n', 'u', 't' or 'b'",
                    offset=pos,
                    lsn=lsn,
                )
    except IndexError:
        raise ProtocolError(
            f"truncated {what}: expected Byte1 kind of column {index}", offset=pos, lsn=lsn
        ) from None
    except struct.error:
        raise ProtocolError(
            f"truncated {what}: expected Int32 length of column {index}",
            offset=pos + 1,
            lsn=lsn,
        ) from None
    return tuple(values), pos


def _xid(buf: bytes | memoryview, in_stream: bool, lsn: int | None) -> tuple[int | None, int]:
    if not in_stream:
        return None, 1
    return _XID.read(buf, 1, lsn)[0], 5


_Decoder: TypeAlias = Callable[[bytes, bool, int | None], tuple[Message, int]]


def _fixed(cls: Callable[..., Message], what: str, spec: str, xid: bool = False) -> _Decoder:
    """Build the decoder of a message that is one layout, after the xid if ``xid`` is set."""
    layout = _Struct(what, spec)

    def decoder(buf: bytes, in_stream: bool, lsn: int | None) -> tuple[Message, int]:
        if not xid:
            values, end = layout.read_all(buf, 1, lsn)
            return cls(*values), end
        streamed_xid, pos = _xid(buf, in_stream, lsn)
        values, end = layout.read_all(buf, pos, lsn)
        return cls(streamed_xid, *values), end

    return decoder


def _relation(buf: bytes, in_stream: bool, lsn: int | None) -> tuple[Message, int]:
    xid, pos = _xid(buf, in_stream, lsn)
    (oid, namespace, name), pos = _REL_HEAD.read_all(buf, pos, lsn)
    identity, ncols = _REL_TAIL.read(buf, pos, lsn)
    pos += 3
    columns = []
    for _ in range(ncols):
        (flags, column_name), pos = _COL_HEAD.read_all(buf, pos, lsn)
        type_oid, type_modifier = _COL_TYPE.read(buf, pos, lsn)
        pos += 8
        columns.append(Column(flags, column_name, type_oid, type_modifier))
    return Relation(xid, oid, namespace, name, chr(identity), tuple(columns)), pos


def _change_head(
    buf: bytes | memoryview, in_stream: bool, lsn: int | None, layout: _Struct, allowed: bytes
) -> tuple[int | None, int, int, int]:
    """Read ``[xid] relation_oid submessage``; return (xid, oid, submessage, next offset)."""
    xid, pos = _xid(buf, in_stream, lsn)
    oid, kind = layout.read(buf, pos, lsn)
    if kind not in allowed:
        raise ProtocolError(
            f"{layout.what}: unexpected submessage {bytes((kind,))!r}; expected one of {allowed!r}",
            offset=pos + 4,
            lsn=lsn,
        )
    return xid, oid, kind, pos + 5


# Every event's Insert is built through its slots (cdc.wire.slots says why).
_set_xid, _set_oid, _set_new = slots.setters(Insert, "xid", "relation_oid", "new")


def _insert(buf: bytes | memoryview, in_stream: bool, lsn: int | None) -> tuple[Message, int]:
    if not in_stream and len(buf) > 5 and buf[5] == 0x4E:  # the common case, without calls
        xid, oid, pos = None, _OID(buf, 1)[0], 6
    else:
        xid, oid, _, pos = _change_head(buf, in_stream, lsn, _INSERT_HEAD, b"N")
    new, pos = _tuple(buf, pos, "Insert new tuple", lsn)
    msg = slots.new(Insert)
    _set_xid(msg, xid)
    _set_oid(msg, oid)
    _set_new(msg, new)
    return msg, pos


def _update(buf: bytes, in_stream: bool, lsn: int | None) -> tuple[Message, int]:
    xid, oid, kind, pos = _change_head(buf, in_stream, lsn, _UPDATE_HEAD, b"KON")
    old = key = None
    if kind != 0x4E:  # an 'O' or 'K' tuple first, then 'N'
        if kind == 0x4F:
            old, pos = _tuple(buf, pos, "Update old tuple", lsn)
        else:
            key, pos = _tuple(buf, pos, "Update key tuple", lsn)
        if _UPDATE_NEW.read(buf, pos, lsn) != (0x4E,):
            raise ProtocolError(
                f"Update: expected 'N' before the new tuple, got {buf[pos : pos + 1]!r}",
                offset=pos,
                lsn=lsn,
            )
        pos += 1
    new, pos = _tuple(buf, pos, "Update new tuple", lsn)
    return Update(xid, oid, old, key, new), pos


def _delete(buf: bytes, in_stream: bool, lsn: int | None) -> tuple[Message, int]:
    xid, oid, kind, pos = _change_head(buf, in_stream, lsn, _DELETE_HEAD, b"KO")
    if kind == 0x4F:  # 'O'
        old, pos = _tuple(buf, pos, "Delete old tuple", lsn)
        return Delete(xid, oid, old, None), pos
    key, pos = _tuple(buf, pos, "Delete key tuple", lsn)
    return Delete(xid, oid, None, key), pos


def _truncate(buf: bytes, in_stream: bool, lsn: int | None) -> tuple[Message, int]:
    xid, pos = _xid(buf, in_stream, lsn)
    nrels, options = _TRUNCATE_HEAD.read(buf, pos, lsn)
    pos += 5
    # Checked before unpacking so that a corrupt count cannot build a huge format.
    if pos + 4 * nrels > len(buf):
        raise _bad_length(buf, pos, 4 * nrels, "Truncate relation oids", lsn)
    oids = struct.unpack_from(f">{nrels}I", buf, pos)
    return Truncate(xid, options, oids), pos + 4 * nrels


def _message(buf: bytes, in_stream: bool, lsn: int | None) -> tuple[Message, int]:
    xid, pos = _xid(buf, in_stream, lsn)
    (flags, message_lsn, prefix), pos = _MESSAGE_HEAD.read_all(buf, pos, lsn)
    (length,) = _MESSAGE_LENGTH.read(buf, pos, lsn)
    pos += 4
    if length < 0 or pos + length > len(buf):
        raise _bad_length(buf, pos, length, "Message content", lsn)
    return LogicalMessage(xid, flags, message_lsn, prefix, buf[pos : pos + length]), pos + length


def _stream_abort(buf: bytes, in_stream: bool, lsn: int | None) -> tuple[Message, int]:
    # Only the length tells the v4 parallel form apart: the protocol has no flag for it.
    if len(buf) == 1 + _ABORT.size:
        xid, subxid = _ABORT.read(buf, 1, lsn)
        return StreamAbort(xid, subxid, None, None), len(buf)
    xid, subxid, abort_lsn, abort_time = _ABORT_V4.read(buf, 1, lsn)
    return StreamAbort(xid, subxid, abort_lsn, abort_time), 1 + _ABORT_V4.size


_REL_HEAD: Final = _Struct("Relation", "oid:I namespace:z name:z")
_REL_TAIL: Final = _Struct("Relation", "replica_identity:B column_count:H")
_COL_HEAD: Final = _Struct("Relation column", "flags:B name:z")
_COL_TYPE: Final = _Struct("Relation column", "type_oid:I type_modifier:i")
_INSERT_HEAD: Final = _Struct("Insert", "relation_oid:I submessage:B")
_UPDATE_HEAD: Final = _Struct("Update", "relation_oid:I submessage:B")
_UPDATE_NEW: Final = _Struct("Update", "new_tuple_marker:B")
_DELETE_HEAD: Final = _Struct("Delete", "relation_oid:I submessage:B")
_TRUNCATE_HEAD: Final = _Struct("Truncate", "relation_count:I options:B")
_MESSAGE_HEAD: Final = _Struct("Message", "flags:B lsn:Q prefix:z")
_MESSAGE_LENGTH: Final = _Struct("Message", "content_length:i")
_ABORT: Final = _Struct("Stream Abort", "xid:I subxid:I")
_ABORT_V4: Final = _Struct("Stream Abort", "xid:I subxid:I abort_lsn:Q abort_time:t")
_PREPARE: Final = "flags:B prepare_lsn:Q end_lsn:Q prepare_time:t xid:I gid:z"

_DECODERS: Final[dict[int, _Decoder]] = {
    ord("B"): _fixed(Begin, "Begin", "final_lsn:Q commit_time:t xid:I"),
    ord("C"): _fixed(Commit, "Commit", "flags:B commit_lsn:Q end_lsn:Q commit_time:t"),
    ord("O"): _fixed(Origin, "Origin", "commit_lsn:Q name:z"),
    ord("R"): _relation,
    ord("Y"): _fixed(TypeMessage, "Type", "oid:I namespace:z name:z", xid=True),
    ord("I"): _insert,
    ord("U"): _update,
    ord("D"): _delete,
    ord("T"): _truncate,
    ord("M"): _message,
    ord("S"): _fixed(StreamStart, "Stream Start", "xid:I first_segment:?"),
    ord("E"): _fixed(StreamStop, "Stream Stop", ""),
    ord("c"): _fixed(
        StreamCommit, "Stream Commit", "xid:I flags:B commit_lsn:Q end_lsn:Q commit_time:t"
    ),
    ord("A"): _stream_abort,
    ord("b"): _fixed(
        BeginPrepare, "Begin Prepare", "prepare_lsn:Q end_lsn:Q prepare_time:t xid:I gid:z"
    ),
    ord("P"): _fixed(Prepare, "Prepare", _PREPARE),
    ord("K"): _fixed(
        CommitPrepared,
        "Commit Prepared",
        "flags:B commit_lsn:Q end_lsn:Q commit_time:t xid:I gid:z",
    ),
    ord("r"): _fixed(
        RollbackPrepared,
        "Rollback Prepared",
        "flags:B prepare_end_lsn:Q rollback_end_lsn:Q prepare_time:t rollback_time:t xid:I gid:z",
    ),
    ord("p"): _fixed(StreamPrepare, "Stream Prepare", _PREPARE),
}
_TAGS: Final = "".join(sorted(chr(tag) for tag in _DECODERS))


def decode(
    buf: bytes | bytearray | memoryview, *, in_stream: bool = False, lsn: int | None = None
) -> Message:
    """Decode exactly one pgoutput message.

    ``in_stream`` must be true between Stream Start and Stream Stop, where changes carry a
    leading xid. ``lsn`` is the message's WAL position, used only to make errors point at
    it. Raises :class:`~cdc.errors.ProtocolError` if ``buf`` is not exactly one message.
    """
    if type(buf) is memoryview and len(buf) >= LARGE and buf[0] == 0x49:  # a large Insert
        message, end = _insert(buf, in_stream, lsn)
        if end != len(buf):
            raise ProtocolError(
                f"{len(buf) - end} trailing byte(s) after a complete Insert", offset=end, lsn=lsn
            )
        return message
    data = buf if type(buf) is bytes else bytes(buf)
    if not data:
        raise ProtocolError("empty message: expected a Byte1 message tag", offset=0, lsn=lsn)
    decoder = _DECODERS.get(data[0])
    if decoder is None:
        raise ProtocolError(
            f"unknown message tag {data[:1]!r}; expected one of {_TAGS!r}", offset=0, lsn=lsn
        )
    message, end = decoder(data, in_stream, lsn)
    if end != len(data):
        raise ProtocolError(
            f"{len(data) - end} trailing byte(s) after a complete {type(message).__name__}",
            offset=end,
            lsn=lsn,
        )
    return message
