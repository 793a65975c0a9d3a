"""The confirm channel's liveness rules (cdc/shell/broker.py), without a socket.

A publish that waits past ``confirm_timeout`` on a connection from which nothing arrived
since it was sent ends the connection (nothing is re-sent into a dead socket); on a
connection that is otherwise heard from it is published again; while the broker blocks
publishers the confirm clock stands still, and restarts on unblock.
"""

from __future__ import annotations

import time

import pytest
from pamqp import commands

from cdc.errors import SinkError
from cdc.shell.broker import ConfirmChannel
from cdc.wire.amqp import method_frame

TIMEOUT = 5.0


class Recorder:
    def __init__(self) -> None:
        self.acked: list[object] = []
        self.republished: list[str] = []
        self.blocked: list[bool] = []

    def channel(self) -> ConfirmChannel:
        return ConfirmChannel(
            confirm_timeout=TIMEOUT,
            on_ack=self.acked.extend,
            on_returned=lambda token, reason: None,
            on_republish=self.republished.append,
            on_blocked=self.blocked.append,
        )


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
