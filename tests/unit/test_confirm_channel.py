"""The confirm channel's liveness rules (cdc/shell/broker.py), without a socket.

A publish that waits past ``confirm_timeout`` on a connection from which nothing arrived
since it was sent ends the connection (nothing is re-sent into a dead socket); on a
connection that is otherwise heard from it is published again; while the broker blocks
publishers the confirm clock stands still, and restarts on unblock. Publishes go out in one
write per event-loop turn, or with a linger in one write when it is due (sooner once the
buffer holds ``LINGER_BYTES``).
"""

from __future__ import annotations

import asyncio
import time

import pytest
from pamqp import commands

from cdc.errors import SinkError
from cdc.shell.broker import LINGER_BYTES, ConfirmChannel
from cdc.wire.amqp import method_frame

TIMEOUT = 5.0


class Recorder:
    def __init__(self) -> None:
        self.acked: list[object] = []
        self.republished: list[str] = []
        self.blocked: list[bool] = []

    def channel(self, linger: float = 0.0) -> ConfirmChannel:
        return ConfirmChannel(
            confirm_timeout=TIMEOUT,
            on_ack=self.acked.extend,
            on_returned=lambda token, reason: None,
            on_republish=self.republished.append,
            on_blocked=self.blocked.append,
            linger=linger,
        )


class Wire:
    """The socket's side of a transport: what the channel wrote, write by write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, pieces: list[bytes]) -> None:
        self.writes.append(b"".join(pieces))

    def is_closing(self) -> bool:
        return False


def connected(channel: ConfirmChannel) -> Wire:
    """``channel`` as if its connection were open, writing to a :class:`Wire`."""
    wire = Wire()
    channel.connection_made(wire)  # type: ignore[arg-type]
    wire.writes.clear()  # the protocol header
    return wire


async def next_turn() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def publish(channel: ConfirmChannel, n: int) -> None:
    for i in range(n):
        channel.publish(b"frames", i, "ex", "key", f"id-{i}")


async def test_confirm_timeout_on_a_silent_connection_ends_it_without_resending():
    rec = Recorder()
    channel = rec.channel()
    publish(channel, 3)
    now = time.monotonic()
    channel._last_read = now - 60  # nothing heard since before the publishes
    channel._expire(now + TIMEOUT + 1)
    assert channel.closed.done()
    with pytest.raises(SinkError, match="presumed dead"):
        channel.closed.result()
    assert rec.republished == []


async def test_confirm_timeout_on_a_live_connection_publishes_again_once():
    rec = Recorder()
    channel = rec.channel()
    publish(channel, 3)
    now = time.monotonic()
    channel._last_read = now + 1  # a heartbeat arrived after the publishes
    channel._expire(now + TIMEOUT + 1)
    assert not channel.closed.done()
    assert rec.republished == ["timeout"] * 3
    channel._expire(now + TIMEOUT + 1)  # the copies are new publishes with a fresh clock
    assert rec.republished == ["timeout"] * 3


async def test_blocked_broker_stops_the_confirm_clock():
    rec = Recorder()
    channel = rec.channel()
    publish(channel, 2)
    channel._on_method(0, _method(commands.Connection.Blocked(reason="low on memory")))
    assert rec.blocked == [True]
    later = time.monotonic() + 10 * TIMEOUT
    channel._last_read = later - 100  # even a silent, blocked connection is not expired
    channel._expire(later)
    assert not channel.closed.done() and rec.republished == []
    channel._on_method(0, _method(commands.Connection.Unblocked()))
    assert rec.blocked == [True, False]
    channel._expire(time.monotonic() + TIMEOUT / 2)  # the clock restarted on unblock
    assert not channel.closed.done() and rec.republished == []


def _method(method: object) -> bytes:
    raw = method_frame(0, method)  # type: ignore[arg-type]
    return raw[7:-1]  # the payload between the frame header and the end byte


async def test_without_linger_a_turns_publishes_go_in_one_write_at_its_end():
    channel = Recorder().channel()
    wire = connected(channel)
    publish(channel, 3)
    assert wire.writes == []
    await next_turn()
    assert wire.writes == [b"frames" * 3]
    publish(channel, 1)
    await next_turn()
    assert wire.writes == [b"frames" * 3, b"frames"]


async def test_with_a_linger_publishes_of_several_turns_share_one_write_when_it_is_due():
    channel = Recorder().channel(linger=0.05)
    wire = connected(channel)
    started = time.monotonic()
    for _ in range(3):  # three transactions, a few milliseconds apart
        publish(channel, 2)
        await asyncio.sleep(0.005)
    assert wire.writes == []
    while not wire.writes:
        assert time.monotonic() - started < 2, "the lingering write never went"
        await asyncio.sleep(0.005)
    assert wire.writes == [b"frames" * 6]
    assert time.monotonic() - started >= 0.05


async def test_with_a_linger_a_full_buffer_is_written_at_the_end_of_the_turn():
    channel = Recorder().channel(linger=30.0)
    wire = connected(channel)
    big = b"x" * 1000
    n = LINGER_BYTES // len(big) + 1
    for i in range(n):
        channel.publish(big, i, "ex", "key", f"id-{i}")
    await next_turn()
    assert wire.writes == [big * n]  # not 30 s later
    channel.publish(b"frames", n, "ex", "key", "late")
    await next_turn()
    assert len(wire.writes) == 1  # the next one lingers again
