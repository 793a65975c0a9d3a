"""`cdc recover` after a slot loss: a new slot, and from its snapshot every row the checkpoint
cannot prove published. Lost 0; duplicates only among rows committed after the last proven
checkpoint; a transaction open across that checkpoint is published even though its rows
were created before it.
"""

from __future__ import annotations

from typing import Any

import pytest
from harness.rows import insert_rows
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def events(env: Any, n: int, tag: str) -> set[str]:
    return {r["id"] for r in env.insert([env.event("rec.created", {"tag": tag}) for _ in range(n)])}


def set_up(env: Any) -> None:
    """A slot with a checkpoint row (a backfill of an empty table is a plain setup)."""
    env.create_seed_table()
    res = env.cdc("setup", "--backfill", "all")
    assert res.returncode == 0, res.stderr


def unproven(env: Any, snapshot: str) -> set[str]:
    """Rows written by transactions at or above the snapshot's xmin (the server's epoch is 0
    here). Other sessions on the shared server may hold transactions open across a
    checkpoint: then rows written after theirs began are not proven and may be sent again."""
    return {r[0] for r in env.sql(
        f"SELECT id::text FROM {env.table} WHERE xmin::text::bigint >="
        " pg_snapshot_xmin(%s::pg_snapshot)::text::bigint",
        (snapshot,),
    )}  # fmt: skip


def drop_slot_by_hand(env: Any) -> None:
    env.sql("SELECT pg_drop_replication_slot(%s)", (env.slot,))


def test_slot_dropped_by_hand_recovery_loses_nothing(env):
    set_up(env)
    relay = env.relay(metrics=True)
    relay.wait_streaming()
    before = events(env, 200, "before-checkpoint")
    assert len(env.drain(200, quiet=0.5)) == 200
    proven = env.prove_checkpoint()
    after = events(env, 100, "after-checkpoint")  # published, but not proven yet
    assert len(env.drain(100, quiet=0.5)) == 100
    assert relay.sigterm() == 0
    drop_slot_by_hand(env)
    missed = events(env, 150, "no-slot")  # in no stream: only recovery can send them

    res = env.cdc("recover", timeout=120)
    assert res.returncode == 0, res.stderr
    assert "published" in res.stderr
    recovered = env.drain(quiet=2.0, timeout=60)
    got = [m.message_id for m in recovered]
    assert len(got) == len(set(got))
    assert missed <= set(got), f"lost {len(missed - set(got))} of {len(missed)}"
    assert not set(got) & before - unproven(env, proven), "proven rows were sent again"
    dups = set(got) - missed
    assert dups <= after | unproven(env, proven)
    assert all(m.headers["x-cdc-source"] == "recovery" for m in recovered)
    checkpoint = env.checkpoint()
    assert checkpoint is not None and checkpoint["state"] == "ready"
    assert {m.headers["x-cdc-snapshot"] for m in recovered} == {str(checkpoint["proven_snapshot"])}

    relay = env.relay()
    relay.wait_streaming()
    later = events(env, 50, "after-recovery")
    streamed = env.drain(50, quiet=1.0)
    assert {m.message_id for m in streamed} == later
    rows = env.fetch_rows()
    env.check_exactly_once(
        env_msgs := [*recovered, *streamed],
        {k: rows[k] for k in missed | later | dups},
    )
    print(
        f"\nrecovery: lost 0 of {len(missed)} rows written with no slot; {len(dups)} duplicates "
        f"(bound: the {len(after)} rows published after the last proven checkpoint); "
        f"{len(env_msgs)} messages after the loss"
    )
    again = env.cdc("recover")
    assert again.returncode == 0 and "nothing to recover" in again.stderr


def test_long_transaction_across_a_checkpoint_arrives_after_recovery(env):
    set_up(env)
    relay = env.relay()
    relay.wait_streaming()
    early = events(env, 20, "before-the-long-transaction")
    with env.connect() as long:
        long.execute("BEGIN")
        long_row = env.event("rec.long", {"tag": "long"})
        with long.cursor() as cur:
            insert_rows(cur, env.table, [long_row])  # xid taken: open across the checkpoint
        short = events(env, 20, "short")
        assert len(env.drain(40, quiet=0.5)) == 40
        proven = env.prove_checkpoint(quiet=False)  # while the long transaction is open
        assert relay.sigterm() == 0
        long.execute("COMMIT")  # after the checkpoint; created_at is from before it
    drop_slot_by_hand(env)  # the stream never carried it

    res = env.cdc("recover", timeout=120)
    assert res.returncode == 0, res.stderr
    got = {m.message_id for m in env.drain(quiet=2.0, timeout=60)}
    assert long_row["id"] in got, "the long transaction's row was lost"
    # Rows after the long transaction began are not proven: sent again, counted.
    assert got - {long_row["id"]} <= short | (early & unproven(env, proven))
    print(f"\nlong transaction: its row arrived after recovery; {len(got) - 1} duplicates "
          f"(rows committed while it was open: {len(short)})")


def test_recover_without_a_checkpoint_or_with_a_healthy_slot(env):
    res = env.cdc("recover")
    assert res.returncode == 3 and "nothing to recover" in res.stderr and "cdc setup" in res.stderr
    set_up(env)
    res = env.cdc("recover")
    assert res.returncode == 0 and "healthy: nothing to recover" in res.stderr
    assert env.slot_info() is not None and env.drain(quiet=0.5, timeout=3) == []


@pytest.mark.parametrize("loss", ["drop-publication", "recreate-table"])
def test_recover_after_the_table_left_the_publication(env, loss):
    set_up(env)
    relay = env.relay()
    relay.wait_streaming()
    events(env, 50, "before")
    assert len(env.drain(50, quiet=0.5)) == 50
    env.prove_checkpoint()
    assert relay.sigterm() == 0
    table = env.table_ident()
    if loss == "drop-publication":
        env.sql(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(env.publication)))
    else:
        old = f"{env.table}_old"
        env.extra_tables.append(old)
        env.sql(sql.SQL("ALTER TABLE {} RENAME TO {}").format(
            table, sql.Identifier(old.split(".")[1])))  # fmt: skip
        env.sql(sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING ALL)").format(
            table, sql.Identifier(*old.split("."))))  # fmt: skip
    unstreamed = events(env, 80, "not-in-the-publication")

    res = env.cdc("recover", timeout=120)
    assert res.returncode == 0, res.stderr
    got = {m.message_id for m in env.drain(quiet=2.0, timeout=60)}
    assert unstreamed <= got, f"lost {len(unstreamed - got)}"
    assert env.sql(
        "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s AND schemaname = %s"
        " AND tablename = %s",
        (env.publication, *env.table.split(".")),
    )[0][0] == 1, "the publication does not hold the table again"
    relay = env.relay()
    relay.wait_streaming()
    later = events(env, 20, "after")
    assert {m.message_id for m in env.drain(20, quiet=1.0)} == later


def test_setup_with_backfill_refuses_a_lost_slot_like_plain_setup(env):
    set_up(env)
    drop_slot_by_hand(env)
    res = env.cdc("setup", "--backfill", "all")
    assert res.returncode == 5 and "cdc recover" in res.stderr, res.stderr
    assert env.slot_info() is None, "setup made a slot"
    assert env.cdc("recover").returncode == 0
    assert env.cdc("setup", "--backfill", "all").returncode == 0
