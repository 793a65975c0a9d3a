"""AMQP 0-9-1 frames for the confirm-mode publish path, sans-I/O.

Contract:

* :func:`publish_frames` returns the bytes of one ``Basic.Publish`` (mandatory) method
  frame, its content header frame and its body frames split at ``frame_max``, ready to be
  written in one go. :func:`properties_block` encodes the content-header property list.
  Both produce exactly the bytes pamqp produces for the same message (a unit test compares
  them), but without building pamqp objects: that is where a naive client spends most of
  its time per message.
* :class:`FrameReader` splits a received byte stream into ``(type, channel, payload)``
  frames, whatever the chunking. :func:`parse_confirm` reads ``Basic.Ack``/``Basic.Nack``
  payloads by hand (the frequent frames); everything else is decoded with pamqp by
  :func:`decode_method`, and :func:`method_frame` encodes the rare methods with pamqp.
* :func:`start_ok` and :func:`tune_ok` answer the broker's side of the handshake;
  :class:`ReturnReader` puts a returned message (``Basic.Return``, its content header,
  its body frames) together into one :class:`Returned`.
* Malformed input raises :class:`~cdc.errors.SinkError` (the broker connection is then
  dropped and the relay starts a new session); nothing here does I/O.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from pamqp import base, commands, encode, frame, header

from cdc.errors import SinkError

PROTOCOL_HEADER: Final = b"AMQP\x00\x00\x09\x01"
HEARTBEAT: Final = b"\x08\x00\x00\x00\x00\x00\x00\xce"

METHOD: Final = 1
CONTENT_HEADER: Final = 2
BODY: Final = 3
HEARTBEAT_TYPE: Final = 8
_FRAME_END: Final = 0xCE
_END: Final = b"\xce"

_FRAME_HEAD: Final = struct.Struct(">BHI")
_CONTENT_HEAD: Final = struct.Struct(">HHQ")
_U32: Final = struct.Struct(">I")
_U64: Final = struct.Struct(">Q")
_CONFIRM: Final = struct.Struct(">IQB")
_BASIC_CLASS: Final = 60
#: class id << 16 | method id, as they open a method frame's payload.
ACK: Final = 0x003C0050
NACK: Final = 0x003C0078
_PUBLISH_HEAD: Final = b"\x00\x3c\x00\x28\x00\x00"  # Basic.Publish, reserved ticket 0
_MANDATORY: Final = b"\x01"

# Property flags of Basic.Properties, in the order the values follow the flags.
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE = 1 << 15, 1 << 13, 1 << 12
_MESSAGE_ID, _TIMESTAMP, _TYPE = 1 << 7, 1 << 6, 1 << 5


def _shortstr(text: str) -> bytes:
    data = text.encode()
    if len(data) > 255:
        raise ValueError(f"AMQP short string longer than 255 bytes: {text[:40]!r}...")
    return bytes((len(data),)) + data


# For each set of header keys seen so far (in the order of the dict: a handful of sets in
# practice, the relay's own keys plus those of the rows' headers): the keys sorted, each with
# its encoded name and string tag, and its whole entry for a None value. Encoded once per
# set, not once per message. None for a set with a name over 128 bytes: pamqp truncates
# those, so such a table is left to it for the bytes to stay identical.
_Shape = tuple[tuple[str, bytes, bytes], ...]
_SHAPES: dict[tuple[str, ...], _Shape | None] = {}
_MAX_KEYS = 4096


def _shape(keys: tuple[str, ...]) -> _Shape | None:
    names = [(key, key.encode()) for key in sorted(keys)]
    shape = None
    if all(len(name) <= 128 for _, name in names):
        prefixes = [(key, bytes((len(name),)) + name) for key, name in names]
        shape = tuple((key, prefix + b"S", prefix + b"V") for key, prefix in prefixes)
    if len(_SHAPES) < _MAX_KEYS:
        _SHAPES[keys] = shape
    return shape


# The last string value of each header name and its encoded table entry. commit_lsn and
# commit_time are the same for every row of a transaction and aggregate_type mostly repeats:
# their entries are encoded once, not once per message. Short values only, so a big header
# value is not kept alive here.
_ENTRIES: dict[str, tuple[str, bytes]] = {}
_MAX_CACHED_VALUE = 256


def _table(headers: Mapping[str, Any]) -> bytes:
    """A field table; plain strings and None fast, anything else through pamqp."""
    keys = tuple(headers)
    try:
        shape = _SHAPES[keys]
    except KeyError:
        shape = _shape(keys)
    if shape is None:
        return encode.field_table(dict(headers))
    parts: list[bytes] = []
    append = parts.append
    entries = _ENTRIES
    for key, string, null in shape:
        value = headers[key]
        if type(value) is str:
            last = entries.get(key)
            if last is not None and last[0] == value:
                append(last[1])
                continue
            data = value.encode()
            entry = b"".join((string, _U32.pack(len(data)), data))
            if len(value) <= _MAX_CACHED_VALUE and (last is not None or len(entries) < _MAX_KEYS):
                entries[key] = (value, entry)
            append(entry)
        elif value is None:
            append(null)
        else:
            return encode.field_table(dict(headers))
    body = b"".join(parts)
    return _U32.pack(len(body)) + body


_OCTETS: Final = tuple(bytes((i,)) for i in range(256))

# Encoded content types and message types (the event types: a few dozen in practice).
_NAMES: dict[str, bytes] = {}


def _name(text: str) -> bytes:
    encoded = _shortstr(text)
    if len(_NAMES) < _MAX_KEYS:
        _NAMES[text] = encoded
    return encoded


def properties_block(
    *,
    content_type: str,
    delivery_mode: int,
    headers: Mapping[str, Any],
    message_id: str,
    message_type: str | None,
    timestamp: datetime | None,
) -> bytes:
    """Property flags and values of a content header, byte for byte as pamqp encodes them.

    Only the properties the relay sets; an empty string or ``None`` leaves a property out
    (as pamqp does). ``timestamp`` becomes whole seconds since the Unix epoch.
    """
    flags = _CONTENT_TYPE | _HEADERS | _DELIVERY_MODE
    content = _NAMES.get(content_type) or _name(content_type)
    parts = [b"", content, _table(headers), _OCTETS[delivery_mode]]
    if message_id:
        flags |= _MESSAGE_ID
        data = message_id.encode()  # _shortstr, inline: once per message, it shows
        if len(data) > 255:
            raise ValueError(f"AMQP short string longer than 255 bytes: {message_id[:40]!r}...")
        parts.append(_OCTETS[len(data)] + data)
    if timestamp is not None:
        flags |= _TIMESTAMP
        if timestamp.tzinfo is None:  # pamqp reads a naive datetime as UTC
            timestamp = timestamp.replace(tzinfo=UTC)
        parts.append(int(timestamp.timestamp()).to_bytes(8, "big"))
    if message_type:
        flags |= _TYPE
        parts.append(_NAMES.get(message_type) or _name(message_type))
    parts[0] = flags.to_bytes(2, "big")
    return b"".join(parts)


_PUBLISH_METHODS: dict[tuple[str, str], bytes] = {}


def _publish_method(channel: int, exchange: str, routing_key: str) -> bytes:
    method = _PUBLISH_HEAD + _shortstr(exchange) + _shortstr(routing_key) + _MANDATORY
    frame_bytes = _FRAME_HEAD.pack(METHOD, channel, len(method)) + method + _END
    if channel == 1 and len(_PUBLISH_METHODS) < _MAX_KEYS:
        _PUBLISH_METHODS[exchange, routing_key] = frame_bytes
    return frame_bytes


#: The frames of one publish: one bytes object, or for a body of at least LARGE_BODY bytes
#: the pieces in order (the body's frames are views of it: a large body is never copied).
Frames = bytes | tuple[bytes | memoryview, ...]
LARGE_BODY = 1 << 20


def publish_frames(
    channel: int,
    exchange: str,
    routing_key: str,
    props: bytes,
    body: bytes | memoryview,
    frame_max: int,
) -> Frames:
    """One mandatory ``Basic.Publish`` with its content header and body frames."""
    method = (channel == 1 and _PUBLISH_METHODS.get((exchange, routing_key))) or _publish_method(
        channel, exchange, routing_key
    )
    size = len(body)
    head = _FRAME_HEAD.pack(CONTENT_HEADER, channel, 12 + len(props))
    content = _CONTENT_HEAD.pack(_BASIC_CLASS, 0, size)
    chunk = frame_max - 8  # frame header and end byte count against frame_max
    if size <= chunk:
        if not size:
            return b"".join((method, head, content, props, _END))
        body_head = _FRAME_HEAD.pack(BODY, channel, size)
        return b"".join((method, head, content, props, _END, body_head, body, _END))
    parts: list[bytes | memoryview] = [method, head, content, props, _END]
    view = memoryview(body)
    for start in range(0, size, chunk):
        piece = view[start : start + chunk]
        parts += (_FRAME_HEAD.pack(BODY, channel, len(piece)), piece, _END)
    return tuple(parts) if size >= LARGE_BODY else b"".join(parts)


def method_frame(channel: int, method: base.Frame) -> bytes:
    """Encode a (rare) method frame with pamqp."""
    return frame.marshal(method, channel)


def parse_confirm(payload: bytes) -> tuple[int, int, bool, bool]:
    """``(class_method, delivery_tag, multiple, requeue)`` of a Basic.Ack/Nack payload."""
    try:
        kind, tag, bits = _CONFIRM.unpack_from(payload)
    except struct.error:
        raise SinkError(f"truncated Basic.Ack/Nack from the broker: {payload!r}") from None
    return kind, tag, bool(bits & 1), bool(bits & 2)


def method_id(payload: bytes) -> int:
    """The ``class << 16 | method`` that opens a method frame payload."""
    if len(payload) < 4:
        raise SinkError(f"method frame too short: {payload!r}")
    return int(_U32.unpack_from(payload)[0])


def decode_method(channel: int, payload: bytes) -> base.Frame:
    """Decode a method frame payload with pamqp."""
    raw = _FRAME_HEAD.pack(METHOD, channel, len(payload)) + payload + _END
    try:
        _, _, value = frame.unmarshal(raw)
    except Exception as exc:
        raise SinkError(f"undecodable method frame from the broker: {exc}") from exc
    if not isinstance(value, base.Frame):  # pragma: no cover - unmarshal of a method frame
        raise SinkError(f"expected a method frame, got {value!r}")
    return value


def decode_header(payload: bytes) -> header.ContentHeader:
    """Decode a content header payload (a returned message's properties) with pamqp."""
    value = header.ContentHeader()
    try:
        value.unmarshal(payload)
    except Exception as exc:
        raise SinkError(f"undecodable content header from the broker: {exc}") from exc
    return value


class FrameReader:
    """Split received bytes into frames; feed it whole or one byte at a time."""

    __slots__ = ("_buf", "_frame_max")

    def __init__(self, frame_max: int = 131072) -> None:
        self._buf = bytearray()
        self._frame_max = frame_max

    def set_frame_max(self, frame_max: int) -> None:
        """Accept frames up to the size negotiated in Connection.Tune."""
        self._frame_max = frame_max

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Append ``data``; return every frame now complete as ``(type, channel, payload)``."""
        buf = self._buf
        buf += data
        if buf[:4] == b"AMQP":
            raise SinkError(f"the broker does not speak AMQP 0-9-1 (it sent {bytes(buf[:8])!r})")
        out = []
        pos, size = 0, len(buf)
        unpack = _FRAME_HEAD.unpack_from
        while size - pos >= 8:
            kind, channel, length = unpack(buf, pos)
            if length > self._frame_max:
                raise SinkError(f"frame of {length} bytes exceeds frame_max {self._frame_max}")
            end = pos + 7 + length
            if end >= size:
                break
            if buf[end] != _FRAME_END:
                raise SinkError(f"bad frame end byte {buf[end]:#x} from the broker")
            out.append((kind, channel, bytes(buf[pos + 7 : end])))
            pos = end + 1
        if pos:
            del buf[:pos]
        return out



#: What the relay (and a worker's consuming channel) tells the broker it is and understands.
CLIENT_PROPERTIES: Final[dict[str, Any]] = {
    "product": "outbox-cdc",
    "capabilities": {
        "publisher_confirms": True,
        "basic.nack": True,
        "connection.blocked": True,
        "authentication_failure_close": True,
        "consumer_cancel_notify": True,
    },
}


def start_ok(start: base.Frame, user: str, password: str) -> commands.Connection.StartOk:
    """The PLAIN login answering ``Connection.Start``; SinkError if the broker has no PLAIN."""
    if not isinstance(start, commands.Connection.Start):
        raise SinkError(f"expected Connection.Start from the broker, got {start.name}")
    if b"PLAIN" not in (start.mechanisms or "").encode().split():
        raise SinkError(f"the broker offers no PLAIN login ({start.mechanisms})")
    return commands.Connection.StartOk(
        client_properties=CLIENT_PROPERTIES,
        mechanism="PLAIN",
        response=f"\0{user}\0{password}",
    )


def tune_ok(tune: base.Frame, frame_max: int, heartbeat: int) -> commands.Connection.TuneOk:
    """The answer to ``Connection.Tune``: the broker's frame_max, at most ``frame_max``."""
    if not isinstance(tune, commands.Connection.Tune):
        raise SinkError(f"expected Connection.Tune from the broker, got {tune.name}")
    size = min(tune.frame_max or frame_max, frame_max)
    return commands.Connection.TuneOk(
        channel_max=tune.channel_max, frame_max=size, heartbeat=heartbeat
    )


@dataclass(frozen=True, slots=True)
class Returned:
    """A message the broker returned: where it was published, its id, and why."""

    exchange: str
    routing_key: str
    message_id: str
    reply_code: int
    reply_text: str


class ReturnReader:
    """A returned message from its frames: ``Basic.Return``, content header, body frames."""

    __slots__ = ("_left", "_method")

    def __init__(self) -> None:
        self._method: commands.Basic.Return | None = None
        self._left = 0

    def start(self, method: commands.Basic.Return) -> None:
        """A ``Basic.Return`` arrived: its content frames follow."""
        self._method, self._left = method, -1

    def content(self, kind: int, payload: bytes) -> Returned | None:
        """Take a content frame; the :class:`Returned` once its header is in, else None."""
        method = self._method
        if method is None:
            raise SinkError("content frame outside a returned message")
        returned = None
        if kind == CONTENT_HEADER:
            content = decode_header(payload)
            returned = Returned(
                method.exchange or "",
                method.routing_key or "",
                content.properties.message_id or "",
                method.reply_code or 0,
                method.reply_text or "",
            )
            self._left = content.body_size
        else:
            self._left -= len(payload)
        if self._left <= 0:
            self._method = None
        return returned
