"""Least privilege end to end: the relay runs as a role with LOGIN REPLICATION and the grants
``cdc setup`` prints, nothing more.

- ``cdc setup --check`` as that role changes nothing and exits 3 listing what is missing
  before ``cdc setup``; 0 once the GRANTs ``cdc setup`` printed have been run as printed;
- a relay as that role streams every event; a grant taken away makes ``--check`` say which,
  and ``cdc setup --relay-role`` (the same statements, applied) restores it;
- the billing worker runs as a role that owns only its schema and may insert into the outbox:
  ``python -m consumers billing --check`` lists the missing grant, then passes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from harness.session import REPO, db_url
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def lines(output: str, prefix: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(prefix)]


def test_relay_runs_as_the_minimal_role(env, relay_role):
    url = db_url(env.dbname).replace("postgres@", f"{relay_role}@")
    as_role = env.relay_env(database_url=url)
    schema, table = env.table.split(".")

    before = env.cdc("setup", "--check", env=as_role)
    assert before.returncode == 3, before.stdout + before.stderr
    missing = lines(before.stdout, "missing: ")
    assert any(f"table {env.table} does not exist" in m for m in missing), before.stdout
    assert any(f"publication {env.publication} does not exist" in m for m in missing)
    assert any(f"slot {env.slot} does not exist" in m for m in missing)
    assert lines(before.stdout, "ok: wal_level is logical")
    assert lines(before.stdout, f"ok: role {relay_role} has LOGIN and REPLICATION")
    assert not env.slot_info() and not env.sql(
        "SELECT 1 FROM pg_publication WHERE pubname = %s", (env.publication,)
    ), "--check created something"

    # the administrator's setup prints the statements (for the example role cdc_relay) ...
    example = env.cdc("setup")
    assert example.returncode == 0, example.stderr
    printed = lines(example.stdout, "GRANT ")
    assert printed == [
        f'GRANT CONNECT ON DATABASE "{env.dbname}" TO "cdc_relay";',
        f'GRANT USAGE ON SCHEMA "{schema}" TO "cdc_relay";',
        f'GRANT SELECT ON TABLE "{schema}"."{table}" TO "cdc_relay";',
        'GRANT USAGE ON SCHEMA "cdc" TO "cdc_relay";',
        'GRANT SELECT, INSERT, UPDATE ON TABLE "cdc"."relay_checkpoint" TO "cdc_relay";',
    ], example.stdout
    # ... which, run as printed for our role, are all the role gets
    for statement in printed:
        env.sql(statement.replace('"cdc_relay"', f'"{relay_role}"'))
    # the role has exactly that: no superuser, no CREATE, no write on the outbox
    (attrs,) = env.sql(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolcanlogin "
        "FROM pg_roles WHERE rolname = %s",
        (relay_role,),
    )
    assert attrs == (False, False, False, True, True)
    privileges = env.sql(
        "SELECT has_table_privilege(%s, %s, 'INSERT'), has_schema_privilege(%s, %s, 'CREATE'),"
        " has_table_privilege(%s, 'cdc.relay_checkpoint', 'DELETE')",
        (relay_role, env.table, relay_role, schema, relay_role),
    )
    assert privileges == [(False, False, False)]

    after = env.cdc("setup", "--check", env=as_role)
    assert after.returncode == 0, after.stdout + after.stderr
    assert not lines(after.stdout, "missing: ") and len(lines(after.stdout, "ok: ")) >= 9

    relay = env.relay(database_url=url)
    relay.wait_streaming()
    env.insert([env.event("least.privilege") for _ in range(20)])
    msgs = env.drain(20, quiet=0.5)
    env.check_exactly_once(msgs, env.fetch_rows())
    (user,) = env.sql(
        "SELECT usename FROM pg_stat_replication WHERE pid = "
        "(SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s)",
        (env.slot,),
    )
    assert user == (relay_role,)
    assert relay.sigterm() == 0, relay.tail()

    revoke = sql.SQL("REVOKE SELECT ON {} FROM {}")
    env.sql(revoke.format(env.table_ident(), sql.Identifier(relay_role)))
    revoked = env.cdc("setup", "--check", env=as_role)
    assert revoked.returncode == 3
    assert lines(revoked.stdout, "missing: ") == [
        f"missing: SELECT on {env.table}: GRANT SELECT ON TABLE {env.table} TO {relay_role}"
    ], revoked.stdout
    # --relay-role prints the same statements for that role and applies them: fixed again
    admin = env.cdc("setup", "--relay-role", relay_role)
    assert admin.returncode == 0, admin.stderr
    assert lines(admin.stdout, "GRANT ") == [
        g.replace('"cdc_relay"', f'"{relay_role}"') for g in printed
    ]
    assert f"applied the grants to {relay_role}" in admin.stdout
    assert env.cdc("setup", "--check", env=as_role).returncode == 0


def test_bad_relay_role_name_exits_2(env):
    res = env.cdc("setup", "--relay-role", "x; DROP TABLE y")
    assert res.returncode == 2
    assert "--relay-role" in res.stderr and "Traceback" not in res.stderr


def test_billing_runs_as_a_role_that_owns_only_its_schema(env, domain, worker_role):
    """The billing worker's role: LOGIN, owner of its schema, INSERT and SELECT on the
    outbox (its billing.balance_low rows). ``--check`` says what is missing, then the worker
    bills and writes its event as that role."""
    env.setup()
    url = db_url(env.dbname).replace("postgres@", f"{worker_role}@")
    settings = {
        "database_url": url,
        "billing_initial_balance": "1",
        "billing_low_balance_threshold": "5",
    }

    def consumers_check() -> subprocess.CompletedProcess[str]:
        full = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        full.update(domain.worker_env(**settings))
        return subprocess.run(
            [sys.executable, "-m", "consumers", "billing", "--check"],
            cwd=REPO, env=full, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    before = consumers_check()
    assert before.returncode == 3, before.stdout + before.stderr
    assert lines(before.stdout, "missing: ") == [
        f"missing: INSERT, SELECT on {env.table}: GRANT INSERT, SELECT ON TABLE {env.table} "
        f"TO {worker_role}"
    ], before.stdout
    assert lines(before.stdout, "ok: the worker's tables, functions and inbox")
    assert not env.sql(
        "SELECT 1 FROM pg_tables WHERE schemaname = %s", (domain.schema,)
    ), "--check left tables behind"

    who = sql.Identifier(worker_role)
    env.sql(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(who))
    env.sql(sql.SQL("GRANT INSERT, SELECT ON {} TO {}").format(env.table_ident(), who))
    after = consumers_check()
    assert after.returncode == 0, after.stdout + after.stderr
    assert not lines(after.stdout, "missing: ")

    worker = domain.start("billing", **settings)
    at = "2026-01-01T00:00:00+00:00"
    domain.publish([
        ("device.started", "00000000-0000-4000-8000-0000000000a1",
         {"deviceId": "d1", "userId": "u1", "startedAt": at}),
        ("device.stopped", "00000000-0000-4000-8000-0000000000a2",
         {"deviceId": "d1", "stoppedAt": "2026-01-01T01:00:00+00:00"}),
    ])  # fmt: skip
    domain.wait_inbox("billing", 2)
    records = env.sql(sql.SQL("SELECT count(*) FROM {}").format(domain.table("usage_records")))
    assert records == [(1,)]
    alerts = env.sql(
        sql.SQL("SELECT aggregate_id FROM {} WHERE event_type = 'billing.balance_low'").format(
            env.table_ident()
        )
    )
    assert alerts == [("u1",)], "the worker's role could not write its outbox event"
    owners = env.sql(
        "SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = %s", (domain.schema,)
    )
    assert owners == [(worker_role,)]
    assert worker.sigterm() == 0, worker.tail()
