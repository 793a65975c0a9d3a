"""How long a short batch waits for more messages before it runs, and the wait itself.

Every batch pays fixed costs (the commit and its WAL flush, the statements' round trips, the
ack) however few messages it holds. Under a paced flow a replica's next batch holds what
arrived while its previous batch ran, so when batches get slow (a busy database, a loaded
machine, a second replica splitting the flow) they also get small, and each event costs
more just when capacity is short. Waiting a moment lets a short batch fill.

The rule: a short batch waits as long as the previous batch took, at most
``CDC_WORKER_BATCH_LINGER_MAX``, so it roughly doubles what a busy replica puts in one
transaction while adding no more latency than a batch already costs. It does not wait when
the worker had been idle for longer than that before the batch's first message arrived: the
flow is then sparse, more messages are unlikely within the wait, and waiting would only add
latency (the first batch after start-up does not wait either). A full batch never waits.
:class:`Linger` decides (pure); :func:`wait_for_more` waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Linger:
    """The linger decision of one consume loop; times are ``time.monotonic()`` seconds."""

    cap: float
    _took: float = field(default=0.0, init=False)
    _ended: float | None = field(default=None, init=False)

    def ran(self, started: float, ended: float) -> None:
        """Record that a batch was handled from ``started`` to ``ended``."""
        self._took = max(0.0, ended - started)
        self._ended = ended

    def wait(self, now: float) -> float:
        """Seconds a short batch found at ``now`` may wait for more messages (0: run now)."""
        if self._ended is None:
            return 0.0
        idle = now - self._ended
        if idle > self._took:
            return 0.0
        return min(self.cap, self._took)


async def wait_for_more(event: asyncio.Event, enough: Callable[[], bool], seconds: float) -> None:
    """Wait up to ``seconds`` until ``enough()``, checked whenever ``event`` is set."""
    deadline = time.monotonic() + seconds
    while not enough() and (left := deadline - time.monotonic()) > 0:
        event.clear()
        # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the cancel that ends
        # the session when it coincides with the event being set.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(left):
                await event.wait()
