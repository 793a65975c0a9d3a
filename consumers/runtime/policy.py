"""Attempts and backoff: how many times a message was tried, and what happens after a failure.

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

After a failed attempt ``n`` (1-based): attempt ``n < max_attempts`` waits
``delays[n - 1]`` (the last delay repeats) in a TTL queue and comes back to the origin
queue; attempt ``n >= max_attempts`` is parked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ATTEMPT_HEADER = "x-cdc-attempt"
DELIVERY_COUNT_HEADER = "x-delivery-count"


def _as_int(value: Any) -> int:
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
class RetryLater:
    """Send the message to the TTL queue of ``delay`` seconds; it has made ``attempts``."""

    delay: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Park:
    """Give up: park the message after ``attempts`` attempts."""

    attempts: int


def after_failure(
    attempt: int,
    max_attempts: int,
    delays: Sequence[float],
    permanent: bool = False,
    at_least: float = 0.0,
) -> RetryLater | Park:
    """What to do with a message whose attempt number ``attempt`` just failed.

    ``at_least``: the failure says nothing can succeed for that long; the retry then waits
    the shortest delay in use that is at least as long (the longest one if none is), never
    less than its own step's delay."""
    if permanent or attempt >= max_attempts or not delays:
        return Park(attempt)
    delay = delays[min(attempt, len(delays)) - 1]
    if at_least > delay:
        usable = delays_used(max_attempts, delays)
        longer = [d for d in usable if d >= at_least]
        delay = min(longer) if longer else max(usable)
    return RetryLater(delay, attempt)


def delays_used(max_attempts: int, delays: Sequence[float]) -> tuple[float, ...]:
    """The distinct delays a message can wait (one TTL queue each), in order."""
    wanted = [delays[min(n, len(delays)) - 1] for n in range(1, max_attempts)]
    return tuple(dict.fromkeys(wanted))


def delay_label(delay: float) -> str:
    """``5.0 -> '5s'``, ``0.2 -> '0.2s'``: the suffix of a retry queue's name."""
    return f"{delay:g}s"
