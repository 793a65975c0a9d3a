"""What a worker declares: its queues, its routes (pattern -> model -> handler), its schema.

A worker module (``consumers.billing.worker``, ``consumers.notifications.worker`` or any
importable module named on the command line) exposes ``SETTINGS`` (a subclass of
``consumers.config.ConsumerSettings``) and ``build(settings) -> WorkerSpec``. The runtime
declares the topology, applies the schema, and for every message: validates the body with the
route's pydantic model (failure = permanent error, parked at once), opens a PostgreSQL
transaction, records ``(consumer, message_id)`` in the inbox (a duplicate is skipped and
counted), calls the handler with that transaction, commits, and only then acks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from pydantic import BaseModel


@dataclass(frozen=True, slots=True)
class Delivery:
    """The message as a handler sees it, besides its validated model."""

    message_id: str
    routing_key: str
    headers: Mapping[str, Any]
    attempt: int  # 1-based, counted before the handler runs (a crash counts as an attempt)
    body: bytes


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """Where a handler writes its effects: ``conn`` is inside the message's open transaction."""

    conn: psycopg.AsyncConnection[Any]
    delivery: Delivery


Handler = Callable[[HandlerContext, Any], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Route:
    """Messages whose routing key matches ``pattern`` (AMQP topic syntax) go to ``handler``."""

    pattern: str
    model: type[BaseModel]
    handler: Handler


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """One durable queue of the worker, bound to the events exchange with ``bindings``."""

    name: str
    bindings: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """Everything the runtime needs to run one worker."""

    name: str  # consumer name in the inbox, e.g. "billing"
    service: str  # prefix of the retry/parking queues, e.g. "billing-service"
    queues: tuple[QueueSpec, ...]
    routes: tuple[Route, ...]  # the first route whose pattern matches wins
    schema: tuple[str, ...] = ()  # idempotent DDL applied at start, after the inbox table
    on_close: Callable[[], Awaitable[None]] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    # True when the handlers have no effect outside their PostgreSQL transaction (no HTTP, no
    # email, no file): the runtime may then run a batch pipelined without savepoints and,
    # only if something fails, roll it back and run it again with a savepoint per message.
    # A handler may thus run twice for one delivery (only the second run commits).
    db_only: bool = False
