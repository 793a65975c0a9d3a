"""Acking a session's finished deliveries: at once, or once their copies are confirmed.

A retry or parking copy's confirm takes the broker a write to a quorum queue's log, several
milliseconds. Awaited inside the loop that commits batches, it held every later batch that
long, so a drain where one message in ten failed (a dead webhook endpoint) went at the pace
of those confirms rather than of its own work. :meth:`Settling.copy_then_ack` therefore
publishes a batch's copies and acks their originals on a task of its own while the runner
goes on; an original is still acked only after its copy is confirmed.

The tags behind a copy wait for its confirm, not for ``AckTracker``'s limit of held tags
(they would otherwise be acked one by one, a broker command each). Acks go out one
settlement at a time, in the order ``AckTracker`` gives them (the channel writes them in
that order): a ``multiple`` ack sent ahead of an earlier single one would leave that one an
unknown tag, which closes the channel.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiormq.abc import AbstractChannel

from cdc.errors import SinkError
from cdc.shell.consume_channel import ConsumeChannel
from consumers.errors import BrokerLost
from consumers.runtime.acks import AckTracker
from consumers.runtime.copies import Copier, Handled
from consumers.runtime.members import MemberCounts


class Settling:
    """The acks of one worker's consuming channel, and the copies they wait for.

    ``wakeup`` is called whenever a copy-then-ack task ends, so the consume loop sees a
    failure (:meth:`check` raises it: a lost channel ends the session) or that a stop has no
    confirm left to wait for."""

    def __init__(
        self,
        tracker: AckTracker,
        members: MemberCounts,
        copier: Copier,
        wakeup: Callable[[], None],
    ) -> None:
        self._tracker = tracker
        self._members = members
        self._copier = copier
        self._wakeup = wakeup
        #: The session's consuming channel (None between sessions): the acks go there.
        self.channel: ConsumeChannel | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._failure: BaseException | None = None

    def __len__(self) -> int:
        """Copy-then-ack tasks in flight."""
        return len(self._tasks)

    def ack(self, handled: list[Handled]) -> None:
        """Ack the deliveries of ``handled`` as far as the tracker lets them go."""
        if not handled:
            return
        channel = self.channel
        if channel is None:
            raise BrokerLost("ack failed: the consuming channel is closed")
        try:
            finished = self._members.finished(h.message.delivery_tag for h in handled)
            for tag, multiple in self._tracker.settle(finished):
                channel.ack(tag, multiple)
        except SinkError as exc:
            raise BrokerLost(f"ack failed: {exc!r}") from exc

    def copy_then_ack(
        self,
        publisher: AbstractChannel | None,
        copies: list[Handled],
        settled: Callable[[], Awaitable[None]],
    ) -> None:
        """Publish ``copies`` on ``publisher`` on a task of its own; once every confirm is
        in, ack their originals, then await ``settled``."""
        tags = (h.message.delivery_tag for h in copies)
        self._tracker.confirming(self._members.would_finish(tags))
        task = asyncio.create_task(self._copy_then_ack(publisher, copies, settled))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def check(self) -> None:
        """Raise what the first failed copy-then-ack task raised, if one did."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure

    def cancel(self) -> None:
        """The session is gone: stop waiting (the originals are redelivered, unacked)."""
        self.channel = None
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        self._failure = None

    async def _copy_then_ack(
        self,
        publisher: AbstractChannel | None,
        copies: list[Handled],
        settled: Callable[[], Awaitable[None]],
    ) -> None:
        await self._copier.send_all(publisher, copies)
        self.ack(copies)
        await settled()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self._failure is None:
            self._failure = task.exception()
        self._wakeup()
