"""`cdc prune --older-than <d>` and the relay's periodic prune delete only proven rows.

With the relay stopped, rows it has not published stay however old they are; with the
relay caught up (a proven checkpoint), what is older than the cutoff goes, including the
rows the poller had marked ``published`` before the cutover. A writer inserting during a
large prune is never held up by it (insert latency measured and reported).
"""

from __future__ import annotations

import statistics
import threading
import time
from typing import Any

import pytest
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def ids(env: Any) -> set[str]:
    return {r[0] for r in env.sql(sql.SQL("SELECT id::text FROM {}").format(env.table_ident()))}


def events(env: Any, n: int) -> set[str]:
    return {r["id"] for r in env.insert([env.event("prune.me") for _ in range(n)])}


def prune(env: Any, older_than: str) -> str:
    res = env.cdc("prune", "--older-than", older_than, timeout=240)
    assert res.returncode == 0, res.stderr
    return res.stderr


def test_prune_refuses_without_a_checkpoint_and_keeps_unpublished_rows(env):
    env.create_seed_table()
    res = env.cdc("prune", "--older-than", "1s")
    assert res.returncode == 3 and "no checkpoint" in res.stderr
    assert env.cdc("prune").returncode == 2  # no duration given
    assert env.cdc("prune", "--older-than", "7 days").returncode == 2
    assert env.cdc("setup", "--backfill", "all").returncode == 0
    unpublished = events(env, 300)  # the relay never ran
    time.sleep(1.2)
    out = prune(env, "1s")
    assert "pruned 0 published rows" in out and "kept 300 older rows" in out
    assert ids(env) == unpublished


def test_prune_deletes_proven_rows_older_than_the_cutoff_only(env):
    env.create_seed_table()
    seeded = env.seed_poller_rows(pending=500, failed=50, published=450)
    assert env.cdc("setup", "--backfill", "pending").returncode == 0
    relay = env.relay()
    relay.wait_streaming()
    streamed = events(env, 400)
    env.drain(550 + 400, quiet=1.0)
    env.prove_checkpoint()
    time.sleep(1.5)
    young = events(env, 100)  # newer than the cutoff (and not proven yet)
    out = prune(env, "1s")
    assert "pruned 1400 published rows" in out, out
    assert ids(env) == young
    assert not ids(env) & (streamed | seeded["published"])

    # The relay stops; rows it never saw stay, even once they are old enough.
    assert relay.sigterm() == 0
    unpublished = events(env, 200)
    time.sleep(1.5)
    out = prune(env, "1s")
    assert "pruned 0 published rows" in out and "kept 300 older rows" in out, out
    assert ids(env) == young | unpublished


def test_periodic_prune_in_the_relay(env):
    env.create_seed_table()
    assert env.cdc("setup", "--backfill", "all").returncode == 0
    relay = env.relay(metrics=True, prune_older_than="1s", prune_interval="0.5")
    relay.wait_streaming()
    events(env, 250)
    env.drain(250, quiet=0.5)
    env.prove_checkpoint()
    env.wait_for(lambda: not ids(env), 30, lambda: f"periodic prune\n{relay.tail()}")
    env.wait_for(lambda: relay.metric("cdc_pruned_rows_total") == 250, 10, "pruned metric")


def test_a_writer_is_not_blocked_by_a_large_prune(env):
    env.create_seed_table()
    # 100,000 rows the poller published before the cutover: all prunable once old enough.
    env.seed_poller_rows(pending=0, failed=0, published=100_000)
    assert env.cdc("setup", "--backfill", "pending").returncode == 0
    relay = env.relay()
    relay.wait_streaming()
    env.prove_checkpoint()
    time.sleep(1.2)
    latencies: list[float] = []
    waits: list[str] = []
    stop = threading.Event()
    writer_pid: list[int] = []

    def writer() -> None:
        with env.connect() as conn:
            writer_pid.append(conn.info.backend_pid)
            while not stop.is_set():
                row = env.event("prune.writer")
                t0 = time.perf_counter()
                conn.execute(
                    sql.SQL(
                        "INSERT INTO {} (id, aggregate_type, aggregate_id, event_type, payload)"
                        " VALUES (%s, 'device', 'd', 'prune.writer', '{{}}')"
                    ).format(env.table_ident()),
                    (row["id"],),
                )
                latencies.append(time.perf_counter() - t0)
                time.sleep(0.002)

    def watcher() -> None:
        """What the writer's backend waits on, sampled: a heavyweight lock would show."""
        with env.connect() as conn:
            while not stop.is_set():
                row = conn.execute(
                    "SELECT wait_event_type, wait_event FROM pg_stat_activity WHERE pid = %s",
                    (writer_pid[0],),
                ).fetchone()
                if row and row[0] == "Lock":
                    waits.append(f"{row[0]}:{row[1]}")
                time.sleep(0.001)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    env.wait_for(lambda: writer_pid, 10, "the writer to connect")
    spy = threading.Thread(target=watcher, daemon=True)
    spy.start()
    time.sleep(1.0)
    baseline = list(latencies)
    t0 = time.monotonic()
    out = prune(env, "1s")
    prune_s = time.monotonic() - t0
    during = latencies[len(baseline):]
    stop.set()
    thread.join(10)
    spy.join(10)
    assert "pruned 100000 published rows" in out, out
    assert len(during) > 50, "the writer did not run during the prune"
    worst = max(during)
    p99 = statistics.quantiles(during, n=100)[98]
    print(
        f"\nprune of 100,000 rows took {prune_s:.1f}s; concurrent writer: {len(during)} inserts, "
        f"median {statistics.median(during) * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
        f"max {worst * 1000:.1f} ms (before the prune: max {max(baseline) * 1000:.1f} ms); "
        f"lock waits seen: {len(waits)}"
    )
    # Inserts never wait for prune's row locks; what is left is the shared machine's noise.
    assert not waits, f"the writer waited for a lock: {waits[:5]}"
    assert worst < 0.5, f"an insert took {worst * 1000:.0f} ms during the prune"
