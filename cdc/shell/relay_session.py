"""One relay session: a replication connection and a broker connection, joined by a queue.

Its reader task owns the replication socket (decode, register in the watermark, answer
keepalives, send status updates, notice a silent walsender); its publisher task publishes
items in order with a bounded window of unconfirmed messages; its checkpoint task re-checks
the slot every ``checkpoint_interval``. When stopped it drains: it waits (at most
``shutdown_timeout``) for the confirms of what is in flight and reports the flushed position.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from cdc.config import RelaySettings
from cdc.core.feed import OutboxFeed, RoutedEvent
from cdc.core.liveness import PING, PROBE, SilenceClock
from cdc.core.lsn import format_lsn
from cdc.core.watermark import Txn, Watermark
from cdc.errors import SlotLostError, SourceError
from cdc.shell import slot as slots
from cdc.shell import slot_guard
from cdc.shell.metrics import Metrics
from cdc.shell.publisher import Publisher
from cdc.shell.source import ReplicationStream
from cdc.wire.replication import Keepalive, parse_copy_data

log = logging.getLogger(__name__)

# Send a status update this soon after the watermark moves; it bounds the duplicates that a
# crash can cause without writing one message per confirm.
_FLUSH_REPORT_DELAY = 0.02
# After CDC_SOURCE_TIMEOUT of silence: how long the look at the walsender may take, and the
# last short read before the connection is declared dead.
_PROBE_TIMEOUT = 10.0
_LAST_CHANCE = 0.2


class StreamSession:
    """One replication connection and one broker connection, joined by a queue."""

    def __init__(
        self,
        settings: RelaySettings,
        metrics: Metrics,
        stream: ReplicationStream,
        start_lsn: int,
        on_blocked: Callable[[bool], None],
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._stream = stream
        self.publisher = Publisher(settings, metrics, self._confirmed, on_blocked)
        self.watermark = Watermark(flushed=start_lsn)
        self._feed = OutboxFeed(
            settings.table_schema,
            settings.table_name,
            self.watermark,
            lambda reason: metrics.ignored.labels(reason=reason).inc(),
        )
        self._queue: deque[RoutedEvent] = deque()
        self._queued = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._progress: asyncio.Future[None] = loop.create_future()
        self._reported = start_lsn
        self._reported_at = 0.0
        self._server_end = start_lsn
        self._received = start_lsn

    async def run(self, stop: asyncio.Event, set_state: Any) -> int:
        """Stream until ``stop`` is set or a task fails (re-raised with its real cause);
        the number of events still unconfirmed when the drain ended."""
        reader = asyncio.create_task(self._read(), name="cdc-reader")
        writer = asyncio.create_task(self._publish(), name="cdc-publisher")
        checker = asyncio.create_task(self._checkpoint(), name="cdc-checkpoint")
        stopper = asyncio.create_task(stop.wait())
        failed = self.publisher.closed
        tasks: set[asyncio.Future[Any]] = {reader, writer, checker, stopper, failed}
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for done in (failed, reader, writer, checker):
                if done.done() and not done.cancelled() and done.exception() is not None:
                    raise done.exception()  # type: ignore[misc]
            set_state("draining")
            reader.cancel()
            checker.cancel()
            await asyncio.wait({reader})  # it lets go of the socket before the drain ends it
            return await self._drain()
        finally:
            for task in (reader, writer, checker, stopper):
                task.cancel()
            # Let them finish before the sockets close: the reader must unregister its fd
            # first, or a reused fd number would be taken from the next session's socket.
            await asyncio.gather(reader, writer, checker, stopper, return_exceptions=True)

    async def _checkpoint(self) -> None:
        """Every ``checkpoint_interval``: re-check the slot and publication, write the
        checkpoint (off the hot path, on its own connection). Ends only with a lost slot."""
        while True:
            await asyncio.sleep(self._settings.checkpoint_interval)
            try:
                await asyncio.to_thread(slot_guard.tick, self._settings, self.watermark.flushed)
            except SlotLostError:
                raise
            except SourceError as exc:
                # The stream notices a database outage on its own; try again next time.
                log.warning("checkpoint skipped: %s", exc)

    async def _drain(self) -> int:
        deadline = time.monotonic() + self._settings.shutdown_timeout
        while self.watermark.in_flight and time.monotonic() < deadline:
            if self.publisher.closed.done():
                break
            await asyncio.sleep(0.02)
        left = self.watermark.in_flight
        if not await self._stream.finish(
            self.watermark.flushed, max(1.0, deadline - time.monotonic())
        ):
            log.warning("the server did not acknowledge the end of the stream; the last "
                        "position report may be lost (the next start re-sends from the one "
                        "before)")
        log.info(
            "stopped at %s with %d event(s) unconfirmed",
            format_lsn(self.watermark.flushed), left,
        )
        return left

    # -- reader: owns the replication socket ------------------------------------------------

    async def _read(self) -> None:
        interval = self._settings.status_interval
        window = self._settings.max_in_flight
        next_status = time.monotonic() + interval
        clock = SilenceClock(self._settings.source_timeout, time.monotonic())
        data: memoryview | None = None
        heard = False  # the last read got a message (``data`` is dropped once handled)
        while True:
            now = time.monotonic()
            if heard:
                clock.heard = now  # the loop's clock: no extra call per message
            moved = self.watermark.flushed > self._reported
            if (moved and now - self._reported_at >= _FLUSH_REPORT_DELAY) or now >= next_status:
                await self._report()
                self._reported_at = now
                next_status = now + interval
            if self.watermark.in_flight >= window:
                await self._wait_progress(min(interval, max(0.0, next_status - now)))
                clock.reset(time.monotonic())  # not listening meanwhile
                heard = False
                continue
            if not heard:  # only after a read that got nothing: no cost per message
                due = clock.due(now)
                if due is PROBE:
                    data = await self._probe(clock, now)
                    heard = data is not None
                    if data is not None and self._on_copy_data(data):
                        await self._report()
                    data = None
                    continue
                if due is PING:
                    await self._report(reply=True)  # a live walsender answers at once
                    clock.ping(now)
            if self.watermark.flushed > self._reported or self.watermark.in_flight:
                timeout = _FLUSH_REPORT_DELAY
            else:
                timeout = max(0.0, min(next_status, clock.wake()) - now)
            data = await self._stream.read(timeout)
            heard = data is not None
            # Then whatever libpq already holds (what its last read of the socket brought)
            # without the checks above: no confirm runs before this task yields, and they
            # are made right after; only the window is checked per message. Each message is
            # dropped once handled: a large message's buffer (libpq's copy) is then held
            # only by the events waiting for their confirm.
            while data is not None:
                if self._on_copy_data(data):
                    data = None
                    await self._report()
                    break
                if self.watermark.in_flight >= window:
                    data = None
                    break
                data = self._stream.read_ready()

    async def _probe(self, clock: SilenceClock, now: float) -> memoryview | None:
        """After CDC_SOURCE_TIMEOUT of silence: None to wait on (the walsender is busy), a
        message that came meanwhile, or SourceError: the connection is dead."""
        silent = clock.silent_for(now)
        if await self._server_busy(silent):
            clock.busy(time.monotonic())
            return None
        data = await self._stream.read(_LAST_CHANCE)  # it may have answered meanwhile
        if data is None:
            raise SourceError(
                f"nothing from PostgreSQL in {silent:.1f}s, not even the keepalive asked for, "
                f"and its walsender is not busy (CDC_SOURCE_TIMEOUT={clock.timeout:g}); the "
                "connection is presumed dead"
            )
        return data

    async def _server_busy(self, silent: float) -> bool:
        """True if our walsender is alive and busy, so its silence is not a dead connection."""
        pid = self._stream.backend_pid
        try:
            busy = await asyncio.wait_for(
                asyncio.to_thread(slots.walsender_busy, self._settings, pid), _PROBE_TIMEOUT
            )
        except TimeoutError:
            busy = None
        if busy is not None:
            log.info(
                "nothing from PostgreSQL in %.1fs, but its walsender %d is busy (%s): waiting",
                silent, pid, busy,
            )
        return busy is not None

    async def _wait_progress(self, timeout: float) -> None:
        if self._progress.done():
            self._progress = asyncio.get_running_loop().create_future()
        # asyncio.wait, not wait_for: on 3.11 wait_for swallows a cancellation that arrives
        # as the future completes, and a reader that misses its cancel never ends.
        await asyncio.wait((self._progress,), timeout=timeout)

    def _on_copy_data(self, data: memoryview) -> bool:
        """Handle one CopyData message; True if the server asked for an immediate reply."""
        msg = parse_copy_data(data)
        if msg.wal_end > self._server_end:
            self._server_end = msg.wal_end
        if isinstance(msg, Keepalive):
            if not self._feed.in_transaction:
                self.watermark.keepalive(msg.wal_end)
            return msg.reply_requested
        self._received = msg.wal_start
        item = self._feed.handle(msg.payload, msg.wal_start)
        if item is not None:
            queue = self._queue
            if not queue:  # else the publisher is awake already: it waits only on an empty queue
                self._queued.set()
            queue.append(item)
        return False

    async def _report(self, *, reply: bool = False) -> None:
        flushed = self.watermark.flushed
        await self._stream.send_status(flushed, reply=reply)
        self._reported = flushed
        m = self._metrics
        m.received_lsn.set(self._received)
        m.flushed_lsn.set(flushed)
        m.server_lsn.set(self._server_end)
        m.lag_bytes.set(max(0, self._server_end - flushed))
        m.inflight.set(self.watermark.in_flight)
        oldest = self.watermark.oldest_pending_commit()
        m.lag_seconds.set(max(0.0, time.time() - oldest) if oldest else 0.0)

    # -- publisher: everything queued goes out in one write per loop turn ---------------------
    # The window needs no semaphore: the reader stops reading once `max_in_flight` events
    # are decoded but not confirmed, and every queued event counts in that number.

    async def _publish(self) -> None:
        queue, publisher = self._queue, self.publisher
        while True:
            while not queue:
                self._queued.clear()
                await self._queued.wait()
            await publisher.wait_writable()
            while queue:
                txn, item = queue.popleft()
                publisher.publish(txn, item)

    def _confirmed(self, txns: list[Txn]) -> None:
        now = time.time()
        observe = self._metrics.confirm_latency.observe
        confirm = self.watermark.confirm
        for txn in txns:
            confirm(txn)
            latency = now - txn.commit_time
            observe(latency if latency > 0.0 else 0.0)  # max() is a call more, per event
        if not self._progress.done():
            self._progress.set_result(None)
