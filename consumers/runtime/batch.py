"""One micro-batch of messages in one PostgreSQL transaction, a SAVEPOINT per message.

:func:`run_batch` claims every message id in the inbox (one statement), runs each new
message's handler inside its own savepoint, and commits once. A failing handler rolls back
only its savepoint and its inbox claim; the others commit. It sets each item's outcome:

- ``DONE``: effects and inbox row committed;
- ``DUPLICATE``: the inbox already had the id (skipped);
- ``FAILED``: the handler raised; ``error`` holds the exception.

Anything that breaks the transaction itself (lost connection, deadlock on the claim) raises
:class:`BatchAborted`: nothing of the batch was committed, or the commit's outcome is
unknown, and the caller runs the same batch again (the inbox makes that safe).

The optimistic pass (``db_only`` workers) runs pipelined without savepoints and gives the
new messages of routes with a batch handler (``Route.batch``) to it in one call. It is tried
again a few times when it lost a lock race (lock timeout, deadlock, serialization failure:
another replica held what it needed), and falls back to savepoints on any other failure.
:func:`run_batch` says which way the batch committed (``FIRST``, ``RETRIED``, ``FALLBACK``).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from pydantic import BaseModel

from consumers.errors import BatchAborted
from consumers.runtime import inbox
from consumers.runtime.spec import BatchHandler, Delivery, HandlerContext, Route

DONE = "done"
DUPLICATE = "duplicate"
FAILED = "failed"

#: How an optimistic batch committed: on the first pipelined try, on a later one after lost
#: lock races, or the plain way with a savepoint per message.
FIRST, RETRIED, FALLBACK = "first", "retried", "fallback"


@dataclass(slots=True)
class BatchMessage:
    """A validated message on its way through a batch."""

    delivery: Delivery
    route: Route
    payload: BaseModel
    queue: str
    outcome: str | None = None
    error: BaseException | None = None
    seconds: float = 0.0
    message: Any = None  # the broker's message, for the runner (acks, republishing)


_FIRST = b"SAVEPOINT cdc_msg"
_NEXT = b"RELEASE SAVEPOINT cdc_msg; SAVEPOINT cdc_msg"
_UNDO = b"ROLLBACK TO SAVEPOINT cdc_msg"
#: Errors that only say another transaction held a lock a bit too long: worth another go.
_LOCK_RACES = (
    psycopg.errors.LockNotAvailable,
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
)
#: Optimistic passes tried before the savepoint fallback when they keep losing lock races.
OPTIMISTIC_TRIES = 4


async def run_batch(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    consumer: str,
    items: Sequence[BatchMessage],
    clock: Callable[[], float] = time.perf_counter,
    optimistic: bool = False,
) -> str | None:
    """Process ``items`` in one transaction on ``conn`` (not in autocommit); see module doc.

    ``optimistic`` (for workers whose handlers only touch the database) first runs the
    batch in pipeline mode without savepoints; if anything fails, that transaction is
    rolled back and the batch runs again the plain way, with a savepoint per message, so
    the outcome is the same either way. Returns how an optimistic batch committed
    (``FIRST``, ``RETRIED`` or ``FALLBACK``), None for a plain one.
    """
    try:
        tries = await _optimistic(conn, table, consumer, items, clock) if optimistic else 0
        if tries:
            return FIRST if tries == 1 else RETRIED
        await _with_savepoints(conn, table, consumer, items, clock)
        return FALLBACK if optimistic else None
    except psycopg.Error as exc:
        # (On cancellation the caller closes the connection: the server rolls back.)
        await _rollback_quietly(conn)
        raise BatchAborted(f"batch transaction failed: {type(exc).__name__}: {exc}") from exc


async def _claim(
    conn: psycopg.AsyncConnection[Any], table: str, consumer: str, items: Sequence[BatchMessage]
) -> set[str]:
    for item in items:
        item.outcome, item.error = None, None
    return await inbox.claim(
        conn,
        table,
        consumer,
        [i.delivery.message_id for i in items],
        [i.delivery.routing_key for i in items],
    )


def _take(fresh: set[str], item: BatchMessage) -> bool:
    """True if ``item`` is new; a second copy inside the same batch is a duplicate."""
    if item.delivery.message_id in fresh:
        fresh.discard(item.delivery.message_id)
        return True
    item.outcome = DUPLICATE
    return False


async def _optimistic(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    consumer: str,
    items: Sequence[BatchMessage],
    clock: Callable[[], float],
) -> int:
    """The whole batch pipelined, no savepoints: the tries it took to commit, or 0 (rolled
    back) if it gave up.

    In pipeline mode a statement's error may surface later (at a fetch or at the sync), so
    any failure here only means "run the batch the plain way", never "this message failed".
    A lost lock race is retried after a short random pause (replicas then fall out of step)
    before it gives up.
    """
    for tries in range(1, OPTIMISTIC_TRIES + 1):
        try:
            async with conn.pipeline():
                fresh = await _claim(conn, table, consumer, items)
                await _run_new(conn, [i for i in items if _take(fresh, i)], clock)
            await conn.commit()
            return tries
        except Exception as exc:
            if conn.broken:
                raise BatchAborted(f"database connection lost: {exc}") from exc
            await conn.rollback()
            if tries == OPTIMISTIC_TRIES or not isinstance(exc, _LOCK_RACES):
                return 0
            await asyncio.sleep(random.uniform(0.001, 0.02) * tries)
    return 0


async def _run_new(
    conn: psycopg.AsyncConnection[Any], new: Sequence[BatchMessage], clock: Callable[[], float]
) -> None:
    """Run the handlers of the ``new`` items: one call per batch handler for all of its
    items (at the place of its first one), the per-message handler for the others."""
    groups: dict[BatchHandler, list[BatchMessage]] = {}
    for item in new:
        if item.route.batch is not None:
            groups.setdefault(item.route.batch, []).append(item)
    for item in new:
        batch = item.route.batch
        if batch is None:
            started = clock()
            ctx = HandlerContext(conn, item.delivery)
            await item.route.handler(ctx, item.payload)
            item.seconds = clock() - started
            item.outcome = DONE
        elif batch in groups:
            group = groups.pop(batch)
            started = clock()
            await batch(conn, [(i.delivery, i.payload) for i in group])
            share = (clock() - started) / len(group)  # the histogram stays per message
            for i in group:
                i.seconds, i.outcome = share, DONE


async def _with_savepoints(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    consumer: str,
    items: Sequence[BatchMessage],
    clock: Callable[[], float],
) -> None:
    """The batch with a savepoint per message: a failure undoes only its own message."""
    fresh = await _claim(conn, table, consumer, items)
    opened = False
    cur = conn.cursor()  # one cursor for the runtime's own statements: cheaper per message
    for item in items:
        if not _take(fresh, item):
            continue
        # One round trip between messages: release the last savepoint, open the next.
        await cur.execute(_NEXT if opened else _FIRST)
        opened = True
        started = clock()
        try:
            ctx = HandlerContext(conn, item.delivery)
            await item.route.handler(ctx, item.payload)
        except Exception as exc:
            item.seconds = clock() - started
            if conn.broken:
                raise BatchAborted(f"database connection lost in a handler: {exc}") from exc
            await cur.execute(_UNDO)
            await inbox.unclaim(conn, table, consumer, item.delivery.message_id)
            item.outcome, item.error = FAILED, exc
        else:
            item.seconds = clock() - started
            item.outcome = DONE
    await conn.commit()


async def _rollback_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    if conn.broken or conn.closed:
        return
    with contextlib.suppress(psycopg.Error):
        await conn.rollback()
