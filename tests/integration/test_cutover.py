"""Cutover from the polling relay: `cdc setup --backfill ...` (docs/cutover.md).

The seed's table (cdc/sql/001_outbox_table.sql) holds what the poller left: 10,000
``pending`` rows, ``failed`` ones and ``published`` ones; writers keep inserting while
`cdc setup --backfill pending` creates the slot and publishes from its snapshot. Every row
the poller had not published arrives exactly once (from the backfill if it was committed
before the slot's snapshot, else from the stream), the published ones never.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from harness.processes import Relay
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PENDING, FAILED, PUBLISHED = 10_000, 1_000, 2_000


def sources(msgs: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in msgs:
        key = m.headers.get("x-cdc-source", "stream")
        out[key] = out.get(key, 0) + 1
    return out


def test_cutover_with_live_writers_sends_every_unpublished_row_exactly_once(env):
    env.create_seed_table()
    seeded = env.seed_poller_rows(PENDING, FAILED, PUBLISHED)
    assert len(seeded["pending"]) == PENDING
    work = env.workload(
        writers=2, events_per_writer=3000, max_txn=20, rate_per_writer=400,
        kinds={"commit": 0.7, "savepoint": 0.2, "rollback": 0.1},
    ).start()  # fmt: skip
    time.sleep(0.5)  # writers are busy before, during and after the slot is made
    t0 = time.monotonic()
    setup = Relay(
        env.relay_env(max_in_flight=250),  # 40+ batches: the relay starts during them
        env.tmp_path / "setup.log",
        env.slot_active,
        name="setup",
        argv=["-m", "cdc", "setup", "--backfill", "pending"],
    )
    env.relays.append(setup)
    setup.start()
    # The relay may stream while the backfill runs: start it when setup says so.
    env.wait_for(lambda: "may start now" in setup.log(), 60, lambda: f"the slot\n{setup.tail()}")
    assert env.checkpoint() is not None
    relay = env.relay(metrics=True)
    relay.wait_streaming()
    during = env.checkpoint()
    assert setup.wait_exit(240) == 0, setup.tail()
    setup_s = time.monotonic() - t0
    assert "backfill: " in setup.log() and "rows/s" in setup.log(), "no progress on stderr"
    work.join(timeout=120)

    live = work.committed_ids
    expected = seeded["pending"] | seeded["failed"] | live
    msgs = env.drain(len(expected), quiet=3.0, timeout=180)
    got = [m.message_id for m in msgs]
    assert not set(got) & seeded["published"], "rows the poller had published were sent"
    assert not set(got) & work.dropped_ids, "rolled-back rows were sent"
    rows = env.fetch_rows()
    env.check_exactly_once(msgs, {k: rows[k] for k in expected})
    split = sources(msgs)
    live_from_backfill = sum(
        1 for m in msgs if m.message_id in live and m.headers.get("x-cdc-source") == "backfill"
    )
    # The boundary really fell among the live writers' rows.
    assert split.get("stream", 0) > 0 and split.get("backfill", 0) > PENDING + FAILED - 1
    checkpoint = env.checkpoint()
    assert checkpoint is not None
    assert checkpoint["backfill_done"] is True and checkpoint["backfill_mode"] == "pending"
    assert checkpoint["backfill_rows_done"] == checkpoint["backfill_rows_total"]
    snapshots = {m.headers["x-cdc-snapshot"] for m in msgs if "x-cdc-snapshot" in m.headers}
    assert snapshots == {checkpoint["base_snapshot"]}
    total = float(checkpoint["backfill_rows_total"])
    env.wait_for(lambda: relay.metric("cdc_backfill_rows_total") == total, 20, "backfill gauge")
    print(
        f"\ncutover: {len(expected)} rows expected, {len(msgs)} arrived, 0 missing, 0 twice; "
        f"backfill {split.get('backfill')} (of which {live_from_backfill} live rows committed "
        f"before the snapshot), stream {split.get('stream')}; {len(live)} live rows; "
        f"setup --backfill took {setup_s:.1f}s; the relay streamed from "
        f"{during['backfill_rows_done'] if during else '?'} backfilled rows on"
    )
    assert env.cdc("setup", "--backfill", "pending").returncode == 0  # done: kept, nothing sent
    assert env.drain(quiet=1.0, timeout=5) == []


def test_status_and_metrics_show_backfill_progress(env):
    env.create_seed_table()
    env.seed_poller_rows(pending=300, failed=20, published=30)
    res = env.cdc("setup", "--backfill", "all")
    assert res.returncode == 0, res.stderr
    status = env.cdc("status", "--json")
    cp = json.loads(status.stdout)["checkpoint"]
    backfill = {k: cp[k] for k in cp if k.startswith("backfill_")}
    assert backfill == {"backfill_mode": "all", "backfill_done": True,
                        "backfill_rows_done": 350, "backfill_rows_total": 350}  # fmt: skip
    relay = env.relay(metrics=True)
    relay.wait_streaming()
    env.wait_for(lambda: relay.metric("cdc_backfill_rows_done") == 350, 20, "backfill gauge")
    assert relay.metric("cdc_backfill_rows_total") == 350
    assert len(env.drain(350, quiet=1.0)) == 350


def test_since_backfill_takes_rows_created_since(env):
    env.create_seed_table()
    env.seed_poller_rows(pending=100, failed=0, published=100)
    cut = env.sql(
        sql.SQL("SELECT created_at FROM {} ORDER BY created_at OFFSET 150 LIMIT 1").format(
            env.table_ident()
        )
    )[0][0]
    res = env.cdc("setup", "--backfill", f"since={cut.isoformat()}")
    assert res.returncode == 0, res.stderr
    assert len(env.drain(50, quiet=1.0)) == 50  # the last 50 rows, published or not


def test_pending_needs_a_status_column_and_modes_must_match(env):
    env.sql(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, event_type text, payload jsonb)")
            .format(env.table_ident()))  # fmt: skip
    res = env.cdc("setup", "--backfill", "pending")
    assert res.returncode == 2
    assert "use --backfill all or --backfill since=" in res.stderr
    bad = env.cdc("setup", "--backfill", "since=yesterday")
    assert bad.returncode == 2 and "since=<ISO time" in bad.stderr
    env.sql(sql.SQL("INSERT INTO {} SELECT g, 'x.y', '{{}}' FROM generate_series(1, 10) g")
            .format(env.table_ident()))  # fmt: skip
    assert env.cdc("setup", "--backfill", "all").returncode == 0
    got = env.drain(10, quiet=1.0)
    # Keyset order is the column's (bigint), not its text: 10 after 9, once.
    assert sorted(int(m.message_id) for m in got) == list(range(1, 11))
    other = env.cdc("setup", "--backfill", "since=2026-01-01T00:00:00+00:00")
    assert other.returncode == 3 and "set up with backfill all" in other.stderr


def test_backfill_after_a_plain_setup_uses_its_base_snapshot(env):
    env.create_seed_table()
    seeded = env.seed_poller_rows(200, 20, 30)
    env.setup()  # no backfill: the slot's base snapshot is the boundary
    if env.checkpoint() is None:
        pytest.skip("plain `cdc setup` writes no checkpoint row on this branch yet")
    later = {r["id"] for r in env.insert([env.event("after.slot") for _ in range(10)])}
    res = env.cdc("setup", "--backfill", "pending")
    assert res.returncode == 0, res.stderr
    assert "had no backfill" in res.stderr
    got = [m.message_id for m in env.drain(220, quiet=1.0)]
    assert sorted(got) == sorted(seeded["pending"] | seeded["failed"])
    assert not set(got) & later  # after the slot: the stream's
    row = env.checkpoint()
    assert row is not None and row["backfill_mode"] == "pending" and row["backfill_done"]
