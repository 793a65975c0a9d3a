"""AMQP deliveries from their frames, sans-I/O: ``Basic.Deliver``, content header, body.

Contract:

* :class:`DeliveryReader` takes the frames of a consuming channel that belong to
  deliveries: :meth:`~DeliveryReader.start` with a ``Basic.Deliver`` method payload, then
  :meth:`~DeliveryReader.content` with each content frame, which returns the
  :class:`Delivered` once its body is complete.
* ``Basic.Deliver`` is read by hand (it opens every message a consumer gets, and pamqp's
  objects cost more than the rest of the frame's handling); the content header's
  properties are decoded with pamqp and kept as its ``Basic.Properties``, so a copy of the
  message carries them unchanged.
* Malformed input raises :class:`~cdc.errors.SinkError` (the connection is then dropped and
  the broker redelivers what was not acked); nothing here does I/O.
"""

from __future__ import annotations

import struct
from typing import Final, NamedTuple

from pamqp.commands import Basic

from cdc.errors import SinkError
from cdc.wire.amqp import BODY, CONTENT_HEADER, decode_header

#: class id << 16 | method id of Basic.Deliver.
DELIVER: Final = 0x003C003C
_TAG_AND_BITS: Final = struct.Struct(">QB")
_ACK_FRAME: Final = struct.Struct(">BHIIQBB")
_ACK_PAYLOAD: Final = 13  # class, method (4 bytes), delivery tag (8), bits (1)
_BASIC_ACK: Final = 0x003C0050
_FRAME_END: Final = 0xCE


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
        1, channel, _ACK_PAYLOAD, _BASIC_ACK, delivery_tag, int(multiple), _FRAME_END
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
            header = decode_header(payload)
            self._properties, self._left = header.properties, header.body_size
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
