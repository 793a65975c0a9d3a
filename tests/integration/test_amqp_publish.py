"""The confirm-mode publisher (cdc/shell/broker.py) against the real broker.

Every publish is settled exactly once: confirmed (``on_ack``, also when the broker confirms
ranges with ``multiple``) or returned as unroutable and then confirmed (``on_returned``,
matched to the right publish even with equal message ids). A nack publishes the same bytes
again; a confirm that does not come in time on a connection from which nothing arrives
ends the connection, with nothing re-sent into it (tests/unit/test_confirm_channel.py has
the re-publish on a live one). A lost connection, a channel closed by the broker and missed
heartbeats end in a :class:`SinkError` at once, refused credentials in a
:class:`RefusedError` (not retried), and an idle relay reports ``reconnecting`` as soon as
its broker connection drops.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiormq
import pytest
from harness.session import AMQP_URL

from cdc.errors import RefusedError, SinkError
from cdc.service.urls import parse_amqp_url
from cdc.shell import broker_connect
from cdc.shell.broker import ConfirmChannel
from cdc.wire import amqp as wire

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


class Recorder:
    """The callbacks of one channel, recorded."""

    def __init__(self) -> None:
        self.acked: list[Any] = []
        self.returned: list[tuple[Any, str]] = []
        self.republished: list[str] = []

    async def connect(self, url: str = AMQP_URL, confirm_timeout: float = 30.0) -> ConfirmChannel:
        return await broker_connect.connect(
            parse_amqp_url(url),
            confirm_timeout=confirm_timeout,
            on_ack=self.acked.extend,
            on_returned=lambda token, reason: self.returned.append((token, reason)),
            on_republish=self.republished.append,
        )

    async def settled(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) + len(self.returned) < n:
            assert time.monotonic() < deadline, (
                f"{len(self.acked)} acked + {len(self.returned)} returned of {n}"
            )
            await asyncio.sleep(0.01)


def publish(ch: ConfirmChannel, token: Any, exchange: str, key: str, body: bytes, mid: str) -> None:
    props = wire.properties_block(
        content_type="application/json",
        delivery_mode=2,
        headers={"token": str(token)},
        message_id=mid,
        message_type=key,
        timestamp=None,
    )
    frames = wire.publish_frames(1, exchange, key, props, body, ch.frame_max)
    ch.publish(frames, token, exchange, key, mid)


async def closed_with(ch: ConfirmChannel, timeout: float) -> SinkError:
    await asyncio.wait({ch.closed}, timeout=timeout)
    assert ch.closed.done(), f"still open after {timeout}s"
    exc = ch.closed.exception()
    assert isinstance(exc, SinkError)
    return exc


async def test_every_publish_is_confirmed_once_and_bodies_arrive_whole(env):
    rec = Recorder()
    ch = await rec.connect()
    try:
        n = 3000
        for i in range(n):
            publish(ch, i, env.exchange, "bulk.event", b'{"i": %d}' % i, f"m-{i}")
            if i % 500 == 499:
                await asyncio.sleep(0)  # let the loop write a batch
        big = bytes(range(256)) * 1200  # 307,200 bytes: three body frames
        publish(ch, "big", env.exchange, "bulk.big", big, "m-big")
        await rec.settled(n + 1)
        assert sorted(rec.acked, key=str) == sorted([*range(n), "big"], key=str)
        assert len(set(map(str, rec.acked))) == n + 1
        assert rec.returned == [] and rec.republished == []
        assert ch.in_flight == 0
    finally:
        await ch.close()
    msgs = env.drain(n + 1, quiet=0.5, timeout=60)
    assert [m.message_id for m in msgs] == [f"m-{i}" for i in range(n)] + ["m-big"]
    assert msgs[-1].body == big and msgs[7].body == b'{"i": 7}'
    assert msgs[0].delivery_mode == 2 and msgs[0].headers == {"token": "0"}


async def test_unroutable_publishes_are_returned_in_order(env):
    env.broker.unbind(env.sink_queue, env.exchange, "#")
    env.broker.bind(env.sink_queue, env.exchange, "ok.#")
    rec = Recorder()
    ch = await rec.connect()
    try:
        plan = [("a", "ok.1", "x"), ("b", "nobody.1", "dup"), ("c", "ok.2", "y"),
                ("d", "nobody.1", "dup"), ("e", "nobody.2", "z"), ("f", "ok.3", "w")]  # fmt: skip
        for token, key, mid in plan:
            publish(ch, token, env.exchange, key, b"{}", mid)
        await rec.settled(len(plan))
        assert rec.acked == ["a", "c", "f"]
        assert [t for t, _ in rec.returned] == ["b", "d", "e"]
        assert all(reason.startswith("unroutable: 312 NO_ROUTE") for _, reason in rec.returned)
        # still usable afterwards
        publish(ch, "g", env.exchange, "ok.4", b"{}", "g")
        await rec.settled(len(plan) + 1)
        assert rec.acked[-1] == "g"
    finally:
        await ch.close()


async def test_nacks_are_published_again_until_confirmed(env):
    full = f"{env.exchange}.full"
    env.extra_queues.append(full)
    admin = await aiormq.connect(AMQP_URL)
    try:
        admin_ch = await admin.channel()
        await admin_ch.queue_declare(
            full, durable=True, arguments={"x-max-length": 1, "x-overflow": "reject-publish"}
        )
        await admin_ch.queue_bind(full, env.exchange, routing_key="full.#")
        rec = Recorder()
        ch = await rec.connect()
        try:
            for i in range(3):
                publish(ch, i, env.exchange, "full.x", b"{}", f"n-{i}")
            deadline = time.monotonic() + 20
            while len(rec.republished) < 2:
                assert time.monotonic() < deadline, rec.republished
                await asyncio.sleep(0.01)
            assert set(rec.republished) == {"nack"}
            assert rec.acked == [0]
            while len(rec.acked) < 3:  # make room, one message at a time
                assert time.monotonic() < deadline, rec.acked
                await admin_ch.queue_purge(full)
                await asyncio.sleep(0.05)
            assert sorted(rec.acked) == [0, 1, 2] and rec.returned == []
        finally:
            await ch.close()
    finally:
        await admin.close()


async def test_a_missing_confirm_on_a_silent_connection_ends_it_without_resending(
    env, tcp_proxy
):
    rec = Recorder()
    ch = await rec.connect(tcp_proxy.url(), confirm_timeout=0.4)
    try:
        tcp_proxy.hold()  # nothing from the broker (confirms, heartbeats) reaches us
        publish(ch, "late", env.exchange, "slow.event", b"{}", "late")
        exc = await closed_with(ch, timeout=3)
        assert "presumed dead" in str(exc)
        assert rec.republished == [] and rec.acked == []
    finally:
        tcp_proxy.release()
        await ch.close()
    copies = env.drain(None, quiet=0.5, timeout=10)
    assert [m.message_id for m in copies] == ["late"]  # sent once: no copy into the dead socket


async def test_heartbeats_keep_an_idle_connection_and_their_absence_ends_it(tcp_proxy):
    parts = urlsplit(tcp_proxy.url())
    url = urlunsplit((*parts[:3], "heartbeat=1", ""))
    ch = await Recorder().connect(url)
    try:
        await asyncio.sleep(3.5)  # the broker closes a peer silent for 2 intervals
        assert not ch.closed.done(), ch.closed.exception()
        tcp_proxy.hold()
        exc = await closed_with(ch, timeout=5)
        assert "heartbeat" in str(exc)
    finally:
        tcp_proxy.release()
        await ch.close()


async def test_a_cut_connection_fails_at_once(tcp_proxy):
    ch = await Recorder().connect(tcp_proxy.url())
    t0 = time.monotonic()
    assert tcp_proxy.cut() == 1
    exc = await closed_with(ch, timeout=2)
    assert "connection lost" in str(exc) and time.monotonic() - t0 < 2
    with pytest.raises(SinkError):
        publish(ch, 1, "", "q", b"{}", "m")
    await ch.close()


async def test_a_channel_closed_by_the_broker_is_a_sink_error(env):
    ch = await Recorder().connect()
    publish(ch, 1, f"{env.exchange}.missing", "k", b"{}", "m")
    exc = await closed_with(ch, timeout=5)
    assert "404" in str(exc) and "NOT_FOUND" in str(exc)
    await ch.close()


async def test_refused_credentials_and_unreachable_broker_are_sink_errors(tcp_proxy):
    with pytest.raises(RefusedError, match=r"403|ACCESS_REFUSED"):  # not retried
        await Recorder().connect(tcp_proxy.url(password="wrong"))
    tcp_proxy.pause("refuse")
    with pytest.raises(SinkError, match="cannot connect"):
        await Recorder().connect(tcp_proxy.url())


def test_idle_relay_notices_a_lost_broker_at_once(env, tcp_proxy):
    env.setup()
    relay = env.relay(
        metrics=True, amqp_url=tcp_proxy.url(), reconnect_min_delay=2, reconnect_max_delay=2
    )
    relay.wait_streaming()
    tcp_proxy.pause("refuse")
    t0 = time.monotonic()
    tcp_proxy.cut()
    env.wait_for(lambda: relay.state() == "reconnecting", 5, "the idle relay to notice")
    noticed = time.monotonic() - t0
    tcp_proxy.resume()
    relay.wait_streaming()
    row = env.insert([env.event("after.cut")])[0]
    assert [m.message_id for m in env.drain(1, quiet=0.5)] == [row["id"]]
    print(f"idle relay reported 'reconnecting' {noticed:.2f}s after the cut")
    assert noticed < 3  # before: never, until an event was published
