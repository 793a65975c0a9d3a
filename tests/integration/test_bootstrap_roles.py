"""The bootstrap SQL of the Kubernetes setup Job (deploy/kubernetes/sql) on the real server,
in the Job's order: roles.sql, ``cdc setup`` as the owner, grants.sql. Then the relay runs as
the REPLICATION-only role and the outbox row a worker-role connection inserts reaches the
broker; each role can do its job and nothing more. Every step runs twice (idempotent)."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from harness.postgres import pg_connect
from harness.relay import Env
from harness.rows import insert_rows
from harness.session import ADMIN_URL, db_url, role_url

SQL = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "sql"
PASSWORDS = {
    "CDC_RELAY_PASSWORD": "relay 'pw' \\ x",
    "CDC_WORKER_PASSWORD": "worker-pw",
    "CDC_MONITOR_PASSWORD": "monitor-pw",
}


def psql(script: str, url: str, **variables: str) -> None:
    argv = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", url, "-f", str(SQL / script)]
    for name, value in variables.items():
        argv[1:1] = ["-v", f"{name}={value}"]
    done = subprocess.run(
        argv, env={**os.environ, **PASSWORDS}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    for secret in PASSWORDS.values():
        assert secret not in done.stdout + done.stderr


@pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed")
def test_roles_setup_grants_then_relay_and_worker_roles_do_their_jobs(
    env: Env, bootstrap_names: dict[str, str]
) -> None:
    db, relay_role, worker_role, monitor_role = (
        bootstrap_names[k] for k in ("db", "relay_role", "worker_role", "monitor_role")
    )
    roles = {"relay_role": relay_role, "worker_role": worker_role}
    for _ in range(2):
        psql("roles.sql", ADMIN_URL, db=db, monitor_role=monitor_role, **roles)
    for _ in range(2):
        res = env.cdc("setup", env=env.relay_env(database_url=db_url(db)))
        assert res.returncode == 0, res.stderr
        psql("grants.sql", db_url(db), db=db, outbox_table=env.table, **roles)

    with pg_connect(ADMIN_URL) as admin:
        attrs = {
            name: rest
            for name, *rest in admin.execute(
                "SELECT rolname, rolreplication, rolsuper, rolcreatedb, rolcreaterole,"
                " rolcanlogin FROM pg_roles WHERE rolname = ANY(%s)",
                ([relay_role, worker_role, monitor_role],),
            ).fetchall()
        }
    assert attrs[relay_role] == [True, False, False, False, True]
    assert attrs[worker_role] == attrs[monitor_role] == [False, False, False, False, True]

    env.declare_sink()
    relay = env.relay(metrics=True, database_url=role_url(relay_role, db))
    relay.wait_streaming(60)
    event = env.event("device.started")
    with pg_connect(role_url(worker_role, db)) as worker:
        with worker.transaction(), worker.cursor() as cur:
            insert_rows(cur, env.table, [event])
        # The workers create their own schema and tables at start.
        schema = f"w_{uuid.uuid4().hex[:8]}"
        worker.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        worker.execute(f"CREATE TABLE IF NOT EXISTS {schema}.t (id int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            worker.execute(f"SELECT pg_create_logical_replication_slot('{schema}', 'pgoutput')")
    [msg] = env.drain(1)
    assert msg.message_id == event["id"]
    # postgres_exporter's role reads the slot facts of deploy/prometheus's queries.
    with pg_connect(role_url(monitor_role, db)) as monitor:
        lag = monitor.execute(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), active"
            " FROM pg_replication_slots WHERE slot_name = %s",
            (env.slot,),
        ).fetchone()
    assert lag is not None and lag[0] >= 0 and lag[1] is True

    with (
        pg_connect(role_url(relay_role, db)) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        insert_rows(conn.cursor(), env.table, [env.event()])
