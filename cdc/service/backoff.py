"""Exponential backoff with full jitter, for reconnecting to PostgreSQL and RabbitMQ."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class Backoff:
    """Delays grow as ``minimum * 2**n`` up to ``maximum``; each is drawn uniformly below it.

    Full jitter keeps a fleet of relays (or workers) from reconnecting in lock-step after a
    broker restart.
    """

    minimum: float
    maximum: float
    attempts: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt."""
        ceiling = min(self.maximum, self.minimum * (2 ** min(self.attempts, 30)))
        self.attempts += 1
        return random.uniform(self.minimum / 2, max(ceiling, self.minimum / 2))

    def reset(self) -> None:
        """Forget past failures after a success."""
        self.attempts = 0
