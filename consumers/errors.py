"""The consumers' exceptions: one root, and the two a handler raises on purpose.

A handler signals *how* it failed; the runtime decides what happens next:

- :class:`PermanentError` (and a payload that fails validation): parked at once;
- :class:`Retry` or any other exception: tried again after a backoff delay, parked after the
  last attempt.

The others are the runtime's: configuration problems (exit 2), refusals by a server (exit 3)
and the broker/database failures its reconnect loops absorb.
"""

from __future__ import annotations


class ConsumerError(Exception):
    """Root of every error the consumers package raises on purpose."""


class ConfigError(ConsumerError):
    """The worker's settings or its name are wrong; the message says which and how to fix it."""


class Refused(ConsumerError):
    """A server refuses the worker's configuration (login, database, vhost, privilege, TLS).

    Not retried: the process exits 3 with the message, which says what to fix.
    """


class PermanentError(ConsumerError):
    """The message can never succeed (bad data, unknown entity): park it without retrying."""


class Retry(ConsumerError):
    """A transient failure (a dependency is down): try again after the next backoff delay.

    ``after``: the dependency is known to stay down for that many seconds (a webhook
    endpoint whose breaker is open): the retry waits at least that long if a configured
    delay does, so the attempts are not spent while nothing can succeed.
    """

    def __init__(self, message: str, *, after: float = 0.0) -> None:
        super().__init__(message)
        self.after = after


class TopologyConflict(ConfigError):
    """A queue or exchange exists on the broker with other arguments than the worker declares."""


class DlqError(ConfigError):
    """A DLQ command cannot run as asked (not a parking queue, no such queue, missing flag)."""


class BrokerLost(ConsumerError):
    """The broker connection or channel is gone: the worker's session starts again."""


class Unroutable(BrokerLost):
    """The broker returned a copy (no queue took it): the topology is declared again."""


class BatchAborted(ConsumerError):
    """A batch's transaction could not complete: it runs again on a fresh connection."""


class BadBundle(ConsumerError):
    """A retry bundle's body cannot be decoded (written by another version, or damaged):
    the bundle is parked as it is; inspect it with ``dlq show`` and replay it with a worker
    version that reads its format."""
