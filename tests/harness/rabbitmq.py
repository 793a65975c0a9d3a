"""RabbitMQ for the tests: a synchronous AMQP client, readiness, ``rabbitmqctl`` queries,
and the broker faults tests provoke (memory alarm, stopped application).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import re
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aio_pika
import aiormq
import pytest

from harness.common import Teardown, parse_lsn, plain, run_async_in_thread, wait_for
from harness.session import SESSION, session_services


@dataclass(frozen=True, slots=True)
class Msg:
    """One message taken from a queue, with what the contract talks about."""

    body: bytes
    message_id: str | None
    type: str | None
    content_type: str | None
    delivery_mode: int | None
    timestamp: dt.datetime | None
    headers: dict[str, Any]
    routing_key: str | None
    exchange: str | None

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def commit_lsn(self) -> int:
        return parse_lsn(str(self.headers["commit_lsn"]))


def _to_msg(m: aio_pika.abc.AbstractIncomingMessage) -> Msg:
    return Msg(
        body=bytes(m.body),
        message_id=m.message_id,
        type=m.type,
        content_type=m.content_type,
        delivery_mode=int(m.delivery_mode) if m.delivery_mode is not None else None,
        timestamp=m.timestamp,
        headers=plain(dict(m.headers or {})),
        routing_key=m.routing_key,
        exchange=m.exchange,
    )


_CONNECTION_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,  # aio-pika: "<Connection ...> closed"
)


class Broker:
    """Synchronous facade over one aio-pika connection living in a background loop thread.

    Every operation opens a channel, so a channel-level error (e.g. a passive declare of a
    missing queue) does not break later calls; a dead connection is reopened, retrying for
    up to ``OUTAGE_S`` while the broker is unreachable.
    """

    def __init__(self, url: str | None = None) -> None:
        self.url = url or session_services().amqp_url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="amqp")
        self._thread.start()
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._conn_lock = asyncio.Lock()
        self.declared_queues: set[str] = set()
        self.declared_exchanges: set[str] = set()

    #: How long an operation keeps retrying while the broker is unreachable (another test
    #: session may be running ``rabbitmqctl stop_app`` on the shared broker).
    OUTAGE_S = 60.0

    async def _connection(self, deadline: float) -> aio_pika.abc.AbstractConnection:
        async with self._conn_lock:
            while True:
                if self._conn is not None and not self._conn.is_closed:
                    return self._conn
                try:
                    self._conn = await aio_pika.connect(self.url, timeout=5)
                    return self._conn
                except _CONNECTION_ERRORS:
                    self._conn = None
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

    async def _forget_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None

    def _run(self, fn: Callable[[aio_pika.abc.AbstractChannel], Any], timeout: float = 60) -> Any:
        """Run ``fn(channel)`` on a fresh channel, retrying through a broker outage."""

        async def with_channel() -> Any:
            deadline = time.monotonic() + self.OUTAGE_S
            while True:
                try:
                    conn = await self._connection(deadline)
                    async with conn.channel() as channel:
                        return await fn(channel)
                except _CONNECTION_ERRORS:
                    await self._forget_connection()
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

        return asyncio.run_coroutine_threadsafe(with_channel(), self._loop).result(
            timeout + self.OUTAGE_S
        )

    def close(self) -> None:
        async def close() -> None:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- topology ---------------------------------------------------------------------------

    def declare_exchange(self, name: str) -> None:
        self.declared_exchanges.add(name)

        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await ch.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)

        self._run(fn)

    def declare_queue(
        self, name: str, bind_to: str | None = None, keys: Iterable[str] = ()
    ) -> None:
        self.declared_queues.add(name)
        keys = list(keys)

        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            q = await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "classic"})
            for key in keys:
                await q.bind(bind_to, routing_key=key)

        self._run(fn)

    def bind(self, queue: str, exchange: str, key: str) -> None:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await (await ch.get_underlay_channel()).queue_bind(queue, exchange, routing_key=key)

        self._run(fn)

    def unbind(self, queue: str, exchange: str, key: str) -> None:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await (await ch.get_underlay_channel()).queue_unbind(queue, exchange, routing_key=key)

        self._run(fn)

    def queue_count(self, name: str) -> int | None:
        """Ready messages in ``name`` (passive declare); None if the queue does not exist."""

        async def fn(ch: aio_pika.abc.AbstractChannel) -> int | None:
            try:
                ok = await (await ch.get_underlay_channel()).queue_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
            return int(ok.message_count)

        return self._run(fn, timeout=20)

    def exchange_exists(self, name: str) -> bool:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> bool:
            try:
                await (await ch.get_underlay_channel()).exchange_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            return True

        return bool(self._run(fn))

    def delete_queue(self, name: str) -> None:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await (await ch.get_underlay_channel()).queue_delete(name)

        with contextlib.suppress(aiormq.exceptions.ChannelNotFoundEntity):
            self._run(fn)
        self.declared_queues.discard(name)

    def delete_exchange(self, name: str) -> None:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await (await ch.get_underlay_channel()).exchange_delete(name)

        with contextlib.suppress(aiormq.exceptions.ChannelNotFoundEntity):
            self._run(fn)
        self.declared_exchanges.discard(name)

    # -- consuming --------------------------------------------------------------------------

    def drain(
        self,
        queue: str,
        expected: int | None = None,
        quiet: float = 1.0,
        timeout: float = 60.0,
        stop: Callable[[list[Msg]], bool] | None = None,
    ) -> list[Msg]:
        """Consume ``queue`` (acking) and return the messages in arrival order.

        Stops when at least ``expected`` messages arrived (or ``stop(msgs)`` is true) and then
        nothing more came for ``quiet`` seconds, or when nothing came for ``quiet`` seconds
        with ``expected`` None, or at ``timeout`` (the caller asserts on what it got).
        """

        async def consume() -> list[Msg]:
            msgs: list[Msg] = []
            ids: set[str | None] = set()
            last = [time.monotonic()]
            deadline = time.monotonic() + timeout
            reconnected = False

            def enough() -> bool:
                return (expected is None or len(msgs) >= expected) and (stop is None or stop(msgs))

            async def on_message(m: aio_pika.abc.AbstractIncomingMessage) -> None:
                # After a reconnect, a message we took but whose ack was lost comes back
                # flagged redelivered: that is our artefact, not a duplicate from the relay.
                if not (reconnected and m.redelivered and m.message_id in ids):
                    msgs.append(_to_msg(m))
                    ids.add(m.message_id)
                last[0] = time.monotonic()
                await m.ack()

            while True:
                try:
                    conn = await self._connection(deadline + self.OUTAGE_S)
                    async with conn.channel() as ch:
                        await ch.set_qos(prefetch_count=2000)
                        q = await ch.declare_queue(queue, passive=True)
                        tag = await q.consume(on_message)
                        try:
                            while time.monotonic() < deadline:
                                await asyncio.sleep(0.05)
                                if ch.is_closed:
                                    raise ConnectionError("channel closed under the drain")
                                if enough() and time.monotonic() - last[0] >= quiet:
                                    break
                        finally:
                            with contextlib.suppress(Exception):
                                await q.cancel(tag)
                    return msgs
                except _CONNECTION_ERRORS:
                    # keep what was taken (and acked) so far; go on after the broker is back
                    reconnected = True
                    await self._forget_connection()
                    if time.monotonic() > deadline + self.OUTAGE_S:
                        return msgs
                    await asyncio.sleep(0.5)

        return list(
            asyncio.run_coroutine_threadsafe(consume(), self._loop).result(
                timeout + 2 * self.OUTAGE_S + 30
            )
        )


def wait_amqp_ready(url: str | None = None, timeout: float = 90.0) -> None:
    """Block until the broker (the session's, or ``url``'s) accepts an AMQP connection again."""
    url = url or session_services().amqp_url

    async def probe() -> bool:
        try:
            conn = await aio_pika.connect(url, timeout=3)
        except Exception:
            return False
        await conn.close()
        return True

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run_async_in_thread(probe, timeout=10):
            return
        time.sleep(0.5)
    raise RuntimeError(f"broker at {url} did not come back within {timeout}s")


def rabbitmqctl_names(kind: str) -> list[str]:
    if not session_services().has_rabbitmqctl():
        return []
    try:
        code, out = session_services().rabbitmqctl(
            kind, "--quiet", "--no-table-headers", "name", timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()] if code == 0 else []


def unacked_messages(queues: Iterable[str]) -> int:
    """Messages of ``queues`` delivered and not yet acked, as the broker counts them
    (``rabbitmqctl list_queues``; the AMQP passive declare only reports ready ones)."""
    code, out = session_services().rabbitmqctl(
        "list_queues", "--quiet", "--no-table-headers", "name", "messages_unacknowledged",
        timeout=60,
    )
    if code != 0:
        raise RuntimeError(f"rabbitmqctl list_queues exited {code}: {out}")
    wanted = set(queues)
    total = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            total += int(parts[1])
    return total


def need_rabbitmqctl(what: str) -> None:
    if not session_services().has_rabbitmqctl():
        pytest.fail(f"rabbitmqctl is needed for {what}")


class MemoryAlarm:
    """Raise RabbitMQ's memory alarm on the session's broker; always restored to the value read
    before (``rabbitmqctl environment``)."""

    _RE = re.compile(r"\{vm_memory_high_watermark,\s*(\{absolute,\s*([^}]+)\}|[0-9.eE+-]+)\}")

    def __init__(self) -> None:
        self.raised = False
        _, out = session_services().rabbitmqctl("environment", timeout=60, check=True)
        m = self._RE.search(out)
        if m is None:
            pytest.fail("cannot read vm_memory_high_watermark from `rabbitmqctl environment`")
        absolute = m.group(2)
        self.original = (
            ["absolute", absolute.strip().strip('"')] if absolute else [m.group(1).strip()]
        )

    @staticmethod
    def _set(*args: str) -> None:
        session_services().rabbitmqctl(
            "set_vm_memory_high_watermark", *args, timeout=60, check=True
        )

    def raise_(self) -> None:
        self.raised = True
        self._set("0.0000001")

    def restore(self) -> None:
        self._set(*self.original)
        self.raised = False


class RabbitApp:
    """``rabbitmqctl stop_app`` / ``start_app`` on the session's broker; always restored."""

    def __init__(self) -> None:
        self.stopped = False

    @staticmethod
    def _ctl(*args: str) -> None:
        code, out = session_services().rabbitmqctl(*args, timeout=120)
        if code != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} exited {code}: {out}")

    def stop(self) -> None:
        self.stopped = True
        self._ctl("stop_app")

    def start(self) -> None:
        self._ctl("start_app")
        wait_amqp_ready(timeout=90)
        self.stopped = False


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def ensure_rabbitmq_prometheus() -> str:
    """The shared broker's per-object metrics URL. Enables the ``rabbitmq_prometheus`` plugin
    if it is not enabled yet, and leaves it enabled (it only adds a metrics listener)."""
    url = session_services().rabbit_metrics_url
    if not http_ok(url):
        _, listed = session_services().broker_tool("rabbitmq-plugins", "list", "-e", "-m")
        if "rabbitmq_prometheus" not in listed.split():
            session_services().broker_tool(
                "rabbitmq-plugins", "enable", "rabbitmq_prometheus", timeout=180, check=True
            )
        wait_for(lambda: http_ok(url), 90, lambda: f"{url} to answer", interval=1)
    return url


