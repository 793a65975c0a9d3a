"""Failover slots on real primary+standby clusters (harness/pgcluster.py): PostgreSQL 18 and 15.

On 18 `cdc setup` makes a failover slot, the standby's slot sync worker copies it, and
`cdc status --standby-url` says "ready" only once that copy is synced and persistent (a
temporary copy is dropped at promotion). On 15 there are no failover slots and status says
so. And the harness itself: a server left running by a killed test run is stopped and
deleted by the next sweep.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import pgcluster
from harness.common import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def status(env: Any, standby_url: str | None = None) -> dict[str, Any]:
    args = ["status", "--json"] + (["--standby-url", standby_url] if standby_url else [])
    res = env.cdc(*args)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    return dict(doc["failover"])


def only_standby(failover: dict[str, Any]) -> dict[str, Any]:
    assert len(failover["standbys"]) == 1, failover
    return dict(failover["standbys"][0])


def nudge(cluster: Any) -> None:
    """Log a running-xacts record now (not every 15 s) so the relay's slot moves on."""
    cluster.primary.sql("SELECT pg_log_standby_snapshot()")


def test_pg18_status_is_ready_only_once_the_standby_copy_is_persistent(pg_clusters):
    cluster = pg_clusters.start(18)
    env = pg_clusters.env(cluster)
    env.setup()
    standby_url = cluster.standby.url(env.dbname)
    rows = cluster.primary.sql(
        "SELECT failover, synced FROM pg_replication_slots WHERE slot_name = %s", (env.slot,)
    )
    assert rows == [(True, False)]

    # From the primary alone: configured as it should be, but it cannot see the copy.
    seen = only_standby(status(env))
    assert (seen["ready"], seen["checked"], seen["reasons"]) == (None, False, []), seen
    assert seen["physical_slot"] == "cdc_standby" and seen["state"] == "streaming"

    # Before the slot moves, the standby's copy is missing or temporary: not ready, and why.
    early = status(env, standby_url)
    assert early["supported"] and early["slot_failover"] is True
    assert early["synchronized_standby_slots"] == ["cdc_standby"]
    verdict = only_standby(early)
    assert verdict["ready"] is False, verdict
    assert any("no copy" in r or "still temporary" in r for r in verdict["reasons"]), verdict

    relay = env.relay(metrics=True)
    relay.wait_streaming()
    t0 = time.monotonic()
    ready: dict[str, Any] = {}

    def persistent() -> bool:
        nudge(cluster)
        ready.update(only_standby(status(env, standby_url)))
        return bool(ready["ready"])

    env.wait_for(persistent, 120, lambda: f"a ready standby copy (last: {ready})", interval=1)
    print(f"standby copy persistent {time.monotonic() - t0:.1f}s after the relay streamed")
    assert ready["checked"] and ready["reasons"] == []
    copy = cluster.standby.sql(
        "SELECT synced, temporary, failover FROM pg_replication_slots WHERE slot_name = %s",
        (env.slot,),
    )
    assert copy == [(True, False, True)]
    text = env.cdc("status", "--standby-url", standby_url)
    assert text.returncode == 0, text.stderr
    line = f"standby 127.0.0.1:{cluster.standby.port} (streaming): ready"
    assert line in text.stdout, text.stdout


def test_pg15_status_says_there_are_no_failover_slots(pg_clusters):
    cluster = pg_clusters.start(15)
    env = pg_clusters.env(cluster)
    env.setup()
    failover = status(env, cluster.standby.url(env.dbname))
    assert failover["supported"] is False and failover["slot_failover"] is None
    verdict = only_standby(failover)
    assert verdict["ready"] is False and verdict["checked"] is True
    assert "has no failover slots" in verdict["reasons"][0]
    assert "cdc recover" in verdict["reasons"][0]
    # An unreachable standby is an error that names it, without the URL's password.
    gone = f"postgresql://postgres:s3cr3t@127.0.0.1:{free_port()}/postgres"
    res = env.cdc("status", "--standby-url", gone)
    assert res.returncode == 3, (res.returncode, res.stdout, res.stderr)
    assert "cannot connect to standby 127.0.0.1:" in res.stderr, res.stderr
    assert "s3cr3t" not in res.stdout + res.stderr


def test_clusters_of_a_killed_run_are_swept():
    """A test run killed with -9 leaves a running server; the next fixture start removes it."""
    code = (
        "import sys, time\n"
        "from harness import pgcluster\n"
        "c = pgcluster.start_cluster(18, standby=False)\n"
        "print(c.base, c.primary.port, flush=True)\n"
        "time.sleep(600)\n"
    )
    tests_dir = Path(__file__).resolve().parent.parent
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=tests_dir, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        base, port = proc.stdout.readline().split()
        proc.kill()
        proc.wait(10)
        assert Path(base).is_dir()
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres") as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)  # orphaned, still running
        assert base in pgcluster.sweep_stale()
        assert not Path(base).exists()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=3)
    finally:
        if proc.poll() is None:
            proc.kill()
