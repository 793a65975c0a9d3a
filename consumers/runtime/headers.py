"""The headers the runtime adds to a message it retries, parks or replays (pure).

A message republished by the runtime keeps its body, its properties and the headers the
relay set; the runtime's own keys (all ``x-cdc-*``) say where it came from:

- ``x-cdc-attempt``: attempts made so far (see ``policy``);
- ``x-cdc-routing-key``: the routing key it was first published with (a retried message
  comes back to its queue through the default exchange, under the queue's name);
- ``x-cdc-origin-queue``: the worker queue it was consumed from;
- parked only: ``x-cdc-error`` (the reason, at most ``MAX_ERROR_CHARS``),
  ``x-cdc-error-kind``, ``x-cdc-consumer``, ``x-cdc-parked-at`` (ISO 8601 UTC).

Broker-owned headers (``x-death``, ``x-delivery-count``, ...) are dropped from every copy so
that the broker's counters start afresh and never leak into ours.

The runtime trusts its own keys only on its own copies (:func:`came_back`): a delivery that
reached the queue through the default exchange, which only the worker's retry queues (they
dead-letter there) and ``dlq replay`` publish to, and that names this queue as its origin.
The exchange of a delivery is set by the broker, so no header can fake it (a client
allowed to publish to the default exchange can put any message into the queue anyway:
that is a broker permission, not a header, to withhold). On any other
delivery (an event from the topic exchange) every ``x-cdc-*`` key is dropped before the
runtime or a handler looks at the headers (:func:`own_headers`): an event's headers cannot
choose its route or its attempt count.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

#: Attempts already made, on the runtime's own copies (never the broker's ``x-death``).
ATTEMPT_HEADER = "x-cdc-attempt"
#: Set by quorum queues on a redelivery: deliveries that ended without an ack.
DELIVERY_COUNT_HEADER = "x-delivery-count"
ROUTING_KEY_HEADER = "x-cdc-routing-key"
ORIGIN_QUEUE_HEADER = "x-cdc-origin-queue"
ERROR_HEADER = "x-cdc-error"
ERROR_KIND_HEADER = "x-cdc-error-kind"
CONSUMER_HEADER = "x-cdc-consumer"
PARKED_AT_HEADER = "x-cdc-parked-at"
# The retry (headers) exchange routes on it; RabbitMQ ignores x-* keys when matching.
RETRY_QUEUE_HEADER = "cdc-retry-queue"
MAX_ERROR_CHARS = 2000

#: Why a message was parked.
KIND_VALIDATION = "validation"  # the body does not fit the route's model
KIND_NO_ROUTE = "no-route"  # no route of the worker matches the routing key
KIND_NO_MESSAGE_ID = "no-message-id"  # inbox dedup is impossible without it
KIND_PERMANENT = "permanent"  # the handler raised PermanentError
KIND_EXHAUSTED = "exhausted"  # the last attempt failed
KINDS = (KIND_VALIDATION, KIND_NO_ROUTE, KIND_NO_MESSAGE_ID, KIND_PERMANENT, KIND_EXHAUSTED)

_BROKER_OWNED = frozenset(
    {
        DELIVERY_COUNT_HEADER,
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)
_PARKING_KEYS = frozenset(
    {ERROR_HEADER, ERROR_KIND_HEADER, CONSUMER_HEADER, PARKED_AT_HEADER, RETRY_QUEUE_HEADER}
)


def text(value: Any) -> str | None:
    """A header value as text (AMQP long strings may arrive as bytes)."""
    if value is None:
        return None
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


RUNTIME_PREFIX = "x-cdc-"


def came_back(exchange: str | None, queue: str, headers: Mapping[str, Any] | None) -> bool:
    """True if the delivery from ``queue`` is one of the runtime's own copies (see module doc):
    delivered through the default exchange and naming ``queue`` as its origin."""
    return not exchange and text((headers or {}).get(ORIGIN_QUEUE_HEADER)) == queue


def own_headers(headers: Mapping[str, Any] | None, *, trusted: bool) -> dict[str, Any]:
    """The headers the runtime and the handler act on: an untrusted delivery loses every
    ``x-cdc-*`` key (whatever its case)."""
    if trusted:
        return dict(headers or {})
    return {
        k: v for k, v in (headers or {}).items() if not k.lower().startswith(RUNTIME_PREFIX)
    }


def original_routing_key(headers: Mapping[str, Any] | None, routing_key: str) -> str:
    """The key the event was first published with: our header if present, else the delivery's."""
    if headers:
        key = text(headers.get(ROUTING_KEY_HEADER))
        if key:
            return key
    return routing_key


def _base(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    return {k: v for k, v in (headers or {}).items() if k not in _BROKER_OWNED}


def retry_headers(
    headers: Mapping[str, Any] | None,
    *,
    attempts: int,
    routing_key: str,
    origin_queue: str,
    retry_queue: str,
) -> dict[str, Any]:
    """Headers of the copy sent to the TTL queue ``retry_queue`` after ``attempts`` attempts."""
    out = {k: v for k, v in _base(headers).items() if k not in _PARKING_KEYS}
    out[ATTEMPT_HEADER] = attempts
    out[ROUTING_KEY_HEADER] = routing_key
    out[ORIGIN_QUEUE_HEADER] = origin_queue
    out[RETRY_QUEUE_HEADER] = retry_queue  # the retry exchange routes on it
    return out


def parking_headers(
    headers: Mapping[str, Any] | None,
    *,
    attempts: int,
    routing_key: str,
    origin_queue: str,
    kind: str,
    error: str,
    consumer: str,
    parked_at: str,
) -> dict[str, Any]:
    """Headers of the copy sent to the parking queue."""
    out = {k: v for k, v in _base(headers).items() if k != RETRY_QUEUE_HEADER}
    out[ATTEMPT_HEADER] = attempts
    out[ROUTING_KEY_HEADER] = routing_key
    out[ORIGIN_QUEUE_HEADER] = origin_queue
    out[ERROR_KIND_HEADER] = kind
    out[ERROR_HEADER] = error[:MAX_ERROR_CHARS]
    out[CONSUMER_HEADER] = consumer
    out[PARKED_AT_HEADER] = parked_at
    return out


def replay_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Headers of a parked message sent back to its origin queue: attempts start again.

    ``x-cdc-routing-key`` and ``x-cdc-origin-queue`` stay, so the worker still routes it by
    the original key and a later failure parks it with the same origin.
    """
    return {
        k: v
        for k, v in _base(headers).items()
        if k not in _PARKING_KEYS and k != ATTEMPT_HEADER
    }


def committed_at(headers: Mapping[str, Any] | None, timestamp: Any) -> float | None:
    """When the event was committed, as a Unix time: the relay's ``commit_time`` header
    (ISO 8601), else the AMQP ``timestamp`` property; None if neither is usable."""
    value = text((headers or {}).get("commit_time"))
    if value:
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            when = None
        if when is not None:
            return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()
    if isinstance(timestamp, dt.datetime):
        ts = timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=dt.UTC)
        return ts.timestamp()
    return None


def describe(exc: BaseException) -> str:
    """``ExcType: message`` for the error header (the type says where to look)."""
    message = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {message}" if message else name
