"""The console contract: ``cdc setup``, ``cdc status``, exit codes, SIGTERM drain, no secrets.

- ``setup`` is idempotent (twice, exit 0, the slot kept as it was);
- ``status --json`` reports the documented keys with values that agree with the server;
- a bad slot name exits 2 and creates nothing; a missing database fails clearly;
- SIGTERM on a running relay drains, sends a last status update and exits 0: the slot is
  confirmed past every transaction the broker has, and a restart re-sends at most the one
  transaction that was being read;
- a password in the DSN never shows in ``/metrics``, ``/healthz``, logs or error messages.
"""

from __future__ import annotations

import json
import time
from urllib.parse import urlsplit

import pytest
from harness.session import ADMIN_URL, broker_url, db_url
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

STATUS_KEYS = {
    "slot_name",
    "exists",
    "plugin",
    "active",
    "active_pid",
    "restart_lsn",
    "confirmed_flush_lsn",
    "current_wal_lsn",
    "lag_bytes",
    "retained_bytes",
    "wal_status",
    "safe_wal_size",
    "invalidation_reason",
    "health",
    "health_reason",
    "checkpoint",
    "failover",
}
#: What the status screen added (tests/integration/test_status_screen.py checks their values).
SCREEN_KEYS = {"relay", "workers", "lags", "parked"}
SECRET = "s3cr3t"


def _problems(log: str) -> int:
    """JSON log lines at warning level or above."""
    n = 0
    for line in log.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        n += isinstance(doc, dict) and doc.get("level") in ("warning", "error", "critical")
    return n


def _exists(env) -> dict[str, bool]:
    schema, name = env.table.split(".")
    return {
        "table": bool(
            env.sql(
                "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = %s", (schema, name)
            )
        ),
        "publication": bool(
            env.sql("SELECT 1 FROM pg_publication WHERE pubname = %s", (env.publication,))
        ),
        "slot": env.slot_info() is not None,
    }


def _status(env, **overrides) -> dict:
    res = env.cdc("status", "--json", env=env.relay_env(**overrides))
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert set(doc) == STATUS_KEYS | SCREEN_KEYS, doc
    return doc


def test_setup_is_idempotent(env):
    assert _exists(env) == {"table": False, "publication": False, "slot": False}
    env.setup()
    assert _exists(env) == {"table": True, "publication": True, "slot": True}
    first = env.slot_info()
    assert first["plugin"] == "pgoutput"
    res = env.setup()  # second run: exit 0, nothing recreated
    second = env.slot_info()
    assert second["confirmed_flush_lsn"] == first["confirmed_flush_lsn"]
    assert second["restart_lsn"] == first["restart_lsn"]
    assert env.sql(
        "SELECT count(*) FROM pg_publication_tables WHERE pubname = %s", (env.publication,)
    ) == [(1,)]
    assert "Traceback" not in res.stderr
    # and setup leaves a table with rows alone
    env.insert([env.event("cli.kept")])
    env.setup()
    assert env.sql(sql.SQL("SELECT count(*) FROM {}").format(env.table_ident())) == [(1,)]


def test_status_json_reports_slot_and_lag(env):
    missing = _status(env)
    assert missing["exists"] is False and missing["slot_name"] == env.slot
    assert missing["checkpoint"] is None and missing["health"] in ("not_set_up", "no_checkpoint")

    env.setup()
    doc = _status(env)
    info = env.slot_info()
    assert doc["slot_name"] == env.slot
    assert doc["exists"] is True
    assert doc["plugin"] == "pgoutput"
    assert doc["active"] is False and doc["active_pid"] is None
    assert doc["confirmed_flush_lsn"] == info["confirmed_flush_lsn"]
    assert doc["restart_lsn"] == info["restart_lsn"]
    current = env.parse_lsn(doc["current_wal_lsn"])
    confirmed = env.parse_lsn(doc["confirmed_flush_lsn"])
    assert doc["lag_bytes"] == current - confirmed >= 0
    assert doc["retained_bytes"] == current - env.parse_lsn(doc["restart_lsn"]) >= 0
    # health: the slot is usable and the checkpoint row is the one setup wrote
    assert doc["wal_status"] in ("reserved", "extended"), doc
    assert doc["invalidation_reason"] is None
    assert (doc["health"], doc["health_reason"]) == ("ok", None), doc
    cp = doc["checkpoint"]
    assert cp["state"] == "ready" and cp["lost_reason"] is None, cp
    assert cp["confirmed_lsn"] == doc["confirmed_flush_lsn"], cp
    assert cp["backfill_mode"] == "none" and cp["backfill_done"] is True, cp
    assert cp["proven_at"] and cp["system_identifier"] == env.checkpoint()["system_identifier"]

    text = env.cdc("status")
    assert text.returncode == 0 and env.slot in text.stdout

    relay = env.relay()
    relay.wait_streaming()
    env.insert([env.event("cli.status") for _ in range(20)])
    assert len(env.drain(20, quiet=0.5)) == 20
    doc = _status(env)
    info = env.slot_info()
    assert doc["active"] is True
    assert doc["active_pid"] == info["active_pid"] is not None
    # lag shrinks to (nearly) nothing once the relay has confirmed everything
    env.wait_for(
        lambda: _status(env)["lag_bytes"] < 64 * 1024,
        15,
        lambda: f"lag to drop: {_status(env)}",
    )


