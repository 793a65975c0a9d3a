"""The messages of a worker with effects outside the database (``WorkerSpec.outside``) between
their delivery and their database batch.

Each chunk of new deliveries is handed to the worker's ``outside`` callable as it arrives; it
returns one awaitable per delivery, which runs concurrently here (one that is a finished
future already is taken as it is, without a task). A message whose effects
finished (or failed: it then joins its batch as ``FAILED`` and is not run) waits in
``ready`` for the runner's next batch (:meth:`OutsideEffects.next_batch`), so messages finish
in the order their effects finish. Two copies of one message id are never in hand at once:
a second one waits until the first is settled (:meth:`OutsideEffects.settled`), and then
finds the first one's records.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeGuard

from cdc.service.backoff import Backoff
from consumers.runtime.batch import FAILED, BatchMessage
from consumers.runtime.linger import wait_for_more
from consumers.runtime.spec import Outside

log = logging.getLogger(__name__)


class OutsideEffects:
    """The effects in flight and the messages done with them; see the module docstring.

    ``backoff`` makes the delays between tries of a chunk whose effects cannot start;
    ``stop``: the worker is stopping (a chunk that cannot start is then left unacked);
    ``wakeup`` is set whenever a message becomes ready, for the runner's consume loop.
    """

    def __init__(
        self,
        outside: Outside,
        backoff: Callable[[], Backoff],
        stop: asyncio.Event,
        wakeup: asyncio.Event,
    ) -> None:
        self._outside = outside
        self._new_backoff = backoff
        self._stop = stop
        self._wakeup = wakeup
        self.running: set[asyncio.Task[None]] = set()
        self.ready: deque[BatchMessage] = deque()
        self._readied = asyncio.Event()
        # Message ids in hand (effects running, or waiting for their batch), and copies of
        # those ids that wait until the first one is settled.
        self._in_hand: set[str] = set()
        self._deferred: list[BatchMessage] = []

    def busy(self) -> bool:
        """True while any message is running its effects, ready, or waiting for its id."""
        return bool(self.running or self.ready or self._deferred)

    def clear(self) -> None:
        """The channel is gone: cancel the effects, forget every message (redelivered)."""
        for task in self.running:
            task.cancel()
        self.running.clear()
        self.ready.clear()
        self._in_hand.clear()
        self._deferred.clear()

    def settled(self, items: Sequence[BatchMessage]) -> None:
        """``items`` are acked: their ids are no longer in hand."""
        self._in_hand.difference_update(i.delivery.message_id for i in items)

    async def next_batch(self, size: int, linger: float, enough: int) -> list[BatchMessage]:
        """Up to ``size`` ready messages, once there is one; while effects are still running,
        a batch of fewer than ``enough`` waits up to ``linger`` seconds for more, so a steady
        flow makes batches of several messages rather than one transaction each."""
        while not self.ready:
            self._readied.clear()
            await self._readied.wait()
        await wait_for_more(
            self._readied,
            lambda: len(self.ready) >= min(size, enough) or not self.running
            or self._stop.is_set(),
            linger,
        )
        return [self.ready.popleft() for _ in range(min(len(self.ready), size))]

    async def relaunch_deferred(self) -> None:
        """Start the deferred copies (after a batch settled; those still in hand wait again)."""
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            await self.launch(deferred)

    async def launch(self, items: list[BatchMessage]) -> None:
        """Start the outside effects of ``items``, deferring a second copy of an id in hand."""
        go: list[BatchMessage] = []
        for item in items:
            if item.delivery.message_id in self._in_hand:
                self._deferred.append(item)
            else:
                self._in_hand.add(item.delivery.message_id)
                go.append(item)
        if not go:
            return
        backoff = self._new_backoff()
        while True:
            try:
                waits = await self._outside([(i.delivery, i.payload) for i in go])
                break
            except Exception as exc:  # a read the effects need: wait it out, like a batch
                if self._stop.is_set():
                    # Not started: left unacked, they go back to the queue with the channel.
                    log.warning("stopping: %d messages not started (%r)", len(go), exc)
                    self._in_hand.difference_update(i.delivery.message_id for i in go)
                    return
                delay = backoff.next_delay()
                log.warning("preparing a chunk failed: %r; again in %.2fs", exc, delay)
                await asyncio.sleep(delay)
        for item, wait in zip(go, waits, strict=True):
            if decided(wait):
                # No task to run it. A task's await would also raise the exception again,
                # and the traceback it gains ties the frames to it in a cycle that only the
                # garbage collector frees: costly at one such message in ten.
                error = wait.exception()
                if error is None:
                    item.delivery = item.delivery.with_prepared(wait.result())
                else:
                    item.outcome, item.error = FAILED, error
                self._ready(item)
                continue
            task = asyncio.create_task(self._one(item, wait))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _one(self, item: BatchMessage, wait: Awaitable[Any]) -> None:
        started = time.perf_counter()
        try:
            item.delivery = item.delivery.with_prepared(await wait)
        except Exception as exc:
            item.outcome, item.error = FAILED, exc
        item.seconds = time.perf_counter() - started
        self._ready(item)

    def _ready(self, item: BatchMessage) -> None:
        """``item`` is done with its effects: it waits for the next batch."""
        self.ready.append(item)
        self._readied.set()
        self._wakeup.set()


def decided(wait: Awaitable[Any]) -> TypeGuard[asyncio.Future[Any]]:
    """True for a future that has its result or an ordinary exception already (a send
    refused before it began, say): the runtime takes it as it is, without a task."""
    return (
        isinstance(wait, asyncio.Future)
        and wait.done()
        and not wait.cancelled()
        and isinstance(wait.exception(), Exception | None)
    )
