"""The consuming side's codec (cdc/wire/deliveries.py) against pamqp, the reference.

Deliveries are built with pamqp (as the broker would send them: ``Basic.Deliver``, a content
header, the body split at ``frame_max``), cut into frames by the relay's frame reader, and
put together again; what comes out must be what went in. The hand-decoded properties must
be what pamqp decodes from the same bytes, for any properties; the hand-encoded ack must be
the bytes pamqp encodes.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body as pamqp_body
from pamqp import commands, frame, header

from cdc.errors import SinkError
from cdc.wire import amqp as wire
from cdc.wire.deliveries import (
    DELIVER,
    Delivered,
    DeliveryReader,
    ack_frame,
    decode_properties,
    parse_deliver,
)

FRAME_MAX = 4096
PROPS = commands.Basic.Properties(
    content_type="application/json",
    delivery_mode=2,
    message_id="ev-1",
    timestamp=datetime(2026, 12, 8, 1, 0, tzinfo=UTC),
    message_type="device.started",
    headers={"commit_lsn": "0/16B3748", "x-cdc-attempt": 2, "nested": {"a": [1, "b"]}},
)


def stream(
    body: bytes, *, tag: int = 7, redelivered: bool = False, key: str = "device.started"
) -> bytes:
    """The bytes the broker sends for one delivery on channel 1."""
    deliver = commands.Basic.Deliver("ctag-1", tag, redelivered, "cloudphone.events", key)
    parts = [
        frame.marshal(deliver, 1),
        frame.marshal(header.ContentHeader(0, len(body), PROPS), 1),
    ]
    room = FRAME_MAX - 8
    parts += [
        frame.marshal(pamqp_body.ContentBody(body[i : i + room]), 1)
        for i in range(0, len(body), room)
    ]
    return b"".join(parts)


def read(data: bytes, cuts: list[int] | None = None) -> list[Delivered]:
    """Every delivery in ``data``, fed whole or cut at ``cuts``."""
    frames, reader, out = wire.FrameReader(FRAME_MAX), DeliveryReader(), []
    bounds = sorted({0, len(data), *(c for c in cuts or [] if c < len(data))})
    for start, end in itertools.pairwise(bounds):
        for kind, _, payload in frames.feed(data[start:end]):
            if kind == wire.METHOD:
                assert wire.method_id(payload) == DELIVER
                reader.start(payload)
            else:
                done = reader.content(kind, payload)
                if done is not None:
                    out.append(done)
    assert not reader.active
    return out


def test_a_delivery_is_read_back_as_sent() -> None:
    body = b'{"deviceId": "d-1"}'
    [got] = read(stream(body, tag=2**40, redelivered=True))
    assert got[:5] == ("ctag-1", 2**40, True, "cloudphone.events", "device.started")
    assert got.body == body
    assert got.properties.message_id == "ev-1"
    assert got.properties.headers == PROPS.headers
    assert got.properties.timestamp == PROPS.timestamp


def test_an_empty_body_has_no_body_frame_and_still_arrives() -> None:
    [got] = read(stream(b""))
    assert got.body == b""


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 3 * FRAME_MAX), min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 20_000), max_size=10),
)
def test_bodies_over_several_frames_in_any_chunking(sizes: list[int], cuts: list[int]) -> None:
    bodies = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    data = b"".join(stream(b, tag=i + 1) for i, b in enumerate(bodies))
    got = read(data, cuts)
    assert [(d.delivery_tag, d.body) for d in got] == list(enumerate(bodies, 1))


def test_malformed_deliveries_are_refused() -> None:
    with pytest.raises(SinkError, match=r"malformed Basic\.Deliver"):
        parse_deliver(b"\x00\x3c\x00\x3c\x09short")
    reader = DeliveryReader()
    with pytest.raises(SinkError, match="outside a delivery"):
        reader.content(wire.BODY, b"x")
    frames = wire.FrameReader(FRAME_MAX).feed(stream(b"abc"))
    reader.start(frames[0][2])
    with pytest.raises(SinkError, match="before the previous"):
        reader.start(frames[0][2])
    with pytest.raises(SinkError, match="unexpected frame type"):
        reader.content(wire.BODY, b"abc")  # the body before its header
    reader.content(wire.CONTENT_HEADER, frames[1][2])
    with pytest.raises(SinkError, match="longer than"):
        reader.content(wire.BODY, b"abcd")


@pytest.mark.parametrize("multiple", [False, True])
def test_the_ack_frame_is_the_bytes_pamqp_encodes(multiple: bool) -> None:
    expected = frame.marshal(commands.Basic.Ack(delivery_tag=2**33 + 5, multiple=multiple), 1)
    assert ack_frame(1, 2**33 + 5, multiple) == expected


_text = st.text(max_size=40)
# AMQP timestamps: whole seconds since 1970, as an unsigned 64-bit number.
_stamps = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1), timezones=st.just(UTC)
).map(lambda d: d.replace(microsecond=0))
_short = st.text(max_size=20).filter(lambda t: len(t.encode()) <= 255)
_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, width=32)  # pamqp encodes a float as 32 bits
    | _text
    | _stamps,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_short, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    fields=st.fixed_dictionaries(
        {},
        optional={
            "content_type": _short,
            "content_encoding": _short,
            "headers": st.dictionaries(_short, _values, max_size=6),
            "delivery_mode": st.sampled_from([1, 2]),
            "priority": st.integers(0, 255),
            "correlation_id": _short,
            "reply_to": _short,
            "expiration": _short,
            "message_id": _short,
            "timestamp": _stamps,
            "message_type": _short,
            "user_id": _short,
            "app_id": _short,
        },
    ),
    size=st.integers(0, 2**40),
)
def test_properties_decode_as_pamqp_decodes_them(fields: dict[str, object], size: int) -> None:
    payload = header.ContentHeader(0, size, commands.Basic.Properties(**fields)).marshal()
    reference = wire.decode_header(payload)
    body_size, props = decode_properties(payload)
    assert body_size == reference.body_size == size
    assert props == reference.properties
    for name in commands.Basic.Properties.__slots__:
        assert getattr(props, name) == getattr(reference.properties, name), name


def test_a_non_utf8_string_header_stays_bytes_as_pamqp_keeps_it() -> None:
    table = b"\x01kS\x00\x00\x00\x02\xff\xfe"
    payload = (
        b"\x00\x3c\x00\x00" + (5).to_bytes(8, "big") + b"\x20\x00"
        + len(table).to_bytes(4, "big") + table
    )
    assert decode_properties(payload)[1].headers == {"k": b"\xff\xfe"}
    assert wire.decode_header(payload).properties.headers == {"k": b"\xff\xfe"}


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x3c\x00\x00",  # shorter than class, weight, size and flags
        b"\x00\x3c\x00\x00" + bytes(8) + b"\x80\x00\x05ab",  # content type cut short
        b"\x00\x3c\x00\x00" + bytes(8) + b"\x20\x00\x00\x00\x00\x09\x01k",  # table past end
        b"\x00\x3c\x00\x00" + bytes(8) + b"\x20\x00\x00\x00\x00\x03\x01kZ",  # unknown type
    ],
)
def test_damaged_content_headers_are_refused(payload: bytes) -> None:
    with pytest.raises(SinkError, match="content header"):
        decode_properties(payload)