@pytest.mark.parametrize("how", ["env", "flag"])
def test_bad_slot_name_is_rejected_and_nothing_is_created(env, how):
    bad = "bad-name;drop"
    if how == "env":
        res = env.cdc("setup", env=env.relay_env(slot_name=bad))
    else:
        res = env.cdc("setup", "--slot-name", bad)
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    assert "SLOT_NAME" in res.stderr.upper()
    assert "Traceback" not in res.stderr
    assert _exists(env) == {"table": False, "publication": False, "slot": False}
    assert not env.sql("SELECT 1 FROM pg_replication_slots WHERE slot_name LIKE 'bad%'")
    relay = env.cdc("relay", env=env.relay_env(slot_name=bad), timeout=30)
    assert relay.returncode == 2, relay.stderr
    # other identifiers are checked the same way
    res = env.cdc("setup", env=env.relay_env(outbox_table="public.x; DROP TABLE y"))
    assert res.returncode == 2, res.stderr
    assert _exists(env) == {"table": False, "publication": False, "slot": False}


@pytest.mark.parametrize("style", ["url", "keyword"])
def test_setup_against_missing_database_fails_clearly(env, style):
    db = f"cdc_test_missing_{env.tag}"
    server = urlsplit(ADMIN_URL)
    if style == "url":
        url = db_url(db, password=SECRET)
    else:
        where = f"host={server.hostname} port={server.port}"
        url = f"{where} dbname={db} user=postgres password={SECRET}"
    res = env.cdc("setup", env=env.relay_env(database_url=url), timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode in (2, 3), (res.returncode, out)
    assert db in out and "does not exist" in out, out
    assert "Traceback" not in out, out
    assert SECRET not in out, out
    assert not env.sql("SELECT 1 FROM pg_database WHERE datname = %s", (db,))


def test_sigterm_drains_and_exits_zero(env):
    env.setup()
    relay = env.relay(metrics=True, status_interval=5)  # the last update must not wait for it
    relay.wait_streaming()
    work = env.workload(writers=1, events_per_writer=6000, max_txn=50, rate_per_writer=2500)
    work.start()
    env.wait_for(lambda: env.sink_count() > 1000, 30, "the relay to publish")
    assert relay.state() == "streaming"
    t0 = time.monotonic()
    code = relay.sigterm(timeout=30)
    drain_s = time.monotonic() - t0
    assert code == 0, relay.tail()
    env.wait_for(lambda: not env.slot_active(), 10, "the slot to be released")
    flushed = env.confirmed_flush_lsn()
    first = env.drain(quiet=0.5)

    relay2 = env.relay()
    relay2.wait_streaming()
    work.join(timeout=60)
    rows = env.fetch_rows()
    rest = env.drain(len(rows) - len({m.message_id for m in first}), quiet=1.5, timeout=60)
    msgs = first + rest
    dups = env.check_exactly_once(msgs, rows, allow_duplicates=True)

    # The last status update covered every transaction the broker had: all events of
    # transactions committed before the flushed LSN were delivered by the first relay...
    lsn_of = {m.message_id: m.commit_lsn for m in msgs}
    before = {i for i, lsn in lsn_of.items() if lsn < flushed}
    first_ids = {m.message_id for m in first}
    assert before <= first_ids, f"{len(before - first_ids)} events confirmed but not delivered"
    # ...and every transaction the first relay delivered completely, but the last one it was
    # reading, lies below it.
    by_txn: dict[str, set[str]] = {}
    for m in first:
        by_txn.setdefault(m.json["txn"], set()).add(m.message_id)
    kept = {t.txn: set(t.kept) for t in work.txns}
    complete = [t for t, ids in by_txn.items() if ids == kept[t]]
    newest = max(lsn_of[next(iter(by_txn[t]))] for t in by_txn)
    for t in complete:
        lsn = lsn_of[next(iter(by_txn[t]))]
        if lsn != newest:
            assert lsn < flushed, (
                f"txn {t} (commit {env.format_lsn(lsn)}) was confirmed by the broker but the "
                f"slot was left at {env.format_lsn(flushed)} after SIGTERM"
            )
    extra = sum(n - 1 for n in dups.values())
    print(
        f"SIGTERM drain took {drain_s:.2f}s; first relay delivered {len(first)}; "
        f"re-sent after restart: {extra}"
    )
    assert extra <= 50, f"a clean stop re-sent {extra} events (at most one transaction expected)"


def test_no_secret_in_metrics_logs_or_errors(env):
    url = db_url(env.dbname, password=SECRET)
    setup = env.cdc("setup", env=env.relay_env(database_url=url, log_level="DEBUG"))
    assert setup.returncode == 0, setup.stderr
    status = env.cdc("status", env=env.relay_env(database_url=url))
    assert status.returncode == 0
    relay = env.relay(metrics=True, database_url=url, log_level="DEBUG")
    relay.wait_streaming()
    env.insert([env.event("secret.test") for _ in range(5)])
    assert len(env.drain(5, quiet=0.5)) == 5
    metrics = relay.metrics()
    health = relay.healthz()
    assert "cdc_events_published_total" in metrics
    assert health["state"] == "streaming" and health["slot"] == env.slot
    assert relay.sigterm() == 0
    # a broker password that is refused must not leak through the error line either (a
    # refusal is not retried: one line, exit 3)
    bad_amqp = env.relay(amqp_url=broker_url(password=SECRET), log_level="DEBUG")
    assert bad_amqp.wait_exit(30) == 3, bad_amqp.tail()
    assert _problems(bad_amqp.log()) == 1, bad_amqp.tail()
    for name, text in {
        "setup": setup.stdout + setup.stderr,
        "status": status.stdout + status.stderr,
        "metrics": metrics,
        "healthz": json.dumps(health),
        "relay log": relay.log(),
        "relay log (bad broker password)": bad_amqp.log(),
    }.items():
        assert SECRET not in text, f"password leaked in {name}"
    assert relay.log().strip(), "the DEBUG relay wrote no log at all"
