"""Which ``basic.ack`` frames settle a set of finished deliveries (pure).

Deliveries of one channel carry increasing tags. Messages may finish out of order (a
webhook to a slow endpoint finishes after later ones; one to an endpoint whose breaker is
open fails at once, before the healthy ones delivered earlier), and an ack with
``multiple`` would also settle every earlier tag, finished or not. :class:`AckTracker`
therefore acks the finished run at the front of the channel with one ``multiple`` ack on
its last tag. A finished tag behind an unfinished one is *held* for that ack while at most
``hold`` tags are: a ``basic.ack`` of its own costs the broker one more command on the
queue's log (a quorum queue's Raft log), and the front usually catches up within a
webhook's latency. Once more than ``hold`` are finished behind the front (a slow message
holds it), every held tag is acked on its own at once, so their prefetch slots are free
again. ``hold=0``: every tag behind the front is acked on its own at once. A tag is acked
exactly once.

A front that only waits for the broker to confirm its retry or parking copy
(:meth:`AckTracker.confirming`) is not slow: it finishes within milliseconds, so the tags
behind it wait for its ``multiple`` ack however many they are. Acking them one by one there
cost the broker a command each for nearly every message of a batch that had one failure.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable


class AckTracker:
    """The unacked deliveries of one channel, in delivery order; at most ``hold`` finished
    ones wait behind an unfinished one for its ``multiple`` ack (module doc)."""

    def __init__(self, hold: int = 0) -> None:
        self._hold = hold
        self._order: deque[int] = deque()
        self._outstanding: set[int] = set()
        self._finished: set[int] = set()
        self._confirming: set[int] = set()

    def delivered(self, tag: int) -> None:
        """A delivery arrived (tags arrive in increasing order)."""
        self._order.append(tag)
        self._outstanding.add(tag)

    def confirming(self, tags: Iterable[int]) -> None:
        """``tags`` wait only for their copies' confirms, then :meth:`settle` finishes them."""
        self._confirming.update(t for t in tags if t in self._outstanding)

    def settle(self, tags: Iterable[int]) -> list[tuple[int, bool]]:
        """Mark ``tags`` finished; the ``(tag, multiple)`` acks to send now, in order."""
        tags = [t for t in tags if t in self._outstanding]
        self._finished.update(tags)
        self._confirming.difference_update(tags)
        acks: list[tuple[int, bool]] = []
        last = None
        order = self._order
        while order:
            tag = order[0]
            if tag not in self._outstanding:
                order.popleft()  # acked on its own earlier
            elif tag in self._finished:
                last = order.popleft()
                self._outstanding.discard(tag)
                self._finished.discard(tag)
            else:
                break
        if last is not None:
            acks.append((last, True))
        waiting = len(self._finished) > self._hold  # what is left of it is behind the front
        if waiting and not (order and order[0] in self._confirming):
            for tag in sorted(self._finished):
                self._outstanding.discard(tag)
                acks.append((tag, False))
            self._finished.clear()
        return acks

    def clear(self) -> None:
        """The channel is gone: its unacked deliveries go back to the queue."""
        self._order.clear()
        self._outstanding.clear()
        self._finished.clear()
        self._confirming.clear()

    def __len__(self) -> int:
        return len(self._outstanding)
