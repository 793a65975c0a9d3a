"""AMQP deliveries from their frames, sans-I/O: ``Basic.Deliver``, content header, body.

Contract:

* :class:`DeliveryReader` takes the frames of a consuming channel that belong to
  deliveries: :meth:`~DeliveryReader.start` with a ``Basic.Deliver`` method payload, then
  :meth:`~DeliveryReader.content` with each content frame, which returns the
  :class:`Delivered` once its body is complete.
* ``Basic.Deliver`` and the content header are read by hand: they come with every message,
  and pamqp's generic decoding cost more than all the rest of a delivery's handling. The
  properties are still pamqp's ``Basic.Properties``, with the values pamqp would decode
  (a unit test compares them), so a copy of the message carries them unchanged; header
  values other than strings go through pamqp's own decoder.
* Malformed input raises :class:`~cdc.errors.SinkError` (the connection is then dropped and
  the broker redelivers what was not acked); nothing here does I/O.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from pamqp import decode
from pamqp.commands import Basic

from cdc.errors import SinkError
from cdc.wire.amqp import ACK, BODY, CONTENT_HEADER, decode_header

#: class id << 16 | method id of Basic.Deliver.
DELIVER: Final = 0x003C003C
_TAG_AND_BITS: Final = struct.Struct(">QB")
_ACK_FRAME: Final = struct.Struct(">BHIIQBB")
_ACK_PAYLOAD: Final = 13  # class, method (4 bytes), delivery tag (8), bits (1)
_FRAME_END: Final = 0xCE
_HEADER: Final = struct.Struct(">HHQH")  # class, weight, body size, property flags
_U32: Final = struct.Struct(">I")
_LONG_STRING: Final = 0x53  # "S": a header value's type
_SHORT, _TABLE, _OCTET, _TIMESTAMP = range(4)
_KINDS = {"shortstr": _SHORT, "table": _TABLE, "octet": _OCTET, "timestamp": _TIMESTAMP}
_ABSENT = Basic.Properties()  # what pamqp leaves in a property the header does not carry
#: Basic.Properties in wire order: name, flag bit, value kind, value when absent.
_LAYOUT: Final = tuple(
    (
        name,
        Basic.Properties.flags[name],
        _KINDS[getattr(Basic.Properties, "_" + name)],
        getattr(_ABSENT, name),
    )
    for name in Basic.Properties.__slots__
)


class Delivered(NamedTuple):
    """One message as the broker delivered it.

    A named tuple rather than a frozen dataclass: one is made for every message, and a
    tuple is the cheapest to build."""

    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str
    properties: Basic.Properties
    body: bytes


def ack_frame(channel: int, delivery_tag: int, multiple: bool) -> bytes:
    """The bytes of a ``Basic.Ack`` method frame."""
    return _ACK_FRAME.pack(
        1, channel, _ACK_PAYLOAD, ACK, delivery_tag, int(multiple), _FRAME_END
    )


def _shortstr(payload: bytes, pos: int) -> tuple[str, int]:
    size = payload[pos]
    end = pos + 1 + size
    if end > len(payload):
        raise IndexError(pos)
    return payload[pos + 1 : end].decode(), end


class _Deliver(NamedTuple):
    consumer_tag: str
    delivery_tag: int
    redelivered: bool
    exchange: str
    routing_key: str


def parse_deliver(payload: bytes) -> _Deliver:
    """The arguments of a ``Basic.Deliver`` method payload."""
    try:
        tag, pos = _shortstr(payload, 4)
        delivery_tag, bits = _TAG_AND_BITS.unpack_from(payload, pos)
        exchange, pos = _shortstr(payload, pos + 9)
        key, pos = _shortstr(payload, pos)
    except (IndexError, struct.error, UnicodeDecodeError):
        raise SinkError(f"malformed Basic.Deliver from the broker: {payload[:64]!r}") from None
    return _Deliver(tag, delivery_tag, bool(bits & 1), exchange, key)


def _table(payload: bytes, pos: int) -> tuple[dict[str, object], int]:
    """A field table at ``pos``: the table and where it ends (as pamqp decodes it)."""
    end = pos + 4 + _U32.unpack_from(payload, pos)[0]
    if end > len(payload):
        raise ValueError("field table longer than its frame")
    pos += 4
    table: dict[str, object] = {}
    while pos < end:
        size = payload[pos]
        key = payload[pos + 1 : pos + 1 + size].decode()
        pos += 1 + size
        value: object
        if payload[pos] == _LONG_STRING:
            size = _U32.unpack_from(payload, pos + 1)[0]
            raw = payload[pos + 5 : pos + 5 + size]
            pos += 5 + size
            try:
                value = raw.decode()
            except UnicodeDecodeError:
                value = raw  # pamqp keeps such a value as bytes
        else:
            used, value = decode.embedded_value(payload[pos:end])
            pos += used
        table[key] = value
    if pos != end:
        raise ValueError("field table entries overrun its length")
    return table, end


def decode_properties(payload: bytes) -> tuple[int, Basic.Properties]:
    """The body size and the properties of a content header payload."""
    try:
        _, _, body_size, flags = _HEADER.unpack_from(payload)
        if flags & 1:  # more flag words: not in AMQP 0-9-1's Basic, left to pamqp
            header = decode_header(payload)
            return header.body_size, header.properties
        props = Basic.Properties.__new__(Basic.Properties)  # no validation, as pamqp's
        pos = _HEADER.size
        for name, flag, kind, absent in _LAYOUT:
            value: object = absent
            if flags & flag:
                if kind == _SHORT:
                    value, pos = _shortstr(payload, pos)
                elif kind == _TABLE:
                    value, pos = _table(payload, pos)
                elif kind == _OCTET:
                    value = payload[pos]
                    pos += 1
                else:
                    value = decode.timestamp(payload[pos : pos + 8])[1]
                    pos += 8
            setattr(props, name, value)
    except (IndexError, ValueError, struct.error) as exc:  # UnicodeDecodeError is a ValueError
        raise SinkError(f"undecodable content header from the broker: {exc}") from None
    if pos > len(payload):
        raise SinkError("a content header's properties run past its frame")
    return body_size, props


class DeliveryReader:
    """A delivery from its frames: ``Basic.Deliver``, content header, body frames."""

    __slots__ = ("_chunks", "_deliver", "_left", "_properties")

    def __init__(self) -> None:
        self._deliver: _Deliver | None = None
        self._properties: Basic.Properties | None = None
        self._chunks: list[bytes] = []
        self._left = 0

    @property
    def active(self) -> bool:
        """A delivery has started and its content is not complete yet."""
        return self._deliver is not None

    def start(self, payload: bytes) -> None:
        """A ``Basic.Deliver`` arrived: its content frames follow."""
        if self._deliver is not None:
            raise SinkError("Basic.Deliver before the previous delivery's content was complete")
        self._deliver = parse_deliver(payload)
        self._properties = None

    def content(self, kind: int, payload: bytes) -> Delivered | None:
        """Take a content frame; the :class:`Delivered` once its body is complete."""
        if self._deliver is None:
            raise SinkError("content frame outside a delivery")
        if kind == CONTENT_HEADER:
            if self._properties is not None:
                raise SinkError("a second content header in one delivery")
            self._left, self._properties = decode_properties(payload)
            if self._left:
                return None
            return self._done(b"")
        if kind != BODY or self._properties is None:
            raise SinkError(f"unexpected frame type {kind} in a delivery")
        self._left -= len(payload)
        if self._left > 0:
            self._chunks.append(payload)
            return None
        if self._left < 0:
            raise SinkError("a delivery's body is longer than its content header says")
        if self._chunks:
            self._chunks.append(payload)
            payload = b"".join(self._chunks)
            self._chunks = []
        return self._done(payload)

    def _done(self, body: bytes) -> Delivered:
        d, props = self._deliver, self._properties
        assert d is not None and props is not None
        self._deliver = self._properties = None
        return Delivered(d.consumer_tag, d.delivery_tag, d.redelivered, d.exchange,
                         d.routing_key, props, body)
