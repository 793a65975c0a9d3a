"""Picking the route of a message and validating its body (pure: no I/O, no broker types).

A message is *rejected* (parked at once, no retry) when it has no ``message_id`` (the inbox
cannot deduplicate it), when no route matches its original routing key, or when its body
does not validate against the route's pydantic model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import BaseModel, ValidationError

from consumers.runtime.headers import KIND_NO_MESSAGE_ID, KIND_NO_ROUTE, KIND_VALIDATION
from consumers.runtime.topic import matches

if TYPE_CHECKING:  # spec names psycopg's connection type; routing needs none of it
    from consumers.runtime.spec import Route

_MAX_ERRORS_SHOWN = 5


@dataclass(frozen=True, slots=True)
class Accepted:
    """The route to run and the validated payload."""

    route: Route
    payload: BaseModel


@dataclass(frozen=True, slots=True)
class Rejected:
    """Why the message can never succeed (a ``headers.KIND_*``) and a readable reason."""

    kind: str
    reason: str


def find_route(routes: Sequence[Route], routing_key: str) -> Route | None:
    """The first route whose pattern matches ``routing_key``."""
    for route in routes:
        if matches(route.pattern, routing_key):
            return route
    return None


def _explain(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:_MAX_ERRORS_SHOWN]:
        where = ".".join(str(p) for p in err["loc"]) or "(body)"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - _MAX_ERRORS_SHOWN
    if more > 0:
        parts.append(f"... and {more} more")
    return f"{exc.title} does not validate: " + "; ".join(parts)


def resolve(
    routes: Sequence[Route], routing_key: str, message_id: str | None, body: bytes
) -> Accepted | Rejected:
    """Route and validate one message."""
    if not message_id:
        return Rejected(KIND_NO_MESSAGE_ID, "no message_id: the inbox cannot deduplicate it")
    route = find_route(routes, routing_key)
    if route is None:
        return Rejected(KIND_NO_ROUTE, f"no route of this worker matches {routing_key!r}")
    try:
        payload = route.model.model_validate_json(body)
    except ValidationError as exc:
        return Rejected(KIND_VALIDATION, _explain(exc))
    return Accepted(route, payload)
