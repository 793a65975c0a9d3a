"""Which outbox rows the checkpoint proves published: SQL predicates built from its horizon.

No connection, no I/O: every function returns a ``psycopg.sql`` composable (identifiers
quoted, values as literals) or a plain number. The callers (prune, recovery, backfill)
put them in their own queries.

Terms (a row is identified by the transaction that wrote it, ``xmin``):

- ``xid8(row)``: ``xmin`` widened to 64 bits with the epoch of the current snapshot's
  ``xmax`` (:func:`widen_xid` is the same rule in Python).
- *proven* snapshot P: every stream row with ``xid8 < pg_snapshot_xmin(P)`` was published
  and confirmed. Only that comparison is used to claim "published": a subtransaction's xid
  is never in a snapshot's xip list, so ``pg_visible_in_snapshot`` could call a row of a
  transaction still open at P "visible".
- *base* snapshot B: exported when the slot was made (the cutover). ``NOT
  pg_visible_in_snapshot(xid8, B)`` means "committed after the cutover" exactly; a row
  reported visible may also be a subtransaction of a transaction open at B, so it counts
  as published only when ``covered`` (the backfill published it, or the poller marked it).

A row is ``published`` when ``xid8 < xmin(P) AND (NOT visible(xid8, B) OR covered)``;
``skipped`` (the operator chose not to backfill it) when ``xid8 < xmin(B) AND NOT
covered``; recovery publishes what is neither. Every predicate is NULL-safe: a NULL
``status`` or ``created_at`` never turns a row into "neither true nor false".
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from psycopg import sql

BackfillMode = Literal["none", "pending", "all", "since"]
BACKFILL_MODES: tuple[BackfillMode, ...] = ("none", "pending", "all", "since")

_LOW = 0xFFFFFFFF
#: The poller's status value for rows it has published.
POLLER_PUBLISHED = "published"
#: A row's own transaction id (the system column).
XMIN = sql.SQL("xmin")
#: The current snapshot's xmax, computed once per statement (an uncorrelated subquery).
CURRENT_XMAX = sql.SQL("(SELECT pg_snapshot_xmax(pg_current_snapshot()))")


@dataclass(frozen=True, slots=True)
class Horizon:
    """The checkpoint fields that decide which rows are published.

    ``proven`` and ``base`` are ``pg_snapshot`` texts (``xmin:xmax:xip,...``);
    ``has_status`` says whether the outbox table has the poller's ``status`` column.
    """

    proven: str
    base: str
    mode: BackfillMode = "none"
    since: datetime | None = None
    done: bool = True
    has_status: bool = False


def widen_xid(xmin: int, current_xmax: int) -> int:
    """The 64-bit xid of a 32-bit ``xmin``, given the current snapshot's 64-bit ``xmax``.

    An existing row's xid lies within 2^31 below ``xmax``: in ``xmax``'s epoch if its low
    32 bits do not exceed ``xmax``'s, else in the epoch before. In epoch 0 there is no epoch
    before; the row is then put in epoch 0 (later, never earlier: the safe side, see
    :func:`xid8_of`).
    """
    epoch, low = current_xmax >> 32, current_xmax & _LOW
    if xmin <= low or epoch == 0:
        return (epoch << 32) | xmin
    return ((epoch - 1) << 32) | xmin


def xid8_of(
    xmin: sql.Composable = XMIN, current: sql.Composable = CURRENT_XMAX
) -> sql.Composed:
    """SQL of :func:`widen_xid`: ``xmin`` (a 32-bit ``xid``) as ``xid8``.

    ``current`` is an ``xid8`` expression of the current snapshot's xmax (default: read once
    per statement). A frozen row keeps its original ``xmin``, which may come from an older
    epoch; it is then mapped to a *later* xid8 than its real one, which can only make it
    look unpublished (kept by prune, sent again by recovery), never the reverse.
    """
    x = sql.SQL("({}::text::bigint)").format(xmin)
    c = sql.SQL("({}::text::bigint)").format(current)
    return sql.SQL(
        "(CASE WHEN {x} <= ({c} & 4294967295) OR ({c} >> 32) = 0"
        " THEN ((({c} >> 32) << 32) | {x})"
        " ELSE (((({c} >> 32) - 1) << 32) | {x}) END)::text::xid8"
    ).format(x=x, c=c)


def _snapshot(text: str) -> sql.Composed:
    return sql.SQL("{}::pg_snapshot").format(sql.Literal(text))


def _is_true(condition: sql.Composable) -> sql.Composed:
    return sql.SQL("({}) IS TRUE").format(condition)


def _any(parts: list[sql.Composable]) -> sql.Composable:
    if not parts:
        return sql.SQL("false")
    return sql.SQL("({})").format(sql.SQL(" OR ").join(parts))


def parse_backfill(text: str) -> tuple[BackfillMode, datetime | None]:
    """The ``--backfill`` option: ``pending`` | ``all`` | ``since=<ISO 8601 time with offset>``."""
    if text == "pending":
        return "pending", None
    if text == "all":
        return "all", None
    if text.startswith("since="):
        try:
            since = datetime.fromisoformat(text.removeprefix("since="))
        except ValueError:
            since = None
        if since is not None and since.tzinfo is not None:
            return "since", since
    raise ValueError(
        f"--backfill {text!r}: use pending, all or since=<ISO time with offset>, "
        "e.g. since=2026-12-01T00:00:00+00:00"
    )


def covered(h: Horizon) -> sql.Composable:
    """Rows before the cutover that count as published: backfilled, or marked by the poller.

    A ``pending`` backfill sends exactly the rows whose status is not ``published``, so
    once it is done every pre-cutover row is covered (the rest by the status clause).
    """
    parts: list[sql.Composable] = []
    if h.done and h.mode in ("all", "pending"):
        return sql.SQL("true")
    if h.done and h.mode == "since" and h.since is not None:
        parts.append(_is_true(sql.SQL("created_at >= {}").format(sql.Literal(h.since))))
    if h.has_status:
        parts.append(_is_true(sql.SQL("status = {}").format(sql.Literal(POLLER_PUBLISHED))))
    return _any(parts)


def published(h: Horizon, xid8: sql.Composable | None = None) -> sql.Composed:
    """Rows the checkpoint proves published (the only ones prune may delete)."""
    x = xid8 if xid8 is not None else xid8_of()
    return sql.SQL(
        "({x} < pg_snapshot_xmin({p}) AND (NOT pg_visible_in_snapshot({x}, {b}) OR {cov}))"
    ).format(x=x, p=_snapshot(h.proven), b=_snapshot(h.base), cov=covered(h))


def skipped(h: Horizon, xid8: sql.Composable | None = None) -> sql.Composed:
    """Rows certainly from before the cutover that the operator chose not to publish."""
    x = xid8 if xid8 is not None else xid8_of()
    return sql.SQL("({x} < pg_snapshot_xmin({b}) AND NOT {cov})").format(
        x=x, b=_snapshot(h.base), cov=covered(h)
    )


def to_recover(h: Horizon, xid8: sql.Composable | None = None) -> sql.Composed:
    """Rows a recovery publishes: neither proven published nor skipped by choice."""
    x = xid8 if xid8 is not None else xid8_of()
    return sql.SQL("(NOT {} AND NOT {})").format(published(h, x), skipped(h, x))


def backfill_choice(mode: BackfillMode, since: datetime | None) -> sql.Composable:
    """Which pre-cutover rows a backfill in ``mode`` publishes."""
    if mode == "pending":
        return sql.SQL("(status IS DISTINCT FROM {})").format(sql.Literal(POLLER_PUBLISHED))
    if mode == "all":
        return sql.SQL("true")
    if mode == "since" and since is not None:
        return _is_true(sql.SQL("created_at >= {}").format(sql.Literal(since)))
    raise ValueError(f"no rows to backfill in mode {mode!r}")


def backfill_rows(
    mode: BackfillMode, since: datetime | None, base: str | None, xid8: sql.Composable | None = None
) -> sql.Composed:
    """The backfill's row selection.

    Inside the slot's exported snapshot (``base`` None) visibility is the snapshot's own and
    exact. A resumed run no longer has that snapshot and selects the rows visible in the
    base snapshot by ``pg_visible_in_snapshot(xid8, base)``: a row of a subtransaction that
    was open at the cutover then counts as visible and may be sent twice, never missed.
    """
    choice = backfill_choice(mode, since)
    if base is None:
        return sql.SQL("({})").format(choice)
    x = xid8 if xid8 is not None else xid8_of()
    return sql.SQL("(pg_visible_in_snapshot({x}, {b}) AND {choice})").format(
        x=x, b=_snapshot(base), choice=choice
    )
