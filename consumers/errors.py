"""The consumers' exceptions: one root, and the two a handler raises on purpose.

A handler signals *how* it failed; the runtime decides what happens next:

- :class:`PermanentError` (and a payload that fails validation): parked at once;
- :class:`Retry` or any other exception: tried again after a backoff delay, parked after the
  last attempt.
"""

from __future__ import annotations


class ConsumerError(Exception):
    """Root of every error the consumers package raises on purpose."""


class ConfigError(ConsumerError):
    """The worker's settings or its name are wrong; the message says which and how to fix it."""


class PermanentError(ConsumerError):
    """The message can never succeed (bad data, unknown entity): park it without retrying."""


class Retry(ConsumerError):
    """A transient failure (a dependency is down): try again after the next backoff delay."""
