"""The checkpoint horizon (cdc/core/horizon.py): xid widening on numbers, predicate SQL text.

The same predicates are run against real rows in tests/integration/test_horizon_sql.py.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from psycopg import sql

from cdc.core.horizon import (
    Horizon,
    backfill_rows,
    covered,
    parse_backfill,
    published,
    skipped,
    to_recover,
    widen_xid,
    xid8_of,
)

E = 1 << 32


@pytest.mark.parametrize(
    ("xmin", "xmax", "expected"),
    [
        (100, 200, 100),  # epoch 0, ordinary
        (199, 200, 199),
        (200, 200, 200),  # equal low bits: same epoch
        (5, 3 * E + 10, 3 * E + 5),  # same epoch
        (E - 10, 3 * E + 10, 2 * E + E - 10),  # xmin above xmax's low bits: the epoch before
        (E - 1, 1 * E + 3, E - 1),  # the very edge: last xid of epoch 0 seen from epoch 1
        (3, 1 * E + 3, 1 * E + 3),
        (4, 1 * E + 3, 4),  # 4 > 3: from epoch 0
        (E - 1, 5, E - 1),  # impossible in epoch 0; mapped later, never earlier
    ],
)
def test_widen_xid(xmin, xmax, expected):
    assert widen_xid(xmin, xmax) == expected


def test_widen_xid_never_maps_a_row_after_the_snapshot_except_in_epoch_0():
    for xmax in (7 * E + 1000, 7 * E + (E - 1), 8 * E):
        for xmin in (3, 999, 1000, 1001, E // 2, E - 1):
            full = widen_xid(xmin, xmax)
            assert full <= xmax and xmax - full < E and full & 0xFFFFFFFF == xmin


def text(composed: sql.Composable) -> str:
    """Render without a connection (literals of str/datetime only need no server)."""
    return composed.as_string(None)


def test_xid8_expression_text():
    got = text(xid8_of(sql.SQL("t.xmin"), sql.SQL("c.x")))
    assert got == (
        "(CASE WHEN (t.xmin::text::bigint) <= ((c.x::text::bigint) & 4294967295)"
        " OR ((c.x::text::bigint) >> 32) = 0"
        " THEN ((((c.x::text::bigint) >> 32) << 32) | (t.xmin::text::bigint))"
        " ELSE (((((c.x::text::bigint) >> 32) - 1) << 32) | (t.xmin::text::bigint))"
        " END)::text::xid8"
    )
    assert "pg_current_snapshot" in text(xid8_of())


SINCE = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("horizon", "expected"),
    [
        (Horizon("1:1:", "1:1:", "none"), "false"),
        (Horizon("1:1:", "1:1:", "all"), "true"),
        (Horizon("1:1:", "1:1:", "pending", has_status=True), "true"),
        (Horizon("1:1:", "1:1:", "all", done=False), "false"),
        (Horizon("1:1:", "1:1:", "pending", done=False, has_status=True),
         "((status = 'published') IS TRUE)"),
        (Horizon("1:1:", "1:1:", "since", SINCE),
         "((created_at >= '2026-12-01 00:00:00+00:00'::timestamptz) IS TRUE)"),
        (Horizon("1:1:", "1:1:", "since", SINCE, has_status=True),
         "((created_at >= '2026-12-01 00:00:00+00:00'::timestamptz) IS TRUE"
         " OR (status = 'published') IS TRUE)"),
        (Horizon("1:1:", "1:1:", "none", has_status=True), "((status = 'published') IS TRUE)"),
    ],
    ids=["none", "all", "pending", "all-unfinished", "pending-unfinished", "since",
         "since+status", "none+status"],
)
def test_covered(horizon, expected):
    assert text(covered(horizon)) == expected


def test_published_skipped_to_recover_text():
    h = Horizon("900:950:910,920", "500:520:505", "none", has_status=True)
    x = sql.SQL("x")
    assert text(published(h, x)) == (
        "(x < pg_snapshot_xmin('900:950:910,920'::pg_snapshot) AND"
        " (NOT pg_visible_in_snapshot(x, '500:520:505'::pg_snapshot)"
        " OR ((status = 'published') IS TRUE)))"
    )
    assert text(skipped(h, x)) == (
        "(x < pg_snapshot_xmin('500:520:505'::pg_snapshot)"
        " AND NOT ((status = 'published') IS TRUE))"
    )
    assert text(to_recover(h, x)) == f"(NOT {text(published(h, x))} AND NOT {text(skipped(h, x))})"


def test_snapshot_text_is_a_literal_never_pasted():
    h = Horizon("1:2:'); DROP TABLE t; --", "1:1:")
    assert "''); DROP TABLE t; --'::pg_snapshot" in text(published(h, sql.SQL("x")))


def test_backfill_rows():
    x = sql.SQL("x")
    assert text(backfill_rows("pending", None, None, x)) == (
        "((status IS DISTINCT FROM 'published'))"
    )
    assert text(backfill_rows("all", None, None, x)) == "(true)"
    assert text(backfill_rows("all", None, "5:9:6", x)) == (
        "(pg_visible_in_snapshot(x, '5:9:6'::pg_snapshot) AND true)"
    )
    assert "created_at >=" in text(backfill_rows("since", SINCE, None, x))
    with pytest.raises(ValueError, match="none"):
        backfill_rows("none", None, None, x)


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("pending", ("pending", None)),
        ("all", ("all", None)),
        ("since=2026-12-01T00:00:00+00:00", ("since", SINCE)),
        ("since=2026-12-01 01:00:00+01:00", ("since", SINCE)),
    ],
)
def test_parse_backfill(given, expected):
    assert parse_backfill(given) == expected


@pytest.mark.parametrize(
    "given", ["", "none", "Pending", "since=", "since=yesterday", "since=2026-12-01T00:00:00"]
)
def test_parse_backfill_refuses(given):
    with pytest.raises(ValueError, match="use pending, all or since="):
        parse_backfill(given)
