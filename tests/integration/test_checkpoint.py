"""The relay's periodic checkpoint against the real server.

- committed rows whose broker confirms are held back (a proxy holds the broker's bytes)
  are never proven, however many checkpoints pass; once the confirms arrive they are;
- a transaction that took its xid before a checkpoint and stays open across several of
  them, while short ones commit and are delivered, is proven only after it commits and its
  row is delivered (while it is open, PostgreSQL itself keeps every snapshot's xmin at or
  below its xid; the test checks the relay then moves past it).
"""

from __future__ import annotations

import time

import pytest
from harness.rows import insert_rows
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _horizon(env) -> int:
    """``pg_snapshot_xmin(proven_snapshot)`` of this test's checkpoint row."""
    return int(
        env.sql(
            "SELECT pg_snapshot_xmin(proven_snapshot)::text::bigint FROM cdc.relay_checkpoint"
            " WHERE slot_name = %s",
            (env.slot,),
        )[0][0]
    )


def _xid_of(env, row_id: str) -> int:
    query = sql.SQL("SELECT xmin::text::bigint FROM {} WHERE id::text = %s").format(
        env.table_ident()
    )
    return int(env.sql(query, (row_id,))[0][0])


def test_rows_without_broker_confirms_are_never_proven(env, tcp_proxy):
    env.setup()
    relay = env.relay(checkpoint_interval=0.5, amqp_url=tcp_proxy.url())
    relay.wait_streaming()
    first = env.insert([env.event("proof.confirmed")])[0]
    assert len(env.drain(1, quiet=0.3)) == 1
    env.wait_for(lambda: _horizon(env) > _xid_of(env, first["id"]), 20, "the first row proven")

    tcp_proxy.hold()  # the broker gets the publishes; its confirms do not come back
    try:
        held = env.insert([env.event("proof.held") for _ in range(3)])
        xid = _xid_of(env, held[0]["id"])
        assert len(env.drain(3, quiet=0.3)) == 3  # in the broker, not yet confirmed
        before = env.checkpoint()["updated_at"]
        time.sleep(3)  # about six checkpoints
        assert env.checkpoint()["updated_at"] > before, "the checkpoint kept being written"
        assert _horizon(env) <= xid, "rows were proven before the broker confirmed them"
    finally:
        tcp_proxy.release()
    t0 = time.monotonic()
    env.wait_for(lambda: _horizon(env) > xid, 20, lambda: f"horizon past {xid}: {_horizon(env)}")
    print(f"held rows proven {time.monotonic() - t0:.1f}s after the confirms were released")
    assert relay.sigterm() == 0


def test_an_open_transaction_holds_the_proven_horizon_until_published(env):
    env.setup()
    relay = env.relay(checkpoint_interval=0.5)
    relay.wait_streaming()
    long_row = env.event("horizon.long")
    with env.connect() as conn:
        conn.execute("BEGIN")
        insert_rows(conn.cursor(), env.table, [long_row])
        xid = int(conn.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()[0])
        # Several checkpoints pass with other transactions committing and delivered.
        for n in range(4):
            env.insert([env.event("horizon.short") for _ in range(5)])
            assert len(env.drain(5, quiet=0.3)) == 5
            time.sleep(0.6)
            assert _horizon(env) <= xid, f"round {n}: the open transaction {xid} was proven"
        conn.execute("COMMIT")
    msgs = env.drain(1, quiet=0.3)
    assert [m.message_id for m in msgs] == [long_row["id"]]
    t0 = time.monotonic()
    env.wait_for(lambda: _horizon(env) > xid, 20, lambda: f"horizon past {xid}: {_horizon(env)}")
    print(f"committed long transaction proven {time.monotonic() - t0:.1f}s after delivery")
    assert relay.sigterm() == 0
