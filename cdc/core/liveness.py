"""When a quiet replication connection becomes suspect: pure timing, no I/O.

The reader tells :class:`SilenceClock` when a message arrived (set :attr:`heard`), when it
stopped listening for a while (:meth:`reset`: silence it did not listen to does not
count), when it asked the server for a keepalive (:meth:`ping`) and when the walsender was
seen busy (:meth:`busy`). :meth:`due` says what to do after a read that got nothing:

* ``PING``: half of ``timeout`` passed without a message: ask for a keepalive (a live,
  idle walsender answers at once);
* ``PROBE``: the whole ``timeout`` passed: look at the walsender before calling the
  connection dead; a busy one earns another half ``timeout``.

:meth:`wake` is the time by which the reader should look again. Setting ``heard`` is the
only per-message cost.
"""

from __future__ import annotations

from typing import Final

PING: Final = "ping"
PROBE: Final = "probe"


class SilenceClock:
    """Silence from the server, measured on the caller's monotonic clock."""

    __slots__ = ("grace_until", "heard", "pinged", "timeout")

    def __init__(self, timeout: float, now: float) -> None:
        self.timeout = timeout
        #: When the last message arrived (the reader sets it).
        self.heard = now
        self.pinged = now
        self.grace_until = now

    def reset(self, now: float) -> None:
        """The reader did not listen until ``now``: count silence from here."""
        self.heard = self.pinged = now

    def due(self, now: float) -> str | None:
        """``PROBE``, ``PING`` or ``None`` (nothing to do yet)."""
        silent = now - self.heard
        if silent >= self.timeout and now >= self.grace_until:
            return PROBE
        if silent >= self.timeout / 2 and self.pinged <= self.heard:
            return PING
        return None

    def ping(self, now: float) -> None:
        """A keepalive was asked for at ``now``."""
        self.pinged = now

    def busy(self, now: float) -> None:
        """The walsender was seen busy at ``now``: look again after half the timeout."""
        self.grace_until = now + self.timeout / 2

    def silent_for(self, now: float) -> float:
        """Seconds since the last message."""
        return now - self.heard

    def wake(self) -> float:
        """When :meth:`due` may next have something to say."""
        if self.pinged <= self.heard:
            return self.heard + self.timeout / 2
        return max(self.heard + self.timeout, self.grace_until)