def rabbitmqctl(*args: str) -> None:
    session_services().rabbitmqctl(*args, timeout=120, check=True)


class SinkQueues:
    """One test's broker names (exchange, parking queue, sink queue and extra queues bound to
    the exchange) and helpers over them; ``delete(teardown)`` removes them all.
    ``diagnostics()`` adds to a timeout's message what the processes under test logged."""

    def __init__(self, broker: Broker, tag: str, diagnostics: Callable[[], str]) -> None:
        self.broker = broker
        self.exchange = f"cdc_test.{SESSION}.{tag}"
        self.parking_queue = f"{self.exchange}.parked"
        self.sink_queue = f"{self.exchange}.sink"
        self.extra_queues: list[str] = []
        self.diagnostics = diagnostics

    def declare_sink(self, keys: Iterable[str] = ("#",)) -> None:
        """The exchange (as the relay declares it) and the durable classic sink queue."""
        self.broker.declare_exchange(self.exchange)
        self.broker.declare_queue(self.sink_queue, self.exchange, keys)

    def declare_queue(self, suffix: str, keys: Iterable[str]) -> str:
        name = f"{self.exchange}.{suffix}"
        self.extra_queues.append(name)
        self.broker.declare_queue(name, self.exchange, keys)
        return name

    def drain(self, expected: int | None = None, queue: str | None = None, **kw: Any) -> list[Msg]:
        return self.broker.drain(queue or self.sink_queue, expected, **kw)

    def sink_count(self) -> int:
        n = self.broker.queue_count(self.sink_queue)
        assert n is not None, f"sink queue {self.sink_queue} vanished"
        return n

    def wait_sink_count(self, n: int, timeout: float = 60.0, queue: str | None = None) -> int:
        q = queue or self.sink_queue

        def got() -> int | None:
            c = self.broker.queue_count(q)
            return c if c is not None and c >= n else None

        return int(
            wait_for(
                got,
                timeout,
                lambda: (
                    f"{n} messages in {q} (has {self.broker.queue_count(q)})\n{self.diagnostics()}"
                ),
                interval=0.1,
            )
        )

    def delete(self, t: Teardown) -> None:
        """Delete the queues and the exchange; each step's failure is recorded in ``t``."""
        for q in [self.sink_queue, self.parking_queue, *self.extra_queues]:
            t.step(f"delete queue {q}", lambda q=q: self.broker.delete_queue(q))
        exchange = self.exchange
        t.step(f"delete exchange {exchange}", lambda: self.broker.delete_exchange(exchange))
