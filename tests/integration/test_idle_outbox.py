"""An idle outbox does not pin WAL while other tables churn.

The relay is streaming and nothing is in flight; another table, not in the publication, takes
a few seconds of small transactions. The slot's ``confirmed_flush_lsn`` must advance past the
WAL written by the churn (keepalive ``wal_end`` is confirmed when nothing is open), and the
outbox keeps working afterwards.
"""

from __future__ import annotations

import time

import pytest
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_idle_outbox_confirms_other_tables_wal(env):
    env.setup()
    churn = f"public.churn_{env.tag}"
    env.extra_tables.append(churn)
    churn_t = sql.Identifier("public", f"churn_{env.tag}")
    env.sql(sql.SQL("CREATE TABLE {} (id bigserial PRIMARY KEY, v text)").format(churn_t))
    published = env.sql(
        "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = %s",
        (env.publication,),
    )
    assert published == [(env.table,)], f"publication should hold only the outbox: {published}"

    relay = env.relay(metrics=True)
    relay.wait_streaming()
    # one event first, so the relay has had something in flight and finished it
    env.insert([env.event("idle.before")])
    assert len(env.drain(1, quiet=0.5)) == 1

    start_lsn = env.current_wal_lsn()
    start_confirmed = env.confirmed_flush_lsn()
    deadline = time.monotonic() + 3.0
    txns = 0
    with env.connect() as conn:
        while time.monotonic() < deadline:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {} (v) SELECT repeat('x', 100) FROM generate_series(1, 5)"
                ).format(churn_t)
            )
            txns += 1
    end_lsn = env.current_wal_lsn()
    assert end_lsn - start_lsn > 100_000, "the churn wrote WAL"

    confirmed = env.wait_for(
        lambda: (c := env.confirmed_flush_lsn()) >= end_lsn and c,
        30,
        lambda: (
            f"confirmed_flush_lsn {env.format_lsn(env.confirmed_flush_lsn())} to pass the "
            f"churn's end {env.format_lsn(end_lsn)} (start {env.format_lsn(start_lsn)}, "
            f"confirmed at start {env.format_lsn(start_confirmed)})"
        ),
    )
    print(
        f"churn: {txns} txns, {end_lsn - start_lsn} bytes of WAL; confirmed_flush_lsn "
        f"{env.format_lsn(start_confirmed)} -> {env.format_lsn(confirmed)}"
    )
    assert confirmed > start_lsn
    # nothing from the churn table was published
    assert env.sink_count() == 0
    # the relay reports the progress too, and the outbox still flows
    flushed = relay.metric("cdc_flushed_lsn")
    assert flushed is not None and flushed >= start_lsn
    row = env.insert([env.event("idle.after")])[0]
    after = env.drain(1, quiet=0.5)
    assert [m.message_id for m in after] == [row["id"]]
    assert relay.alive()
