"""The worker's I/O shell: sessions, consuming, micro-batches, acks, shutdown, reconnects.

A *session* is a consuming channel (``cdc.shell.consume_channel``; ``CDC_WORKER_PREFETCH``
split across the queues' consumers, see ``prefetch``) and an aio-pika connection for the
topology and the confirm-mode publishing channel.
Deliveries land in a local buffer; one loop takes up to ``CDC_WORKER_BATCH_SIZE`` of them at a
time and, in order:

1. routes and validates each (``intake``, ``dispatch``): a rejected message is parked at once;
2. runs the valid ones in one PostgreSQL transaction (``batch``, on ``database``'s
   connection): inbox claim, a savepoint per handler, one commit;
3. decides each message's disposition (``policy.decide``: ack, retry later, park);
4. acks the batch (``acks.AckTracker``): one ``basic.ack(multiple=True)`` on its last
   delivery tag when every earlier tag of the channel is settled. A message whose
   disposition is a copy (``copies``: retry TTL queue, several in one retry bundle, or
   parking queue) is acked only once its copy is confirmed, on a task of its own
   (``settling``), while the next batch goes ahead.

A worker with ``outside`` effects (HTTP, SMTP; see ``spec``) is pipelined (``outside``): every
delivery is routed and its effects started as it arrives (the prefetch bounds how many),
and whatever finished its effects is run in the next batch, copied if failed and acked:
when a slow effect holds an earlier message, the later ones wait for its multiple ack, or
are acked on their own once too many wait (``acks``). Two copies of one message id are
never in hand at once.

A retry bundle that comes back is unpacked as it is delivered (``intake.unpack``): its
members are buffered as deliveries of their own, and its one delivery tag is acked when the
last of them is settled (``members``).

Nothing is acked before its effects are committed or its copy is confirmed. A broker failure
ends the session: the buffer is dropped (those messages are redelivered, the inbox absorbs
what already committed) and a new session starts after a backoff with jitter. A database
failure keeps the batch in hand and runs it again once PostgreSQL is back.

Shutdown (:meth:`Runner.stop`): cancel the consumers, finish and ack what is in hand, exit.
The CLI bounds that with ``CDC_WORKER_SHUTDOWN_TIMEOUT`` and then cancels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel

from cdc.errors import RefusedError, SinkError
from cdc.service.backoff import Backoff
from cdc.service.session import run_sessions
from cdc.shell.consume_channel import ConsumeChannel, open_consume_channel
from cdc.wire.deliveries import Delivered
from consumers.config import ConsumerSettings
from consumers.connect import AMQP_ERRORS as _AMQP_ERRORS
from consumers.connect import open_broker, refused_by_broker
from consumers.errors import BrokerLost, Unroutable
from consumers.runtime import headers as hdr
from consumers.runtime import topology
from consumers.runtime.acks import AckTracker
from consumers.runtime.batch import FAILED, BatchMessage
from consumers.runtime.copies import Copier, Handled, dispositions
from consumers.runtime.database import WorkerDatabase
from consumers.runtime.intake import intake, unpack
from consumers.runtime.linger import Linger, wait_for_more
from consumers.runtime.members import MemberCounts
from consumers.runtime.metrics import WorkerMetrics
from consumers.runtime.names import Names, build_names
from consumers.runtime.outside import OutsideEffects
from consumers.runtime.policy import RetryRules
from consumers.runtime.prefetch import split_prefetch
from consumers.runtime.settling import Settling
from consumers.runtime.spec import WorkerSpec

log = logging.getLogger(__name__)

#: How long a batch done with its outside effects, short of ``_ENOUGH``, waits for more
#: (seconds). It delays only the commit and the ack: at a paced 1,000 events/s 20 ms instead
#: of 5 took a fifth off the notifications batches' server CPU.
_LINGER = 0.02
_ENOUGH = 32


def names_for(settings: ConsumerSettings, spec: WorkerSpec) -> Names:
    """The broker names of ``spec`` under ``settings`` (prefix, retry ladder)."""
    return build_names(
        settings.worker_queue_prefix,
        spec.service,
        tuple((q.name, q.bindings) for q in spec.queues),
        settings.worker_max_attempts,
        settings.worker_retry_delays,
    )


class Runner:
    """Runs one worker until stopped; see the module docstring."""

    def __init__(
        self, settings: ConsumerSettings, spec: WorkerSpec, metrics: WorkerMetrics
    ) -> None:
        self._s = settings
        self._spec = spec
        self._metrics = metrics
        self.names = names_for(settings, spec)
        self._rules = RetryRules(settings.worker_max_attempts, settings.worker_retry_delays)
        self._copier = Copier(spec.name, self.names, metrics, settings.worker_confirm_timeout)
        self._prefetch = split_prefetch(settings.worker_prefetch, len(self.names.queues))
        metrics.start_at_zero(
            [name for name, _ in self.names.queues], self.names.parking_queue, list(hdr.KINDS)
        )
        self._stop = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._buffer: deque[tuple[str, Delivered]] = deque()
        self._queue_of: dict[str, str] = {}  # consumer tag -> queue
        # Held for a multiple ack: at most a quarter of the smallest prefetch share (acks).
        self._acks = AckTracker(hold=min(self._prefetch) // 4)
        self._linger = Linger(settings.worker_batch_linger_max)
        self._members = MemberCounts()  # retry bundles: one delivery tag, several messages
        # Workers with effects outside the database: the messages between their delivery
        # and their batch, and the task that commits and acks those done with their effects.
        self._effects = (
            None
            if spec.outside is None
            else OutsideEffects(
                spec.outside,
                lambda: Backoff(
                    settings.worker_reconnect_min_delay, settings.worker_reconnect_max_delay
                ),
                self._stop,
                self._wakeup,
            )
        )
        self._committer: asyncio.Task[None] | None = None
        self._committing = False
        self._settling = Settling(self._acks, self._members, self._copier, self._wakeup.set)
        self._lost: asyncio.Future[BaseException] | None = None
        self._db = WorkerDatabase(settings, spec, metrics)
        self._publisher: AbstractChannel | None = None
        self.state = "starting"

    # -- control ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop consuming, finish what is buffered, return from :meth:`run` (signal handler)."""
        self._stop.set()
        self._wakeup.set()

    def health(self) -> dict[str, Any]:
        """What ``/healthz`` reports."""
        return {
            "state": self.state,
            "worker": self._spec.name,
            "buffered": len(self._buffer),
            "unacked": len(self._acks),
        }

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("worker state: %s", state, extra={"worker": self._spec.name})
        self.state = state
        self._metrics.set_state(state)

    async def run(self) -> None:
        """Prepare the database, then run sessions until stopped."""
        await self._db.connection()  # the database answers before the broker session
        await run_sessions(
            self._attempt,
            stop=self._stop,
            backoff=Backoff(
                self._s.worker_reconnect_min_delay, self._s.worker_reconnect_max_delay
            ),
            outages=(BrokerLost, Unroutable, SinkError, *_AMQP_ERRORS),
            ended=self._ended,
        )
        self._set_state("stopped")

    async def _attempt(self) -> None:
        """One broker session; what it delivered and did not ack is dropped if it fails."""
        try:
            await self._session()
        except (aiormq.exceptions.ChannelAccessRefused, RefusedError) as exc:
            raise refused_by_broker(exc) from exc  # a permission: no retry can help
        except (BrokerLost, Unroutable, SinkError, *_AMQP_ERRORS):
            self._drop_session_work()
            raise

    def _ended(self, exc: BaseException, delay: float) -> None:
        """The broker session failed; the next starts in ``delay`` seconds."""
        self._metrics.reconnects.labels(worker=self._spec.name, side="broker").inc()
        self._set_state("reconnecting")
        log.warning("broker session ended: %r; reconnecting in %.2fs", exc, delay)

    async def close(self) -> None:
        """Release the database connection and the worker's own resources."""
        await self._db.close()
        if self._spec.on_close is not None:
            await self._spec.on_close()

    # -- database ---------------------------------------------------------------------------

    # -- broker -----------------------------------------------------------------------------

    def _on_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(exc or BrokerLost("broker connection closed"))
        self._wakeup.set()

    def _on_delivery(self, message: Delivered) -> None:
        queue, tag = self._queue_of[message.consumer_tag], message.delivery_tag
        self._acks.delivered(tag)
        members = unpack(queue, message)
        self._members.expect(tag, len(members))
        self._buffer.extend((queue, m) for m in members)
        self._wakeup.set()

    def _drop_session_work(self) -> None:
        """The channel is gone: what it delivered and we did not ack is redelivered."""
        if self._committer is not None:
            self._committer.cancel()
            self._committer = None
        if self._effects is not None:
            self._effects.clear()
        self._settling.cancel()
        self._buffer.clear()
        self._acks.clear()
        self._members.clear()

    async def _session(self) -> None:
        self._lost = asyncio.get_running_loop().create_future()
        connection = await open_broker(self._s.broker_url(), timeout=10)
        connection.close_callbacks.add(self._on_close)
        poller: asyncio.Task[None] | None = None
        consuming: ConsumeChannel | None = None
        try:
            # on_return_raises: a copy no queue took must fail, not count as confirmed.
            publishing = await connection.channel(publisher_confirms=True, on_return_raises=True)
            publishing.close_callbacks.add(self._on_close)
            await topology.declare(publishing, self._s, self.names)
            self._publisher = await publishing.get_underlay_channel()
            parking = self.names.parking_queue
            gauge = self._metrics.parked_messages.labels(worker=self._spec.name, queue=parking)
            every = self._s.worker_parked_poll_interval
            poller = asyncio.create_task(
                topology.watch_depth(connection, parking, gauge.set, every)
            )
            consuming = await open_consume_channel(self._s.broker_address(), self._on_delivery)
            await self._start_consumers(consuming)
            self._set_state("consuming")
            await self._consume(consuming, list(self._queue_of))
        finally:
            if poller is not None:
                poller.cancel()
            if self._committer is not None:
                self._committer.cancel()
                self._committer = None
            self._settling.cancel()
            self._publisher = None
            if consuming is not None:
                await consuming.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), timeout=2)

    async def _start_consumers(self, channel: ConsumeChannel) -> None:
        channel.closed.add_done_callback(lambda _: self._on_close(None, channel.error()))
        self._settling.channel = channel
        # Tags chosen here: a delivery can come in the same read as its Consume-Ok.
        queues = [name for name, _ in self.names.queues]
        self._queue_of = {f"{self._spec.name}:{i}:{q}"[:255]: q for i, q in enumerate(queues)}
        for (tag, name), share in zip(self._queue_of.items(), self._prefetch, strict=True):
            await channel.consume(name, share, tag)

    async def _consume(self, channel: ConsumeChannel, tags: list[str]) -> None:
        stopping = False
        while True:
            self._wakeup.clear()
            if self._lost is not None and self._lost.done():
                raise BrokerLost(repr(self._lost.result()))
            self._settling.check()  # a copy that failed ends the session
            if self._stop.is_set() and not stopping:
                stopping = True
                self._set_state("draining")
                if self._spec.on_drain is not None:
                    self._spec.on_drain()
                # Deliveries sent before cancel-ok still land in the buffer; none after.
                for tag in tags:
                    await channel.cancel(tag)
                log.info(
                    "consumers cancelled; finishing %d messages in hand",
                    len(self._buffer) + self._effects_in_hand(),
                )
            if self._effects is not None:
                # Start the effects of everything delivered (the prefetch bounds it); the
                # committer task commits and acks whatever finished them, meanwhile.
                if self._committer is None:
                    self._committer = asyncio.create_task(self._commit_loop())
                elif self._committer.done():
                    self._committer.result()  # its BrokerLost ends the session
                while self._buffer:
                    await self._start_outside(self._take(self._buffer))
                if stopping and not (self._effects.busy() or self._committing or self._settling):
                    return
            elif self._buffer:
                if not stopping:
                    await self._fill(self._linger.wait(time.monotonic()))
                started = time.monotonic()
                await self._handle(self._take(self._buffer))
                self._linger.ran(started, time.monotonic())
                continue
            elif stopping and not self._settling:
                return
            await self._wakeup.wait()

    async def _fill(self, seconds: float) -> None:
        """Let a short batch wait up to ``seconds`` for more messages (``linger``): a paced
        flow would otherwise make small batches, each paying a commit for a few events."""
        await wait_for_more(
            self._wakeup,
            lambda: len(self._buffer) >= self._s.worker_batch_size or self._stop.is_set(),
            seconds,
        )

    def _effects_in_hand(self) -> int:
        return 0 if (e := self._effects) is None else len(e.running) + len(e.ready)

    async def _commit_loop(self) -> None:
        """Commit and ack the messages whose outside effects are done, a batch at a time."""
        assert self._effects is not None
        while True:
            batch = await self._effects.next_batch(self._s.worker_batch_size, _LINGER, _ENOUGH)
            self._committing = True
            try:
                await self._settle(batch, [])
                await self._effects.relaunch_deferred()
            finally:
                self._committing = False
                self._wakeup.set()  # the consume loop decides whether a stop is done

    def _take(self, queue: deque[Any]) -> list[Any]:
        """Up to ``CDC_WORKER_BATCH_SIZE`` entries from the front of ``queue``."""
        return [queue.popleft() for _ in range(min(len(queue), self._s.worker_batch_size))]

    # -- one batch --------------------------------------------------------------------------

    async def _handle(self, batch: list[tuple[str, Delivered]]) -> None:
        items, rejected = intake(self._spec.routes, self._rules, batch)
        await self._settle(items, rejected)

    async def _start_outside(self, batch: list[tuple[str, Delivered]]) -> None:
        """Start the worker's outside effects for ``batch``; rejected messages settle now."""
        assert self._effects is not None
        items, rejected = intake(self._spec.routes, self._rules, batch)
        if rejected:
            await self._settle([], rejected)
        await self._effects.launch(items)

    async def _settle(self, items: list[BatchMessage], handled: list[Handled]) -> None:
        """Commit ``items`` (those whose outside effects failed are not run), decide the
        disposition of each of them, and ack them with the ``handled`` ones: at once where
        the disposition is an ack, once their copies are confirmed otherwise (meanwhile the
        next batch goes ahead)."""
        failed = [i for i in items if i.outcome == FAILED]
        if failed:
            # Nothing for the database: their copies go out while the batch commits, and
            # their tags, which hold every later one's ack, are confirming sooner.
            await self._dispose(failed, [])
        run = [i for i in items if i.outcome != FAILED]
        if run:
            await self._db.run(run)
        self._metrics.count_batch(items)
        await self._dispose(run, handled)

    async def _dispose(self, items: list[BatchMessage], handled: list[Handled]) -> None:
        """Decide what becomes of ``items`` (run or failed) and carry it out with the
        ``handled`` ones: acks now, copies on their own task, the originals acked after."""
        acked, copies, acked_items, copied = dispositions(items, handled, self._rules)
        if copies:
            self._settling.copy_then_ack(self._publisher, copies, lambda: self._settled(copied))
        self._release(acked_items)
        self._settling.ack(acked)
        if acked or copies:
            last = max(acked + copies, key=lambda h: h.message.delivery_tag)
            props = last.message.properties
            self._metrics.acked(last.queue, hdr.committed_at(props.headers, props.timestamp))

    def _release(self, items: list[BatchMessage]) -> None:
        """``items`` are settled: a later copy of one of their ids may start its effects."""
        if self._effects is not None:
            self._effects.settled(items)

    async def _settled(self, items: list[BatchMessage]) -> None:
        """``items`` are acked, their copies confirmed: release them, and start the copies
        of their ids that waited (no later batch may come to start them)."""
        self._release(items)
        if self._effects is not None:
            await self._effects.relaunch_deferred()
