"""Publisher-confirm bookkeeping, pure: which publish each ack, nack and return is about.

The broker numbers the publishes of a confirm-mode channel 1, 2, 3, ... (delivery tags) and
answers each with one ``Basic.Ack`` or ``Basic.Nack``, possibly for a whole range at once
(``multiple``: every tag up to this one). A publish it returns as unroutable
(``Basic.Return``) is still confirmed afterwards; the return names no tag, only the
exchange, routing key and message properties, and comes before that publish's confirm.

Contract (no I/O, no clock, no event loop: the caller passes ``now`` and does the writing):

* :meth:`ConfirmTracker.publish` records one publish and gives it the next delivery tag.
* :meth:`ConfirmTracker.ack` settles what an ack covers: the tokens confirmed, in publish
  order, and apart the ones returned before their confirm, with the reason.
* :meth:`ConfirmTracker.nack` settles what a nack covers, and for each publish says when
  to publish it again (exponential backoff with jitter); :meth:`ConfirmTracker.again`
  records the new copy under a new tag.
* :meth:`ConfirmTracker.returned` marks the oldest unreturned publish with the returned
  message's exchange, routing key and message id (returns arrive in publish order).
* :meth:`ConfirmTracker.expire` decides about publishes older than ``confirm_timeout``:
  the connection is dead if nothing was read from it since the oldest was sent, else they
  are published again; a confirm of the old copy then settles nothing. While the broker
  blocks publishers (:meth:`ConfirmTracker.block`) nothing expires, and unblocking restarts
  every clock.
* Every publish is settled exactly once: acked, returned-then-acked, or handed back for a
  new copy which is then a publish of its own. :attr:`ConfirmTracker.first_open_tag`
  never passes a publish that is not settled.

:class:`ConfirmToken` is what the relay's publisher attaches to a publish: the transaction
to confirm and what was published for it (:class:`Kind`).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Generic, NamedTuple, TypeAlias, TypeVar

from cdc.core.outbox import Malformed, OutboxEvent
from cdc.core.watermark import Txn

F = TypeVar("F")  # the encoded frames of a publish, kept to publish it again
T = TypeVar("T")  # the caller's token, handed back when the publish settles

#: Backoff of re-publishing a nacked message: first delay and cap, in seconds.
RETRY_FIRST, RETRY_MAX = 0.05, 5.0


class Kind(Enum):
    """What a confirmed publish was: the event itself, or a parked copy of a kind."""

    EVENT = "event"
    UNROUTABLE = "unroutable"
    MALFORMED = "malformed"


class ConfirmToken(NamedTuple):
    """The publisher's token: the transaction one confirm counts for, and what was sent."""

    txn: Txn
    item: OutboxEvent | Malformed
    kind: Kind


class Publish(Generic[F, T]):
    """One publish awaiting its confirm (mutable: the tracker marks returns and attempts)."""

    __slots__ = ("attempts", "exchange", "frames", "message_id", "returned", "routing_key",
                 "sent", "token")  # fmt: skip

    def __init__(
        self, frames: F, token: T, exchange: str, routing_key: str, message_id: str, sent: float
    ) -> None:
        self.frames = frames
        self.token = token
        self.exchange = exchange
        self.routing_key = routing_key
        self.message_id = message_id
        self.sent = sent
        self.attempts = 0
        self.returned: str | None = None


#: What one ack settled: the confirmed tokens in publish order, and apart the returned ones
#: with the reason. A plain tuple: it is built once per confirm frame, on the hot path, where
#: a NamedTuple costs as much again as the rest of settling one publish.
Settled: TypeAlias = tuple[list[T], list[tuple[T, str]]]


class Resend(NamedTuple, Generic[F, T]):
    """Publish ``publish`` again after ``delay`` seconds (then :meth:`ConfirmTracker.again`)."""

    publish: Publish[F, T]
    delay: float


@dataclass(frozen=True, slots=True)
class Expired(Generic[F, T]):
    """What :meth:`ConfirmTracker.expire` decided.

    ``silent_for`` is set (seconds since the oldest expired publish) when nothing was read
    from the connection since then: it is dead, and nothing is to be re-sent into it.
    Otherwise ``resend`` holds the publishes to send again now, oldest first.
    """

    resend: tuple[Publish[F, T], ...] = ()
    silent_for: float | None = None


