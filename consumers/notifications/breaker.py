"""When to stop waiting on a webhook endpoint that keeps failing (pure, clock passed in).

A dead endpoint costs each message sent to it the whole ``CDC_WEBHOOK_TIMEOUT``, and the
message holds a prefetch slot all that time: a few dead endpoints would otherwise starve
the healthy ones. After ``failures`` transport failures in a row (timeout, refused or reset
connection, TLS failure) the endpoint is *open* for ``cooldown`` seconds: its sends fail at
once (the message is retried after its backoff delay, as if it had timed out, but not
before the probe's outcome can be known: ``channels``). Then one probe is let through;
its success closes the endpoint again, its failure opens it for another ``cooldown``. The
worker takes the probe with :meth:`Breaker.take_probe` and does not make the probe's
message wait for it (``probes``). An endpoint is ``scheme://host:port``. An answer,
whatever its status, is not a failure here: it came quickly and held no slot for long (a
non-2xx answer is still retried by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class _Endpoint:
    failures: int = 0
    open_until: float = 0.0
    probing: bool = False


class Breaker:
    """Per-endpoint failure counts; ``failures <= 0`` disables it (every send is admitted)."""

    def __init__(self, failures: int, cooldown: float) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._endpoints: dict[str, _Endpoint] = {}

    def admit(self, endpoint: str, now: float) -> float | None:
        """None: send now (and report the outcome); else the seconds the endpoint stays
        open, during which its sends fail at once."""
        wait = self.open_for(endpoint, now)
        state = self._endpoints.get(endpoint)
        if wait is None and state is not None and 0 < self.failures <= state.failures:
            state.probing = True  # the one probe after the cooldown
        return wait

    def open_for(self, endpoint: str, now: float) -> float | None:
        """What :meth:`admit` would answer, without taking the probe: the caller can fail a
        send before building it, and leave the probe to the send that does go out."""
        state = self._endpoints.get(endpoint)
        if state is None or self.failures <= 0 or state.failures < self.failures:
            return None
        if now < state.open_until or state.probing:
            return max(state.open_until - now, 0.0) or self.cooldown
        return None

    def take_probe(self, endpoint: str, now: float) -> bool:
        """True when ``endpoint``'s cooldown is over and its one probe is free: the probe is
        then taken (sends fail at once until its outcome is reported)."""
        state = self._endpoints.get(endpoint)
        if state is None or self.failures <= 0 or state.failures < self.failures:
            return False
        if now < state.open_until or state.probing:
            return False
        state.probing = True
        return True

    def succeeded(self, endpoint: str) -> None:
        """The endpoint answered (any status): it is reachable again."""
        self._endpoints.pop(endpoint, None)

    def failed(self, endpoint: str, now: float) -> None:
        """A transport failure: count it; open the endpoint at the threshold."""
        state = self._endpoints.setdefault(endpoint, _Endpoint())
        state.failures += 1
        state.probing = False
        if self.failures > 0 and state.failures >= self.failures:
            state.open_until = now + self.cooldown

    def abandoned(self, endpoint: str) -> None:
        """A send ended without an outcome (cancelled): a probe may run again."""
        state = self._endpoints.get(endpoint)
        if state is not None:
            state.probing = False

    def is_open(self, endpoint: str, now: float) -> bool:
        """True while ``endpoint``'s sends fail at once (for tests and logs)."""
        state = self._endpoints.get(endpoint)
        return (
            state is not None
            and self.failures > 0
            and state.failures >= self.failures
            and now < state.open_until
        )
