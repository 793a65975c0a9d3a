"""The broker names of one worker, derived from its spec and settings in one place (pure).

For a worker with service ``billing-service`` and retry delays 5, 10, 20 s:

- its queues as the spec names them (``billing-service.device-started`` ...), bound to
  the events exchange;
- ``billing-service.retry``: a headers exchange; a retry copy carries
  ``cdc-retry-queue`` (headers exchanges ignore ``x-*`` keys) and lands in exactly one TTL queue;
- ``billing-service.retry.5s``, ``.10s``, ``.20s``: TTL queues with no consumer whose
  messages expire into the default exchange under the routing key they were published with,
  which is the origin queue's name: a retry goes back to that one queue, never fanned out;
- ``billing-service.parked``: the parking queue.

``CDC_WORKER_QUEUE_PREFIX`` is prepended to every one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from consumers.runtime.policy import delay_label, delays_used


@dataclass(frozen=True, slots=True)
class RetryQueue:
    """One TTL queue of the retry ladder."""

    name: str
    delay: float

    @property
    def ttl_ms(self) -> int:
        """``x-message-ttl`` of the queue."""
        return max(1, round(self.delay * 1000))


@dataclass(frozen=True, slots=True)
class Names:
    """Every name the runtime declares for one worker."""

    queues: tuple[tuple[str, tuple[str, ...]], ...]  # (queue, binding patterns)
    retry_exchange: str
    retry_queues: tuple[RetryQueue, ...]
    parking_queue: str

    def retry_queue_for(self, delay: float) -> RetryQueue:
        """The TTL queue of ``delay`` seconds."""
        for rq in self.retry_queues:
            if rq.delay == delay:
                return rq
        raise KeyError(f"no retry queue for {delay}s")


def parking_queue(prefix: str, service: str) -> str:
    """Name of the parking queue of ``service``."""
    return f"{prefix}{service}.parked"


def build_names(
    prefix: str,
    service: str,
    queues: tuple[tuple[str, tuple[str, ...]], ...],
    max_attempts: int,
    delays: tuple[float, ...],
) -> Names:
    """Names for ``service`` whose queues are ``(name, bindings)`` pairs."""
    retry_exchange = f"{prefix}{service}.retry"
    return Names(
        queues=tuple((f"{prefix}{name}", bindings) for name, bindings in queues),
        retry_exchange=retry_exchange,
        retry_queues=tuple(
            RetryQueue(f"{retry_exchange}.{delay_label(d)}", d)
            for d in delays_used(max_attempts, delays)
        ),
        parking_queue=parking_queue(prefix, service),
    )
