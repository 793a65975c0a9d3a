"""Which keys of an outbox row's ``headers`` object may become AMQP headers as they are.

Pure. A row's headers are data written by the application; they must not steer delivery.
Some header names do: RabbitMQ sends a copy of a message to every routing key listed in
``CC`` and ``BCC`` (sender-selected distribution); the broker writes ``x-death``,
``x-delivery-count``, ``x-first-death-*`` and friends and reads some of them back; the
consumer runtime reads its own ``x-cdc-*`` keys (attempt count, original routing key) and
``cdc-retry-queue``; the relay's parked copies carry ``x-parked-*`` and ``x-original-*``.

Such a key is not dropped (the writer may still want to see it) but renamed:
``CC`` arrives as ``outbox-CC``, ``x-cdc-attempt`` as ``outbox-x-cdc-attempt``. Names are
compared without regard to case. If the row also holds the renamed key itself, the row's
own value is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

RENAMED_PREFIX = "outbox-"

#: Exact names (lower case) that steer routing or that the broker or runtime owns.
_RESERVED_NAMES = frozenset(
    {
        "cc",  # sender-selected distribution: extra routing keys
        "bcc",  # same, and removed from the delivered message
        "x-death",
        "x-delivery-count",
        "x-received-from",  # federation / shovel
        "x-shovelled",
        "x-shovelled-timestamp",
        "x-delay",  # delayed-message exchange plugin
        "cdc-retry-queue",  # the worker's retry exchange routes on it
    }
)
#: Name prefixes (lower case) of the same.
_RESERVED_PREFIXES = (
    "x-cdc-",  # the consumer runtime's own headers
    "x-first-death-",
    "x-last-death-",
    "x-opt-",  # AMQP 1.0 message annotations
    "x-stream-",
    "x-parked-",  # the relay's parked copies
    "x-original-",
)


@lru_cache(maxsize=1024)  # rows repeat the same few keys: decide each once
def is_reserved(key: str) -> bool:
    """True if a header named ``key`` would steer delivery or spoof a broker/runtime header."""
    name = key.lower()
    return name in _RESERVED_NAMES or name.startswith(_RESERVED_PREFIXES)


def safe_headers(row_headers: Mapping[str, Any]) -> dict[str, Any]:
    """The row's headers with every reserved key renamed to ``outbox-<key>``."""
    out: dict[str, Any] = {}
    renamed = []
    for key, value in row_headers.items():
        if is_reserved(key):
            renamed.append((key, value))
        else:
            out[key] = value
    for key, value in renamed:  # after the others: a row's own outbox-<key> wins
        out.setdefault(RENAMED_PREFIX + key, value)
    return out
