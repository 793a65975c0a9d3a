"""The reconnect loop of the relay and the workers: one session after another until stopped.

A *session* is what a program runs on fresh connections (the relay: a replication and a
broker connection; a worker: a broker connection). :func:`run_sessions` starts one; when it
fails with an outage (an exception of ``outages``: a connection lost, a server restarting)
it starts the next after a backoff with full jitter. A session that had run for
:data:`HEALTHY_SESSION` seconds before failing was a recovery, so the backoff starts over:
a relay that ran for a day does not wait 30 s after its next blip. Any other exception
ends the loop: a refusal (a login, a vhost, a privilege: retrying cannot help; the
process exits 3) or a setup error. The stop event ends the loop at the next decision and
cuts the wait between sessions short.

:class:`Reconnects` is the pure decision: how long to wait after a failed session.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cdc.service.backoff import Backoff

#: Seconds a session must have run for its failure to start the backoff over.
HEALTHY_SESSION = 30.0

T = TypeVar("T")


class Again(enum.Enum):
    """What a session returns to be started again at once, without counting a failure
    (the relay's hot standby, after waiting its turn for a busy slot)."""

    AGAIN = "again"


AGAIN = Again.AGAIN


@dataclass(slots=True)
class Reconnects:
    """The delay before each new session (pure: the caller says how long the last ran)."""

    backoff: Backoff
    healthy_after: float = HEALTHY_SESSION

    def delay_after(self, lasted: float) -> float:
        """The wait before the next session, after one that failed ``lasted`` seconds in."""
        if lasted > self.healthy_after:
            self.backoff.reset()
        return self.backoff.next_delay()


async def pause(stop: asyncio.Event, seconds: float) -> None:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def run_sessions(
    session: Callable[[], Awaitable[T | Again]],
    *,
    stop: asyncio.Event,
    backoff: Backoff,
    outages: tuple[type[Exception], ...],
    ended: Callable[[BaseException, float], None],
    refusals: tuple[type[Exception], ...] = (),
) -> T | None:
    """Run ``session`` until it returns (its result), ``stop`` is set (None), or it raises
    anything but an outage (propagated). ``refusals`` are kinds of outages that no retry
    can fix (the relay's SetupError is a SourceError): they propagate too.

    After an outage, ``ended(exc, delay)`` reports it (log, metrics, state) and the next
    session starts ``delay`` seconds later. An outage while stopping ends the loop quietly:
    there is no next session to announce.
    """
    schedule = Reconnects(backoff)
    while not stop.is_set():
        started = time.monotonic()
        try:
            result = await session()
        except outages as exc:
            if isinstance(exc, refusals):
                raise
            if stop.is_set():
                return None
            delay = schedule.delay_after(time.monotonic() - started)
            ended(exc, delay)
            await pause(stop, delay)
            continue
        if isinstance(result, Again):
            continue
        return result
    return None
