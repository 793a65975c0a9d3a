"""The publish-path codec (cdc/wire/amqp.py) against pamqp, the reference encoder.

The relay's messages must not change by one byte now that the hot path encodes frames by
hand: every publish is compared with what pamqp (which aiormq used) produces for the same
method, properties and body, for the relay's own headers and for arbitrary user headers
(ints of every width, floats, bools, nested tables, arrays, over-long keys). Incoming
frames are split correctly whether the bytes come whole or one at a time.
"""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp import body as pamqp_body
from pamqp import commands, frame, header

from cdc.errors import SinkError
from cdc.wire import amqp as wire

FRAME_MAX = 131072
RELAY_HEADERS = {
    "aggregate_type": "device",
    "aggregate_id": "dev-42",
    "commit_lsn": "0/16B3748",
    "commit_time": "2026-12-02T18:35:58.004321+00:00",
    "created_at": "2026-12-02T18:35:57.123456+00:00",
}


def encode(
    exchange: str,
    key: str,
    body: bytes,
    *,
    headers: dict[str, object],
    message_id: str,
    message_type: str | None,
    timestamp: datetime | None,
    frame_max: int = FRAME_MAX,
    channel: int = 1,
    reference: bool = False,
) -> bytes:
    """One mandatory publish: ours, or (``reference``) what aiormq 7 wrote with pamqp."""
    if not reference:
        block = wire.properties_block(
            content_type="application/json",
            delivery_mode=2,
            headers=headers,
            message_id=message_id,
            message_type=message_type,
            timestamp=timestamp,
        )
        frames = wire.publish_frames(channel, exchange, key, block, body, frame_max)
        return frames if isinstance(frames, bytes) else b"".join(frames)
    props = commands.Basic.Properties(
        message_id=message_id,
        message_type=message_type,
        content_type="application/json",
        delivery_mode=2,
        timestamp=timestamp,
        headers=headers,
    )
    frames = [
        commands.Basic.Publish(exchange=exchange, routing_key=key, mandatory=True),
        header.ContentHeader(body_size=len(body), properties=props),
    ]
    step = frame_max - 8
    frames += [pamqp_body.ContentBody(body[i : i + step]) for i in range(0, len(body), step)]
    return b"".join(frame.marshal(f, channel) for f in frames)


def ours(*args: object, **kw: object) -> bytes:
    return encode(*args, **kw)  # type: ignore[arg-type]


def pamqp_publish(*args: object, **kw: object) -> bytes:
    return encode(*args, **kw, reference=True)  # type: ignore[arg-type]


CASES = {
    "relay headers": dict(headers=RELAY_HEADERS),
    "null aggregate": dict(headers={**RELAY_HEADERS, "aggregate_type": None}),
    "user headers": dict(
        headers={
            "trace_id": "t-1",
            "tenant": 7,
            "big": 2**40,
            "neg": -70000,
            "ratio": 0.5,
            "ok": True,
            "tags": ["a", 1, None],
            "nested": {"x": {"y": "z"}},
            **RELAY_HEADERS,
        }
    ),
    "unicode": dict(headers={"ключ": "значение ✓", **RELAY_HEADERS}),
    "long key": dict(headers={"k" * 200: "v", **RELAY_HEADERS}),
    "empty headers": dict(headers={}),
    "no timestamp": dict(headers=RELAY_HEADERS, timestamp=None),
    "no type": dict(headers=RELAY_HEADERS, message_type=None),
    "offset timestamp": dict(
        headers=RELAY_HEADERS,
        timestamp=datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=timezone(timedelta(hours=-5))),
    ),
    "naive timestamp": dict(headers=RELAY_HEADERS, timestamp=datetime(2026, 1, 2, 3, 4, 5)),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
@pytest.mark.parametrize("size", [0, 1, 500, FRAME_MAX - 8, FRAME_MAX - 7, 3 * FRAME_MAX + 5])
def test_publish_bytes_equal_pamqp(case, size):
    kw: dict[str, object] = {
        "message_id": "7c3f2a1e-8d4b-4e1a-9f0c-2b6d5e8a9c01",
        "message_type": "device.started",
        "timestamp": datetime(2026, 12, 2, 18, 35, 57, tzinfo=UTC),
        **case,
    }
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    args = ("cloudphone.events", "device.started", body)
    assert ours(*args, **kw) == pamqp_publish(*args, **kw)  # type: ignore[arg-type]