class ConfirmTracker(Generic[F, T]):
    """The pending publishes of one channel by delivery tag (see the module docstring)."""

    def __init__(
        self, confirm_timeout: float, jitter: Callable[[], float] = random.random
    ) -> None:
        self.confirm_timeout = confirm_timeout
        self._jitter = jitter
        # _pending[i] has tag _first + i; None marks one settled out of order.
        self._pending: deque[Publish[F, T] | None] = deque()
        self._first = 1
        self._next_tag = 1
        self.blocked = False

    @property
    def first_open_tag(self) -> int:
        """The lowest delivery tag that may be unsettled: every publish below it is settled."""
        return self._first

    @property
    def in_flight(self) -> int:
        """Publishes sent and not yet settled."""
        return self._next_tag - self._first

    def publish(
        self, frames: F, token: T, exchange: str, routing_key: str, message_id: str, now: float
    ) -> None:
        """Record a publish sent at ``now``; it takes the next delivery tag."""
        self._pending.append(Publish(frames, token, exchange, routing_key, message_id, now))
        self._next_tag += 1

    def again(self, publish: Publish[F, T], now: float) -> None:
        """Record the new copy of a publish handed back by :meth:`nack` or :meth:`expire`."""
        publish.sent = now
        self._pending.append(publish)
        self._next_tag += 1

    def _settle(self, tag: int, multiple: bool) -> list[Publish[F, T]]:
        """Take the publishes a confirm of ``tag`` covers out of the pending ones."""
        pending = self._pending
        settled: list[Publish[F, T]] = []
        if multiple:
            count = min(tag - self._first + 1, len(pending))
            self._first += max(count, 0)
            popleft, append = pending.popleft, settled.append
            for _ in range(count):
                entry = popleft()
                if entry is not None:
                    append(entry)
        else:
            index = tag - self._first
            if 0 <= index < len(pending):
                entry = pending[index]
                pending[index] = None
                if entry is not None:
                    settled.append(entry)
        self._trim()
        return settled

    def _trim(self) -> None:
        pending = self._pending
        while pending and pending[0] is None:
            pending.popleft()
            self._first += 1

    def ack(self, tag: int, multiple: bool) -> Settled[T]:
        """Settle the publishes a ``Basic.Ack`` covers (a tag already settled: nothing)."""
        settled = self._settle(tag, multiple)
        acked = [e.token for e in settled if e.returned is None]
        if len(acked) == len(settled):
            return acked, []
        return acked, [(e.token, e.returned) for e in settled if e.returned is not None]

    def nack(self, tag: int, multiple: bool) -> list[Resend[F, T]]:
        """Settle the publishes a ``Basic.Nack`` covers; each is to be published again."""
        resends = []
        for entry in self._settle(tag, multiple):
            entry.attempts += 1
            entry.returned = None  # the new copy may be routed, or returned anew
            delay = min(RETRY_FIRST * 2 ** (entry.attempts - 1), RETRY_MAX)
            resends.append(Resend(entry, delay * (0.5 + self._jitter())))
        return resends

    def returned(
        self, exchange: str, routing_key: str, message_id: str, reply_code: int, reply_text: str
    ) -> bool:
        """Mark the publish a ``Basic.Return`` is about; False if none matches."""
        reason = f"unroutable: {reply_code} {reply_text}".rstrip()
        for entry in self._pending:
            if (
                entry is not None
                and entry.returned is None
                and entry.routing_key == routing_key
                and entry.exchange == exchange
                and entry.message_id == message_id
            ):
                entry.returned = reason
                return True
        return False

    def expire(self, now: float, last_read: float) -> Expired[F, T]:
        """Publishes sent ``confirm_timeout`` or more before ``now`` with no confirm yet.

        ``last_read`` is when anything last arrived on the connection: if that is before
        the oldest such publish was sent, the connection is presumed dead; else the broker
        is alive but lost track of them, and they are handed back to be sent again.
        """
        if self.blocked:
            return Expired()  # a blocked broker reads nothing; the clock restarts on unblock
        limit = now - self.confirm_timeout
        pending = self._pending
        due: list[int] = []
        for index, entry in enumerate(pending):
            if entry is None:
                continue
            if entry.sent > limit:
                break
            if last_read < entry.sent:
                return Expired(silent_for=now - entry.sent)
            due.append(index)
        resend: list[Publish[F, T]] = []
        for index in due:
            entry = pending[index]
            assert entry is not None
            pending[index] = None
            entry.returned = None  # the new copy may be routed, or returned anew
            resend.append(entry)
        self._trim()
        return Expired(tuple(resend))

    def block(self, blocked: bool, now: float) -> bool:
        """The broker blocks (or unblocks) publishers; True if that changed anything."""
        if blocked == self.blocked:
            return False
        self.blocked = blocked
        if not blocked:
            # Whatever waited did so because of the block: restart its confirm clock.
            for entry in self._pending:
                if entry is not None:
                    entry.sent = now
        return True
