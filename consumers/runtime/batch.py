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
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from pydantic import BaseModel

from consumers.runtime import inbox
from consumers.runtime.spec import Delivery, HandlerContext, Route

DONE = "done"
DUPLICATE = "duplicate"
FAILED = "failed"


class BatchAborted(Exception):
    """The batch's transaction could not complete; run the batch again on a fresh connection."""


@dataclass(slots=True)
class Item:
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


async def run_batch(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    consumer: str,
    items: Sequence[Item],
    clock: Callable[[], float] = time.perf_counter,
    optimistic: bool = False,
) -> None:
    """Process ``items`` in one transaction on ``conn`` (not in autocommit); see module doc.

    ``optimistic`` (for workers whose handlers only touch the database) first runs the
    batch without savepoints; if a handler fails, that transaction is rolled back and the
    batch runs again with a savepoint per message, so the result is the same either way.
    """
    try:
        if optimistic and await _run(conn, table, consumer, items, clock, savepoints=False):
            return
        await _run(conn, table, consumer, items, clock, savepoints=True)
    except psycopg.Error as exc:
        # (On cancellation the caller closes the connection: the server rolls back.)
        await _rollback_quietly(conn)
        raise BatchAborted(f"batch transaction failed: {type(exc).__name__}: {exc}") from exc


async def _run(
    conn: psycopg.AsyncConnection[Any],
    table: str,
    consumer: str,
    items: Sequence[Item],
    clock: Callable[[], float],
    savepoints: bool,
) -> bool:
    """One pass; False when a handler failed without savepoints (rolled back, run again)."""
    for item in items:
        item.outcome, item.error = None, None
    fresh = await inbox.claim(
        conn,
        table,
        consumer,
        [i.delivery.message_id for i in items],
        [i.delivery.routing_key for i in items],
    )
    opened = False
    cur = conn.cursor()  # one cursor for the runtime's own statements: cheaper per message
    for item in items:
        mid = item.delivery.message_id
        if mid not in fresh:
            item.outcome = DUPLICATE
            continue
        fresh.discard(mid)  # a second copy inside the same batch is a duplicate
        if savepoints:
            # One round trip between messages: release the last savepoint, open the next.
            await cur.execute(_NEXT if opened else _FIRST)
            opened = True
        started = clock()
        try:
            await item.route.handler(HandlerContext(conn, item.delivery), item.payload)
        except Exception as exc:
            item.seconds = clock() - started
            if conn.broken:
                raise BatchAborted(f"database connection lost in a handler: {exc}") from exc
            if not savepoints:
                await conn.rollback()
                return False
            await cur.execute(_UNDO)
            await inbox.unclaim(conn, table, consumer, mid)
            item.outcome, item.error = FAILED, exc
        else:
            item.seconds = clock() - started
            item.outcome = DONE
    await conn.commit()
    return True


async def _rollback_quietly(conn: psycopg.AsyncConnection[Any]) -> None:
    if conn.broken or conn.closed:
        return
    with contextlib.suppress(psycopg.Error):
        await conn.rollback()
