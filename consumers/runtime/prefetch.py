"""How a replica's prefetch budget is shared by its consumers (pure).

``CDC_WORKER_PREFETCH`` bounds the unacked messages the broker may push to one replica.
RabbitMQ applies ``basic.qos`` with ``global=false`` to each consumer separately, and quorum
queues do not support a channel-wide (``global``) limit, so a replica that consumes N queues
gives each consumer its own share: the budget split as evenly as possible, the remainder to
the first queues. The shares add up to exactly the budget, so the replica never holds more.
"""

from __future__ import annotations

from consumers.errors import ConfigError


def split_prefetch(total: int, consumers: int) -> list[int]:
    """``total`` split over ``consumers`` (each at least 1, summing to ``total``).

    Raises :class:`ConfigError` when the budget is smaller than the number of consumers:
    each needs one message of credit to receive anything.
    """
    if consumers < 1:
        raise ValueError("a worker consumes at least one queue")
    if total < consumers:
        raise ConfigError(
            f"CDC_WORKER_PREFETCH={total} is smaller than the worker's {consumers} queues: "
            f"each queue's consumer needs at least 1; set it to {consumers} or more"
        )
    share, extra = divmod(total, consumers)
    return [share + (1 if i < extra else 0) for i in range(consumers)]
