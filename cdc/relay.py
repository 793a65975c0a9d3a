"""The relay: wires the replication stream, the outbox feed, the watermark and the publisher.

A *session* is one replication connection plus one broker connection. Its reader task owns
the replication socket (decode, register in the watermark, answer keepalives, send status
updates); its publisher task publishes items in order with a bounded window of unconfirmed
messages. Any failure ends the session with the real cause; :meth:`Relay.run` then backs off
and starts a new one, which resumes at the slot's ``confirmed_flush_lsn``, so whatever was
not confirmed is streamed and published again. A busy slot (another relay streams) makes
this relay a hot standby that keeps trying to take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any

from cdc import slot_guard
from cdc.backoff import Backoff
from cdc.checkpoint import Action
from cdc.config import RelaySettings
from cdc.errors import SetupError, SinkError, SlotBusyError, SlotLostError, SourceError
from cdc.feed import Item, OutboxFeed
from cdc.lsn import format_lsn
from cdc.metrics import Metrics
from cdc.publisher import Publisher
from cdc.replication import Keepalive, parse_copy_data
from cdc.source import ReplicationStream
from cdc.watermark import Txn, Watermark

log = logging.getLogger(__name__)

#: Exit codes of `cdc relay` (README, "Exit codes").
EXIT_STOPPED = 0
EXIT_DRAIN_TIMEOUT = 4
EXIT_SLOT_LOST = 5

# Send a status update this soon after the watermark moves; it bounds the duplicates that a
# crash can cause without writing one message per confirm.
_FLUSH_REPORT_DELAY = 0.02
_HEALTHY_SESSION = 30.0
# How long a relay whose slot is lost keeps /metrics and /healthz up before exiting 5, at
# most: long enough for a scrape to see `slot_lost`, short enough for a supervisor.
_LOST_LINGER = 15.0


class Relay:
    """Runs sessions until stopped; see the module docstring."""

    def __init__(self, settings: RelaySettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._stop = asyncio.Event()
        self.state = "starting"
        self.lost_reason: str | None = None
        self._watermark = Watermark()

    def stop(self) -> None:
        """Ask the relay to drain and exit (signal handlers call this)."""
        self._stop.set()

    def health(self) -> dict[str, Any]:
        """What `/healthz` reports."""
        health: dict[str, Any] = {
            "state": self.state,
            "slot": self._settings.slot_name,
            "flushed_lsn": format_lsn(self._watermark.flushed),
            "in_flight": self._watermark.in_flight,
        }
        if self.lost_reason is not None:
            health["reason"] = self.lost_reason
        return health

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("relay state: %s", state)
        self.state = state
        self._metrics.set_state(state)

    async def run(self) -> int:
        """Stream until stopped; return the exit code. SetupError propagates (not retried);
        a lost slot returns :data:`EXIT_SLOT_LOST` after a short linger."""
        backoff = Backoff(self._settings.reconnect_min_delay, self._settings.reconnect_max_delay)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                return await self._session()
            except SlotBusyError:
                self._set_state("standby")
                await self._sleep(self._settings.standby_poll_interval)
                continue
            except SlotLostError as exc:
                return await self._slot_lost(exc)
            except SetupError:
                # The walsender refused mid-stream (e.g. "publication ... does not exist"):
                # with a checkpoint row that is a lost slot, not "run cdc setup".
                try:
                    await asyncio.to_thread(slot_guard.recheck, self._settings)
                except SlotLostError as exc:
                    return await self._slot_lost(exc)
                raise
            except (SourceError, SinkError) as exc:
                side = "broker" if isinstance(exc, SinkError) else "database"
                self._metrics.reconnects.labels(side=side).inc()
                self._set_state("reconnecting")
                if time.monotonic() - started > _HEALTHY_SESSION:
                    backoff.reset()
                delay = backoff.next_delay()
                log.warning("session ended (%s): %s; retrying in %.2fs", side, exc, delay)
                await self._sleep(delay)
        return EXIT_STOPPED

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    async def _slot_lost(self, exc: SlotLostError) -> int:
        """Say so everywhere (log, /healthz, metrics), linger for a scrape, exit 5."""
        self.lost_reason = exc.reason
        self._set_state("slot_lost")
        self._metrics.slot_lost.set(1)
        log.error("%s", exc)
        await self._sleep(min(self._settings.status_interval, _LOST_LINGER))
        return EXIT_SLOT_LOST

    async def _session(self) -> int:
        opened = await asyncio.to_thread(slot_guard.open_slot, self._settings)
        if opened.action is not Action.STREAM:
            verb = "created" if opened.action is Action.CREATE else "adopted"
            log.info("%s replication slot %s", verb, self._settings.slot_name)
        start_lsn = opened.start_lsn
        stream = await ReplicationStream.start(self._settings)
        session = _Session(self._settings, self._metrics, stream, start_lsn)
        publisher = session.publisher
        try:
            await publisher.connect()
            self._watermark = session.watermark
            self._set_state("streaming")
            log.info(
                "streaming from slot %s at %s (pgoutput v%d)",
                self._settings.slot_name, format_lsn(start_lsn), stream.proto_version,
            )
            return await session.run(self._stop, self._set_state)
        except (SourceError, SinkError) as exc:
            if not isinstance(exc, SetupError | SlotLostError):
                # Say so before the (possibly slow) teardown of the other connection.
                self._set_state("reconnecting")
            raise
        finally:
            await publisher.close()
            await stream.close()


class _Session:
    """One replication connection and one broker connection, joined by a queue."""

    def __init__(
        self, settings: RelaySettings, metrics: Metrics, stream: ReplicationStream, start_lsn: int
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._stream = stream
        self.publisher = Publisher(settings, metrics, self._confirmed)
        self.watermark = Watermark(flushed=start_lsn)
        self._feed = OutboxFeed(
            settings.table_schema,
            settings.table_name,
            self.watermark,
            lambda reason: metrics.ignored.labels(reason=reason).inc(),
        )
        self._queue: deque[Item] = deque()
        self._queued = asyncio.Event()
        loop = asyncio.get_running_loop()
        self._progress: asyncio.Future[None] = loop.create_future()
        self._reported = start_lsn
        self._reported_at = 0.0
        self._server_end = start_lsn
        self._received = start_lsn

    async def run(self, stop: asyncio.Event, set_state: Any) -> int:
        """Stream until ``stop`` is set or a task fails (re-raised with its real cause)."""
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
        await self._stream.send_status(self.watermark.flushed)
        log.info(
            "stopped at %s with %d event(s) unconfirmed",
            format_lsn(self.watermark.flushed), left,
        )
        return EXIT_DRAIN_TIMEOUT if left else EXIT_STOPPED

    # -- reader: owns the replication socket ------------------------------------------------

    async def _read(self) -> None:
        interval = self._settings.status_interval
        next_status = time.monotonic() + interval
        while True:
            now = time.monotonic()
            moved = self.watermark.flushed > self._reported
            if (moved and now - self._reported_at >= _FLUSH_REPORT_DELAY) or now >= next_status:
                await self._report()
                self._reported_at = now
                next_status = now + interval
            if self.watermark.in_flight >= self._settings.max_in_flight:
                await self._wait_progress(min(interval, max(0.0, next_status - now)))
                continue
            pending = self.watermark.flushed > self._reported or self.watermark.in_flight
            timeout = _FLUSH_REPORT_DELAY if pending else max(0.0, next_status - now)
            data = await self._stream.read(timeout)
            if data is not None and self._on_copy_data(data):
                await self._report()

    async def _wait_progress(self, timeout: float) -> None:
        if self._progress.done():
            self._progress = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._progress), timeout)

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
            self._queue.append(item)
            self._queued.set()
        return False

    async def _report(self) -> None:
        flushed = self.watermark.flushed
        await self._stream.send_status(flushed)
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
            observe(max(0.0, now - txn.commit_time))
        if not self._progress.done():
            self._progress.set_result(None)
