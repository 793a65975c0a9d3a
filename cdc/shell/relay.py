"""The relay: wires the replication stream, the outbox feed, the watermark and the publisher.

A *session* is one replication connection plus one broker connection (``relay_session``:
its reader and publisher tasks). Any failure ends the session with the real cause;
:meth:`Relay.run` then backs off and starts a new one, which resumes at the slot's
``confirmed_flush_lsn``, so whatever was not confirmed is streamed and published again. A
busy slot (another relay streams) makes this relay a hot standby that keeps trying to take over.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from cdc.config import RelaySettings
from cdc.core.checkpoint import Action
from cdc.core.lsn import format_lsn
from cdc.core.watermark import Watermark
from cdc.errors import SetupError, SinkError, SlotBusyError, SlotLostError, SourceError
from cdc.service.backoff import Backoff
from cdc.service.session import AGAIN, Again, pause, run_sessions
from cdc.shell import slot as slots
from cdc.shell import slot_guard
from cdc.shell.metrics import Metrics
from cdc.shell.relay_session import StreamSession
from cdc.shell.source import ReplicationStream

log = logging.getLogger(__name__)

#: Exit codes of `cdc relay` (README, "Exit codes").
EXIT_STOPPED = 0
EXIT_DRAIN_TIMEOUT = 4
EXIT_SLOT_LOST = 5

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
        # The walsender of this process's last session: a later session may end it (slot.py).
        self._last_walsender: int | None = None

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
        code = await run_sessions(
            self._attempt,
            stop=self._stop,
            backoff=Backoff(
                self._settings.reconnect_min_delay, self._settings.reconnect_max_delay
            ),
            outages=(SourceError, SinkError),
            ended=self._ended,
            refusals=(SetupError,),
        )
        return EXIT_STOPPED if code is None else code

    async def _attempt(self) -> int | Again:
        """One session; the relay's own outcomes of it: a busy slot (wait as a standby,
        then again), a lost slot (exit 5), a refusal by the walsender."""
        try:
            return await self._session()
        except SlotBusyError:
            self._set_state("standby")
            await self._sleep(self._settings.standby_poll_interval)
            return AGAIN
        except SlotLostError as exc:
            return await self._slot_lost(exc)
        except SetupError as refusal:
            # The walsender refused mid-stream (e.g. "publication ... does not exist"):
            # with a checkpoint row that is a lost slot, not "run cdc setup".
            try:
                await asyncio.to_thread(slot_guard.recheck, self._settings)
            except SlotLostError as exc:
                return await self._slot_lost(exc)
            except SourceError as exc:  # cannot tell: report the walsender's refusal
                log.warning("slot check after the refusal failed: %s", exc)
            raise refusal

    def _ended(self, exc: BaseException, delay: float) -> None:
        """A session failed with an outage; the next starts in ``delay`` seconds."""
        side = "broker" if isinstance(exc, SinkError) else "database"
        self._metrics.reconnects.labels(side=side).inc()
        self._set_state("reconnecting")
        log.warning("session ended (%s): %s; retrying in %.2fs", side, exc, delay)

    async def _sleep(self, seconds: float) -> None:
        await pause(self._stop, seconds)

    async def _slot_lost(self, exc: SlotLostError) -> int:
        """Say so everywhere (log, /healthz, metrics), linger for a scrape, exit 5."""
        self.lost_reason = exc.reason
        self._set_state("slot_lost")
        self._metrics.slot_lost.set(1)
        log.error("%s", exc)
        await self._sleep(min(self._settings.status_interval, _LOST_LINGER))
        return EXIT_SLOT_LOST

    def _end_stale_walsender(self, pid: int) -> None:
        """End this process's previous walsender if it still holds the slot (in a thread)."""
        with slots.connect(self._settings) as conn:
            if slots.end_stale_walsender(conn, self._settings, pid):
                log.warning("ended walsender %d of this relay's previous session", pid)

    async def _session(self) -> int:
        if self._last_walsender is not None:
            await asyncio.to_thread(self._end_stale_walsender, self._last_walsender)
        opened = await asyncio.to_thread(slot_guard.open_slot, self._settings)
        if opened.action is not Action.STREAM:
            verb = "created" if opened.action is Action.CREATE else "adopted"
            log.info("%s replication slot %s", verb, self._settings.slot_name)
        start_lsn = opened.start_lsn
        stream = await ReplicationStream.start(self._settings)
        self._last_walsender = stream.backend_pid
        session = StreamSession(self._settings, self._metrics, stream, start_lsn, self._blocked)
        publisher = session.publisher
        try:
            await publisher.connect()
            self._watermark = session.watermark
            self._set_state("streaming")
            log.info(
                "streaming from slot %s at %s (pgoutput v%d)",
                self._settings.slot_name, format_lsn(start_lsn), stream.proto_version,
            )
            left = await session.run(self._stop, self._set_state)
            return EXIT_DRAIN_TIMEOUT if left else EXIT_STOPPED
        except (SourceError, SinkError) as exc:
            if not isinstance(exc, SetupError | SlotLostError):
                # Say so before the (possibly slow) teardown of the other connection.
                self._set_state("reconnecting")
            raise
        finally:
            self._metrics.broker_blocked.set(0)
            await publisher.close()
            await stream.close()

    def _blocked(self, blocked: bool) -> None:
        """The broker blocks (memory/disk alarm) or unblocks publishing on this session."""
        self._metrics.broker_blocked.set(1 if blocked else 0)
        if blocked and self.state == "streaming":
            self._set_state("blocked")
        elif not blocked and self.state == "blocked":
            self._set_state("streaming")
