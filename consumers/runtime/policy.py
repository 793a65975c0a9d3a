"""Attempts, and what becomes of a message after its attempt: one :data:`Disposition`.

Pure rules, no I/O. An attempt is counted *before* the handler runs:

- ``x-cdc-attempt`` (our own header, never ``x-death``) holds the attempts already made
  when the message was republished for a retry; absent on a fresh event;
- ``x-delivery-count`` (set by quorum queues on a redelivery) adds the deliveries that
  ended without an ack, i.e. a worker that crashed or lost its connection while holding
  the message. A message that kills the worker every time is therefore parked too. It
  counts only on a delivery the broker flags ``redelivered``: on a first delivery the
  header can only have come from the publisher.

Which headers are trusted at all is ``headers.came_back``'s rule: the runtime's
``x-cdc-attempt`` is removed from events that did not come back through its own queues.

:func:`decide` gives every message handled its disposition, from the attempt number, how the
attempt ended and the retry rules; the runner only carries it out:

- the attempt succeeded, or the inbox already had the message id: :class:`Ack`;
- the message was rejected before any handler ran (no message id, no route, a body that
  does not validate): :class:`Park` at once, with the rejection's kind;
- the handler raised :class:`~consumers.errors.PermanentError`: :class:`Park` at once;
- any other failure of attempt ``n`` (1-based): attempt ``n < max_attempts`` waits
  ``delays[n - 1]`` (the last delay repeats) in a TTL queue and comes back to the origin
  queue (:class:`RetryLater`); attempt ``n >= max_attempts`` is parked as exhausted.
  A :class:`~consumers.errors.Retry` with ``after`` waits at least that long if a delay in
  use does.

Every disposition but :class:`Ack` is a copy to publish (confirmed) before the original is
acked, so the message is acked in every case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from consumers.errors import PermanentError, Retry
from consumers.runtime.dispatch import Rejected
from consumers.runtime.headers import (
    ATTEMPT_HEADER,
    DELIVERY_COUNT_HEADER,
    KIND_EXHAUSTED,
    KIND_PERMANENT,
    describe,
)


def _as_int(value: Any) -> int:
    if value is None:  # the usual case (no such header): no exception raised and caught
        return 0
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("ascii", "replace")
    try:
        number = int(value)
    except (TypeError, ValueError):
        return 0
    return max(number, 0)


def attempt_of(headers: Mapping[str, Any] | None, *, redelivered: bool = True) -> int:
    """The 1-based number of the attempt that is about to run for a message with ``headers``
    (``redelivered``: the broker's flag on this delivery)."""
    if not headers:
        return 1
    crashed = _as_int(headers.get(DELIVERY_COUNT_HEADER)) if redelivered else 0
    return 1 + _as_int(headers.get(ATTEMPT_HEADER)) + crashed


@dataclass(frozen=True, slots=True)
class RetryRules:
    """How often and after which delays a failed message is tried again (the settings
    ``CDC_WORKER_MAX_ATTEMPTS`` and ``CDC_WORKER_RETRY_DELAYS``)."""

    max_attempts: int
    delays: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Nothing to copy: the message's effects are committed, or the inbox already had it."""


#: The one :class:`Ack` (it has no fields): most messages get it, none allocates one.
_ACK = Ack()


@dataclass(frozen=True, slots=True)
class RetryLater:
    """Copy the message to the TTL queue of ``delay`` seconds; it has made ``attempts``,
    the last of which failed with ``reason``."""

    delay: float
    attempts: int
    reason: str


@dataclass(frozen=True, slots=True)
class Park:
    """Give up: copy the message to the parking queue after ``attempts`` attempts.

    ``kind`` is a ``headers.KIND_*`` (why it can never succeed, or that its attempts ran
    out) and ``reason`` the readable error; both go into the parked copy's headers.
    """

    attempts: int
    kind: str
    reason: str


#: What the runner does with a message it handled.
Disposition = Ack | RetryLater | Park


def decide(
    attempt: int, failure: BaseException | Rejected | None, rules: RetryRules
) -> Disposition:
    """The disposition of a message whose attempt number ``attempt`` ended with ``failure``
    (None: its handler succeeded or it was a duplicate; a :class:`Rejected`: it was never
    handed to a handler; an exception: the handler or its outside effects raised it)."""
    if failure is None:
        return _ACK
    if isinstance(failure, Rejected):
        return Park(attempt, failure.kind, failure.reason)
    reason = describe(failure)
    if isinstance(failure, PermanentError):
        return Park(attempt, KIND_PERMANENT, reason)
    at_least = failure.after if isinstance(failure, Retry) else 0.0
    delay = _retry_delay(attempt, rules, at_least)
    if delay is None:
        return Park(attempt, KIND_EXHAUSTED, reason)
    return RetryLater(delay, attempt, reason)


def _retry_delay(attempt: int, rules: RetryRules, at_least: float) -> float | None:
    """The delay before the next attempt after attempt ``attempt`` failed; None when it was
    the last one.

    ``at_least``: the failure says nothing can succeed for that long; the retry then waits
    the shortest delay in use that is at least as long (the longest one if none is), never
    less than its own step's delay."""
    delays = rules.delays
    if attempt >= rules.max_attempts or not delays:
        return None
    delay = delays[min(attempt, len(delays)) - 1]
    if at_least > delay:
        usable = delays_used(rules.max_attempts, delays)
        longer = [d for d in usable if d >= at_least]
        delay = min(longer) if longer else max(usable)
    return delay


def delays_used(max_attempts: int, delays: Sequence[float]) -> tuple[float, ...]:
    """The distinct delays a message can wait (one TTL queue each), in order."""
    wanted = [delays[min(n, len(delays)) - 1] for n in range(1, max_attempts)]
    return tuple(dict.fromkeys(wanted))


def delay_label(delay: float) -> str:
    """``5.0 -> '5s'``, ``0.2 -> '0.2s'``: the suffix of a retry queue's name."""
    return f"{delay:g}s"
