"""What a worker declares: its queues, its routes (pattern -> model -> handler), its schema.

A worker module (``consumers.billing.worker``, ``consumers.notifications.worker`` or any
importable module named on the command line) exposes ``SETTINGS`` (a subclass of
``consumers.config.ConsumerSettings``) and ``build(settings) -> WorkerSpec``. The runtime
declares the topology, applies the schema, and for every message: validates the body with the
route's pydantic model (failure = permanent error, parked at once), opens a PostgreSQL
transaction, records ``(consumer, message_id)`` in the inbox (a duplicate is skipped and
counted), calls the handler with that transaction, commits, and only then acks.

A ``db_only`` worker may also give a route a *batch handler* (``Route.batch``): in the
optimistic pass the runtime then hands it every new message of the batch whose route shares
that batch handler, at once, so it can read and write set-wise (one locked read, one write)
instead of once per message. The per-message ``handler`` stays the reference: if anything in
the optimistic pass fails, the batch is rolled back and runs again message by message with a
savepoint each, so a bad event costs only itself. A batch handler must therefore leave the
same tables as the per-message handlers would, for any order of the messages.

A worker with effects outside the database (HTTP, SMTP) declares them as ``outside``: the
runtime hands it each chunk of new deliveries as they arrive, and it returns one awaitable
per delivery that performs those effects (concurrently, not inside any transaction). A
delivery joins a database batch only once its awaitable is done: its result reaches the
handler (or batch handler) as ``Delivery.prepared``; an exception fails the message
(retried or parked as usual) without running its handler, so neither its inbox row nor its
database effects are written. Messages then finish and are acked in the order their
effects finish, so one slow target holds only its own messages. The handlers of such a
worker touch only the database and may set ``db_only``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
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
    prepared: Any = None  # what the worker's ``outside`` effects returned for this message

    def with_prepared(self, prepared: Any) -> Delivery:
        """This delivery carrying ``prepared``: built field by field, as
        ``dataclasses.replace`` (which runs once per message of an ``outside`` worker)
        costs several times more."""
        return Delivery(
            self.message_id, self.routing_key, self.headers, self.attempt, self.body, prepared
        )


@dataclass(frozen=True, slots=True)
class HandlerContext:
    """Where a handler writes its effects: ``conn`` is inside the message's open transaction."""

    conn: psycopg.AsyncConnection[Any]
    delivery: Delivery


Handler = Callable[[HandlerContext, Any], Awaitable[None]]
#: ``(conn, [(delivery, validated model), ...])``: the new messages of one batch, in delivery
#: order, all inside the batch's open transaction (their inbox claims are in it).
BatchHandler = Callable[
    [psycopg.AsyncConnection[Any], Sequence[tuple[Delivery, Any]]], Awaitable[None]
]


#: A worker's effects outside the database for a chunk of new deliveries, in delivery order:
#: one awaitable per delivery (see the module doc). The call itself may raise (a read it
#: needs failed): the runtime then tries the chunk again after a backoff delay.
Outside = Callable[[Sequence[tuple[Delivery, Any]]], Awaitable[Sequence[Awaitable[Any]]]]


@dataclass(frozen=True, slots=True)
class Route:
    """Messages whose routing key matches ``pattern`` (AMQP topic syntax) go to ``handler``."""

    pattern: str
    model: type[BaseModel]
    handler: Handler
    # Optional set-wise form of ``handler`` (db_only workers only); routes that share one
    # batch handler object get their messages of a batch in one call. See the module doc.
    batch: BatchHandler | None = None


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
    outside: Outside | None = None
    # Called once when the worker starts to stop: outside effects not yet begun should fail
    # at once (the messages are retried later) so that the stop waits only for those begun.
    on_drain: Callable[[], None] | None = None
