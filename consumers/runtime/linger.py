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
:class:`Linger` decides (pure); :func:`wait_for_more` waits. :class:`Gathering` lets calls
that come close together share one run (one statement for many callers).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


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


class Gathering(Generic[T, R]):
    """Calls that come close together share one run of ``run`` over all their items.

    The first call starts a task that waits up to ``linger`` seconds, or until the waiting
    items weigh ``enough`` (``weight`` of each), then runs them all at once; every caller
    gets that run's result, or its exception. Calls made while a run is in flight go in the
    next one.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Awaitable[R]],
        linger: float,
        enough: int,
        weight: Callable[[T], int] = lambda _: 1,
    ) -> None:
        self._run = run
        self._linger = linger
        self._enough = enough
        self._weight = weight
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __call__(self, item: T) -> R:
        """``run``'s result for a run that included ``item``."""
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._waiting.append((item, done))
        self._arrived.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        while self._waiting:
            await wait_for_more(self._arrived, self._full, self._linger)
            batch, self._waiting = self._waiting, []
            try:
                result = await self._run([item for item, _ in batch])
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(result)

    def _full(self) -> bool:
        return sum(self._weight(item) for item, _ in self._waiting) >= self._enough
