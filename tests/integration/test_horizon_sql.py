"""The horizon predicates (cdc/core/horizon.py) select the right rows on a real PostgreSQL.

One table, rows written around a base snapshot B (the cutover) and a proven snapshot P (a
checkpoint): rows before B, a transaction open across B, a subtransaction of it, rows
between B and P, a long transaction open across P and committed after it, rows after P.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from psycopg import sql

from cdc.core.horizon import (
    Horizon,
    backfill_rows,
    published,
    skipped,
    to_recover,
    widen_xid,
    xid8_of,
)

E = 1 << 32
EARLY = datetime(2026, 1, 1, tzinfo=UTC)
LATE = datetime(2026, 6, 1, tzinfo=UTC)
SINCE = datetime(2026, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("xmin", "xmax"),
    [(100, 200), (200, 200), (5, 3 * E + 10), (E - 10, 3 * E + 10), (E - 1, E + 3), (4, E + 3),
     (3, E + 3), (E - 1, 5)],
)
def test_xid8_sql_equals_the_python_rule(env, xmin, xmax):
    expr = xid8_of(
        sql.SQL("{}::xid").format(sql.Literal(str(xmin))),
        sql.SQL("{}::xid8").format(sql.Literal(str(xmax))),
    )
    got = env.sql(sql.SQL("SELECT ({})::text").format(expr))[0][0]
    assert int(got) == widen_xid(xmin, xmax)


class Scenario:
    """Rows tagged by where they were written relative to B and P."""

    def __init__(self, env: Any) -> None:
        self.env = env
        self.table = env.table_ident()
        env.sql(
            sql.SQL(
                "CREATE TABLE {} (id text PRIMARY KEY, status text, created_at timestamptz,"
                " top xid8 DEFAULT pg_current_xact_id())"
            ).format(self.table)
        )

    def insert(self, conn: Any, tag: str, status: str = "pending", at: datetime = LATE) -> None:
        conn.execute(
            sql.SQL("INSERT INTO {} (id, status, created_at) VALUES (%s, %s, %s)").format(
                self.table
            ),
            (tag, status, at),
        )

    def snapshot(self, *open_txns: Any) -> str:
        """pg_current_snapshot() as if the open transactions were only ``open_txns``.

        The snapshot is cluster-wide: other sessions' transactions (other tests on the shared
        server) would lower its xmin and make the expectations below conservative. Keeping
        only ours models a quiet server; a busier one only proves less, never more.
        """
        xmin, xmax, _ = str(self.env.sql("SELECT pg_current_snapshot()::text")[0][0]).split(":")
        ids = [int(c.execute("SELECT pg_current_xact_id()::text").fetchone()[0]) for c in open_txns]
        # An xid at or above xmax is in progress by definition and not listed.
        ours = sorted(x for x in ids if x < int(xmax))
        assert all(int(xmin) <= x for x in ours), (xmin, xmax, ids)
        return f"{ours[0] if ours else xmax}:{xmax}:{','.join(map(str, ours))}"

    def select(self, predicate: sql.Composable) -> set[str]:
        rows = self.env.sql(sql.SQL("SELECT id FROM {} WHERE {}").format(self.table, predicate))
        return {r[0] for r in rows}


@pytest.fixture
def rows(env):
    s = Scenario(env)
    with env.connect() as c:
        s.insert(c, "a0-before", at=EARLY)
        s.insert(c, "a1-before-published", status="published", at=EARLY)
    t0, t2, t1 = env.connect(), env.connect(), env.connect()
    try:
        t0.execute("BEGIN")
        s.insert(t0, "t0-open-across-B")
        t2.execute("BEGIN")
        s.insert(t2, "t2-open-across-B")
        t2.execute("SAVEPOINT s")
        s.insert(t2, "t2-subxact-across-B")
        t2.execute("RELEASE SAVEPOINT s")
        with env.connect() as c:
            s.insert(c, "a2-before-after-t0", at=EARLY)
        base = s.snapshot(t0, t2)
        t0.execute("COMMIT")
        t2.execute("COMMIT")
        with env.connect() as c:
            s.insert(c, "b1-between")
        t1.execute("BEGIN")
        s.insert(t1, "t1-long-across-P")
        proven = s.snapshot(t1)
        with env.connect() as c:
            s.insert(c, "b2-after-P")
        t1.execute("COMMIT")
    finally:
        for c in (t0, t1, t2):
            c.close()
    s.base, s.proven = base, proven
    return s


ALL = {
    "a0-before", "a1-before-published", "a2-before-after-t0", "t0-open-across-B",
    "t2-open-across-B", "t2-subxact-across-B", "b1-between", "t1-long-across-P", "b2-after-P",
}


def test_xid8_of_real_rows_matches_their_transaction(rows):
    got = rows.select(sql.SQL("{} = top").format(xid8_of()))
    # pg_current_xact_id() in a subtransaction is the top-level xid; xmin is the subxact's.
    assert got == ALL - {"t2-subxact-across-B"}
    sub = rows.env.sql(
        sql.SQL("SELECT {}::text, top::text, xmin::text FROM {} WHERE id = %s").format(
            xid8_of(), rows.table
        ),
        ("t2-subxact-across-B",),
    )[0]
    assert int(sub[0]) > int(sub[1]) and int(sub[0]) % E == int(sub[2])


def test_no_backfill_proves_only_stream_rows_below_the_checkpoint(rows):
    h = Horizon(rows.proven, rows.base, "none", has_status=True)
    assert rows.select(published(h)) == {
        "a1-before-published", "t0-open-across-B", "t2-open-across-B", "b1-between",
    }
    # The long transaction opened before P and committed after it is not proven; the
    # subtransaction looks "visible" in B, so it is not proven either (safe side).
    assert rows.select(to_recover(h)) == {
        "t2-subxact-across-B", "a2-before-after-t0", "t1-long-across-P", "b2-after-P",
    }
    assert rows.select(skipped(h)) == {"a0-before"}


@pytest.mark.parametrize("mode", ["all", "pending"])
def test_a_finished_full_backfill_covers_every_row_before_the_cutover(rows, mode):
    h = Horizon(rows.proven, rows.base, mode, done=True, has_status=True)
    assert rows.select(published(h)) == ALL - {"t1-long-across-P", "b2-after-P"}
    assert rows.select(to_recover(h)) == {"t1-long-across-P", "b2-after-P"}
    assert rows.select(skipped(h)) == set()


def test_since_backfill_covers_rows_created_since(rows):
    h = Horizon(rows.proven, rows.base, "since", SINCE, done=True, has_status=True)
    assert rows.select(published(h)) == ALL - {
        "t1-long-across-P", "b2-after-P", "a0-before", "a2-before-after-t0",
    }
    assert rows.select(skipped(h)) == {"a0-before"}
    assert "a2-before-after-t0" in rows.select(to_recover(h))  # ambiguous: sent again


def test_an_unfinished_backfill_covers_nothing_yet(rows):
    h = Horizon(rows.proven, rows.base, "all", done=False, has_status=False)
    assert rows.select(published(h)) == {"t0-open-across-B", "t2-open-across-B", "b1-between"}
    # a1 is not covered (no status column in this horizon), a0 is left to the backfill.
    assert rows.select(skipped(h)) == {"a0-before", "a1-before-published"}


def test_resumed_backfill_selects_rows_visible_in_the_base(rows):
    got = rows.select(backfill_rows("pending", None, rows.base))
    # The subtransaction of a transaction open at B is taken (maybe sent twice), not missed.
    assert got == {"a0-before", "a2-before-after-t0", "t2-subxact-across-B"}
    assert rows.select(backfill_rows("since", SINCE, rows.base)) == {"t2-subxact-across-B"}
    assert rows.select(backfill_rows("all", None, rows.base)) == {
        "a0-before", "a1-before-published", "a2-before-after-t0", "t2-subxact-across-B",
    }


def test_null_status_and_created_at_are_never_unknown(rows):
    rows.env.sql(sql.SQL("UPDATE {} SET status = NULL, created_at = NULL WHERE id = 'a0-before'")
                 .format(rows.table))  # fmt: skip
    # The UPDATE gave a0 a new xmin: it now looks like a row after P, to be recovered.
    for h in (
        Horizon(rows.proven, rows.base, "since", SINCE, done=True, has_status=True),
        Horizon(rows.proven, rows.base, "none", has_status=True),
    ):
        assert "a0-before" in rows.select(to_recover(h))