header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, width=32)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    headers=st.dictionaries(st.text(min_size=1, max_size=140), header_values, max_size=6),
    strings=st.dictionaries(st.text(min_size=1, max_size=20), st.text() | st.none(), max_size=6),
    exchange=st.from_regex(r"[A-Za-z0-9_.:\-]{0,40}", fullmatch=True),  # as config allows
    key=st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= 255),
    message_id=st.text(min_size=1, max_size=60).filter(lambda s: len(s.encode()) <= 255),
    seconds=st.none() | st.integers(0, 253_402_300_799),  # up to 9999-12-31
    body=st.binary(max_size=300),
    frame_max=st.integers(9, 400),
)
def test_any_publish_equals_pamqp(
    headers, strings, exchange, key, message_id, seconds, body, frame_max
):
    stamp = None if seconds is None else datetime.fromtimestamp(seconds, UTC)
    for table in (headers, strings):
        kw = dict(
            headers=table,
            message_id=message_id,
            message_type=key,
            timestamp=stamp,
            frame_max=frame_max,
        )
        assert ours(exchange, key, body, **kw) == pamqp_publish(exchange, key, body, **kw)


def test_over_long_short_strings_are_refused():
    with pytest.raises(ValueError, match="255 bytes"):
        ours("x", "k" * 256, b"{}", headers={}, message_id="m", message_type=None, timestamp=None)
    with pytest.raises(ValueError, match="255 bytes"):
        ours("x", "k", b"{}", headers={}, message_id="é" * 128, message_type=None, timestamp=None)


# -- incoming frames ----------------------------------------------------------------------------


def incoming() -> list[bytes]:
    return [
        frame.marshal(commands.Basic.Ack(delivery_tag=7, multiple=True), 1),
        frame.marshal(commands.Basic.Nack(delivery_tag=2**40, multiple=False, requeue=True), 1),
        wire.HEARTBEAT,
        frame.marshal(
            commands.Basic.Return(
                reply_code=312, reply_text="NO_ROUTE", exchange="ex", routing_key="a.b"
            ),
            1,
        ),
        frame.marshal(
            header.ContentHeader(
                body_size=3, properties=commands.Basic.Properties(message_id="id-1")
            ),
            1,
        ),
        frame.marshal(pamqp_body.ContentBody(b"abc"), 1),
        frame.marshal(commands.Connection.Close(320, "CONNECTION_FORCED - shutdown", 0, 0), 0),
    ]


def check_frames(frames: list[tuple[int, int, bytes]]) -> None:
    assert [(kind, ch) for kind, ch, _ in frames] == [
        (1, 1), (1, 1), (8, 0), (1, 1), (2, 1), (3, 1), (1, 0)
    ]  # fmt: skip
    ack, nack, _, ret, head, body, close = (p for _, _, p in frames)
    assert wire.method_id(ack) == wire.ACK
    assert wire.parse_confirm(ack) == (wire.ACK, 7, True, False)
    assert wire.parse_confirm(nack) == (wire.NACK, 2**40, False, True)
    returned = wire.decode_method(1, ret)
    assert isinstance(returned, commands.Basic.Return)
    assert (returned.reply_code, returned.routing_key, returned.exchange) == (312, "a.b", "ex")
    content = wire.decode_header(head)
    assert content.body_size == 3 and content.properties.message_id == "id-1"
    assert body == b"abc"
    closing = wire.decode_method(0, close)
    assert isinstance(closing, commands.Connection.Close) and closing.reply_code == 320


def test_reader_whole_stream():
    check_frames(wire.FrameReader().feed(b"".join(incoming())))


