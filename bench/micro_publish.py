"""CPU per event of the relay's publish path, without a broker: ``python -m bench.micro_publish``.

Two measures, each as the minimum and median of many repeats (the minimum is the least
disturbed by other processes on the machine):

* ``channel``: N publishes through the confirm channel (queued, written in one batch to a
  transport that discards the bytes) and their confirms fed back as the broker sends them,
  either one ``Basic.Ack`` per publish (``single``) or one ``multiple`` ack per 100.
* ``encode``: the frames of N publishes (method, content header and body frame, one batch
  joined as the channel writes it) encoded by ``cdc`` and by pamqp.

``--mode NAME --count N`` runs one measure once without timing, for an instruction counter
(``perf stat -e instructions`` or ``valgrind --tool=callgrind``): the difference between two
counts divided by the difference in N is the instructions per event.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import timeit
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from pamqp import body, commands, frame, header

from cdc.shell.broker import ConfirmChannel
from cdc.wire import amqp as wire

EXCHANGE, KEY = "cdc.events", "device.started"
BODY = b'{"device": "d-0001", "state": "started", "seq": 123456}'
HEADERS = {"x-source": "outbox", "x-table": "public.outbox"}
STAMP = datetime(2026, 1, 1, tzinfo=UTC)
#: The properties the relay sets on an event (the message id varies).
PROPS: dict[str, Any] = {
    "content_type": "application/json",
    "delivery_mode": 2,
    "headers": HEADERS,
    "message_type": KEY,
    "timestamp": STAMP,
}
FRAME_MAX = 131072


class Sink:
    """A transport that takes the bytes and drops them."""

    written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, pieces: list[Any]) -> None:
        self.written += sum(len(p) for p in pieces)

    def get_extra_info(self, name: str) -> None:
        return None

    def close(self) -> None:
        return None

    def abort(self) -> None:
        return None


def ack_frame(tag: int, multiple: bool) -> bytes:
    """The broker's ``Basic.Ack`` frame for ``tag`` on channel 1."""
    payload = struct.pack(">HHQB", 60, 80, tag, int(multiple))
    return struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"


def ours(n: int) -> bytes:
    """One batch of ``n`` publishes encoded by :mod:`cdc.wire.amqp`."""
    out = []
    for i in range(n):
        props = wire.properties_block(message_id=f"m-{i}", **PROPS)
        out.append(wire.publish_frames(1, EXCHANGE, KEY, props, BODY, FRAME_MAX))
    return b"".join(out)  # type: ignore[arg-type]  # small bodies: bytes only


def pamqp(n: int) -> bytes:
    """The same batch encoded by pamqp (``frame.marshal`` of method, header and body)."""
    out = []
    for i in range(n):
        props = commands.Basic.Properties(message_id=f"m-{i}", **PROPS)
        method = commands.Basic.Publish(exchange=EXCHANGE, routing_key=KEY, mandatory=True)
        content = header.ContentHeader(0, len(BODY), props)
        out.append(frame.marshal(method, 1))
        out.append(frame.marshal(content, 1))
        out.append(frame.marshal(body.ContentBody(BODY), 1))
    return b"".join(out)


def channel_round(n: int, per_ack: int) -> Callable[[], None]:
    """A function doing ``n`` publishes and their confirms on one channel."""
    loop = asyncio.new_event_loop()
    acked: list[Any] = []

    async def make() -> Any:
        return ConfirmChannel(
            confirm_timeout=30.0,
            on_ack=acked.extend,
            on_returned=lambda token, reason: None,
            on_republish=lambda reason: None,
        )

    channel = loop.run_until_complete(make())
    channel.connection_made(Sink())
    frames = ours(1)
    state = {"tag": 0}

    async def one_round() -> None:
        first = state["tag"] + 1
        for i in range(n):
            channel.publish(frames, i, EXCHANGE, KEY, "m")
        await asyncio.sleep(0)  # the batched write runs at the end of this loop turn
        last = first + n - 1
        if per_ack == 1:
            data = b"".join(ack_frame(tag, False) for tag in range(first, last + 1))
        else:
            tags = range(first + per_ack - 1, last + 1, per_ack)
            data = b"".join(ack_frame(tag, True) for tag in tags)
        channel.data_received(data)
        state["tag"] = last
        assert len(acked) == n, len(acked)
        acked.clear()

    return lambda: loop.run_until_complete(one_round())


MODES: dict[str, Callable[[int], Callable[[], object]]] = {
    "channel-single": lambda n: channel_round(n, 1),
    "channel-multiple": lambda n: channel_round(n, 100),
    "encode-ours": lambda n: lambda: ours(n),
    "encode-pamqp": lambda n: lambda: pamqp(n),
}


def main() -> None:
    """Print min and median µs per event of each mode, or run one mode once (``--mode``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES))
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    assert ours(3) == pamqp(3), "the encoders disagree"
    if args.mode:
        MODES[args.mode](args.count)()
        return
    report_modes(MODES, args.count, args.repeat)


def report_modes(
    modes: Mapping[str, Callable[[int], Callable[[], object]]], count: int, repeat: int
) -> None:
    """Time each mode's run of ``count`` events ``repeat`` times; print min and median per event."""
    for name, make in modes.items():
        run = make(count)
        run()  # warm the caches
        times = timeit.repeat(run, number=1, repeat=repeat)
        per = [t / count * 1e6 for t in times]
        print(f"{name:18} min {min(per):.3f} µs  median {statistics.median(per):.3f} µs per event")


if __name__ == "__main__":
    main()