def test_reader_one_byte_at_a_time():
    reader = wire.FrameReader()
    data = b"".join(incoming())
    frames = []
    for i in range(len(data)):
        frames += reader.feed(data[i : i + 1])
    check_frames(frames)


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=12))
def test_reader_any_chunking(cuts):
    data = b"".join(incoming())
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    reader = wire.FrameReader()
    frames = []
    for a, b in itertools.pairwise(points):
        frames += reader.feed(data[a:b])
    check_frames(frames)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"AMQP\x00\x00\x09\x01", "does not speak AMQP 0-9-1"),
        (frame.marshal(commands.Basic.Ack(delivery_tag=1), 1)[:-1] + b"\x00", "frame end"),
        (b"\x01\x00\x01\x00\x10\x00\x00", None),  # incomplete: waits for more
        (b"\x01\x00\x01\x7f\x00\x00\x00" + b"\x00" * 8, "exceeds frame_max"),
    ],
)
def test_reader_rejects_garbage(data, message):
    reader = wire.FrameReader(frame_max=4096)
    if message is None:
        assert reader.feed(data) == []
        return
    with pytest.raises(SinkError, match=message):
        reader.feed(data)


def test_confirm_and_method_parsers_reject_short_payloads():
    with pytest.raises(SinkError, match=r"truncated Basic\.Ack"):
        wire.parse_confirm(b"\x00\x3c\x00\x50\x00")
    with pytest.raises(SinkError, match="too short"):
        wire.method_id(b"\x00")
    with pytest.raises(SinkError, match="undecodable method"):
        wire.decode_method(1, b"\x00\x3c\x00\x32\x01")


def test_a_large_body_is_framed_as_views_of_it_and_matches_pamqp():
    """From LARGE_BODY on, the frames are pieces (the body's frames are views of the body,
    never copies) that, written in order, are byte for byte what pamqp encodes."""
    body = bytes(range(256)) * (wire.LARGE_BODY // 256 + 3)
    frames = wire.publish_frames(1, "ex", "k", b"\x00\x00", body, FRAME_MAX)
    assert isinstance(frames, tuple)
    views = [f for f in frames if isinstance(f, memoryview)]
    assert views and all(v.obj is body for v in views)
    assert sum(len(v) for v in views) == len(body)
    small = wire.publish_frames(1, "ex", "k", b"\x00\x00", body[:1000], FRAME_MAX)
    assert isinstance(small, bytes)
    kw = {"headers": {"a": 1}, "message_id": "m-1", "message_type": "t",
          "timestamp": datetime(2024, 1, 1, tzinfo=UTC)}
    assert ours("ex", "k", body, **kw) == encode("ex", "k", body, reference=True, **kw)


def test_a_returned_message_is_read_from_its_frames():
    reader = wire.ReturnReader()
    with pytest.raises(SinkError, match="outside a returned message"):
        reader.content(wire.CONTENT_HEADER, b"")
    reader.start(commands.Basic.Return(312, "NO_ROUTE", "events", "nobody.1"))
    props = commands.Basic.Properties(message_id="m-1")
    head = frame.marshal(header.ContentHeader(0, 5, props), 1)[7:-1]
    back = reader.content(wire.CONTENT_HEADER, head)
    assert back == wire.Returned("events", "nobody.1", "m-1", 312, "NO_ROUTE")
    assert reader.content(wire.BODY, b"abc") is None
    assert reader.content(wire.BODY, b"de") is None  # the last body frame ends it
    with pytest.raises(SinkError, match="outside a returned message"):
        reader.content(wire.BODY, b"x")


def test_the_handshake_answers_take_plain_and_the_smaller_frame_max():
    start = commands.Connection.Start(mechanisms="AMQPLAIN PLAIN")
    ok = wire.start_ok(start, "u", "p")
    assert ok.mechanism == "PLAIN" and ok.response == "\0u\0p"
    with pytest.raises(SinkError, match="no PLAIN login"):
        wire.start_ok(commands.Connection.Start(mechanisms="EXTERNAL"), "u", "p")
    tune = commands.Connection.Tune(channel_max=2047, frame_max=1 << 20, heartbeat=60)
    assert wire.tune_ok(tune, FRAME_MAX, 10).frame_max == FRAME_MAX
    small = commands.Connection.Tune(channel_max=2047, frame_max=4096, heartbeat=60)
    assert wire.tune_ok(small, FRAME_MAX, 10).heartbeat == 10
    assert wire.tune_ok(small, FRAME_MAX, 10).frame_max == 4096
