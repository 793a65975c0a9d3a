"""Configuration that can never work stops the process at once; outages are waited out.

For the relay (``cdc relay``), a worker (``python -m consumers``) and ``dlq list``:

- a value the settings reject (bad scheme, port 99999, ``?heartbeat=abc``, missing
  ``cafile``, an unparseable DSN, metrics host ``999.1.1.1``, a backoff minimum above its
  maximum) exits 2 before connecting, with one line naming the variable;
- a server that refuses the configuration (broker login or vhost, a missing database or
  role, a TLS certificate that does not verify) exits 3 with one line, no retry, no
  traceback, and no password in the output;
- an outage (connection refused, PostgreSQL starting up: 57P03) keeps the process
  retrying;
- secrets come from ``CDC_<NAME>_FILE`` (a relay streams with both URLs read from files),
  never from a flag.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from harness.common import free_port
from harness.session import AMQP_URL, broker_url, db_url

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SECRET = "s3cr3t-pw"
LEDGER = "tests.workers.ledger"


def problems(output: str) -> list[str]:
    """Lines that report a problem: plain text lines, or JSON log lines at warning+."""
    found = []
    for line in output.splitlines():
        if not line.strip() or line.startswith("====="):
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            found.append(line)
            continue
        if not isinstance(doc, dict) or doc.get("level") in ("warning", "error", "critical"):
            found.append(line)
    return found


def assert_one_line(output: str, *expected: str) -> str:
    """Exactly one problem line, no traceback, no password; it contains ``expected``."""
    assert "Traceback" not in output, output
    assert SECRET not in output, output
    lines = problems(output)
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n" + "\n".join(lines)
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# -- exit 2: rejected by the settings ----------------------------------------------------------

#: (case, field of the relay, field of the workers, value, text the line must contain)
INVALID = [
    ("scheme", "amqp_url", "amqp_url", "http://127.0.0.1:5672/", "CDC_AMQP_URL"),
    ("port", "amqp_url", "amqp_url", "amqp://guest@127.0.0.1:99999/", "1 to 65535"),
    ("no-host", "amqp_url", "amqp_url", "amqp://guest@:5672/", "names no host"),
    ("heartbeat", "amqp_url", "amqp_url", "amqp://127.0.0.1/?heartbeat=abc", "heartbeat"),
    ("cafile", "amqp_url", "amqp_url", "amqps://127.0.0.1/?cafile=/nonexistent.pem", "cafile"),
    ("dsn", "database_url", "database_url", f"localhost password={SECRET}", "CDC_DATABASE_URL"),
    ("pg-port", "database_url", "database_url", "postgresql://h:99999/db", "1 to 65535"),
    ("metrics-host", "metrics_host", "worker_metrics_host", "999.1.1.1", "999.1.1.1"),
]


@pytest.mark.parametrize(("case", "relay_field", "worker_field", "value", "text"), INVALID,
                         ids=[c[0] for c in INVALID])  # fmt: skip
def test_invalid_values_exit_2_with_one_line(
    env, ledger, case, relay_field, worker_field, value, text
):
    relay = env.cdc("relay", env=env.relay_env(**{relay_field: value}), timeout=30)
    assert relay.returncode == 2, (case, relay.stdout, relay.stderr)
    assert_one_line(relay.stdout + relay.stderr, text)
    worker = ledger.consumers_cli(LEDGER, timeout=30, **{worker_field: value})
    assert worker.returncode == 2, (case, worker.stdout, worker.stderr)
    assert_one_line(worker.stdout + worker.stderr, text)
    if worker_field.endswith("_url"):
        dlq = ledger.consumers_cli("dlq", "list", timeout=30, **{worker_field: value})
        assert dlq.returncode == 2, (case, dlq.stdout, dlq.stderr)
        assert_one_line(dlq.stdout + dlq.stderr, text)
    assert not env.slot_info(), "a rejected configuration created the slot"


def test_backoff_minimum_above_maximum_exits_2(env, ledger):
    relay = env.cdc("relay", env=env.relay_env(reconnect_min_delay=5, reconnect_max_delay=1))
    assert relay.returncode == 2
    assert_one_line(relay.stderr, "CDC_RECONNECT_MIN_DELAY (5) is larger than")
    worker = ledger.consumers_cli(
        LEDGER, worker_reconnect_min_delay=5, worker_reconnect_max_delay=1
    )
    assert worker.returncode == 2
    assert_one_line(worker.stderr, "CDC_WORKER_RECONNECT_MIN_DELAY (5) is larger than")


# -- exit 3: a server refuses -------------------------------------------------------------------


def refused_settings(case: str, env, tls_port: int) -> dict[str, str]:
    """Overrides (relay and worker alike) that a server refuses, by case."""
    missing_db = f"cdc_test_missing_{env.tag}"
    return {
        "amqp-password": {"amqp_url": broker_url(password=SECRET)},
        "amqp-vhost": {"amqp_url": broker_url(vhost=f"cdc_test_no_{env.tag}")},
        "amqp-tls": {"amqp_url": f"amqps://guest:guest@127.0.0.1:{tls_port}/"},
        "pg-database": {"database_url": db_url(missing_db, password=SECRET)},
        "pg-role": {
            "database_url": db_url(env.dbname, password=SECRET, user=f"cdc_test_norole_{env.tag}")
        },
    }[case]


EXPECTED = {
    "amqp-password": "ACCESS_REFUSED",
    "amqp-vhost": "vhost",
    "amqp-tls": "TLS certificate",
    "pg-database": "3D000",
    "pg-role": "28000",
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_refused_configuration_exits_3_without_retrying(
    env, ledger, untrusted_tls_server, case
):
    env.setup()
    overrides = refused_settings(case, env, untrusted_tls_server.port)
    t0 = time.monotonic()
    relay = env.relay(**overrides)
    code = relay.wait_exit(60)
    took = time.monotonic() - t0
    assert code == 3, relay.tail()
    line = assert_one_line(relay.log(), EXPECTED[case])
    print(f"relay, {case}: exit 3 after {took:.1f}s: {line}")
    assert not env.slot_active()

    worker = ledger.start(metrics=False, wait=False, **overrides)
    assert worker.wait_exit(60) == 3, worker.tail()
    assert_one_line(worker.log(), EXPECTED[case])


def test_a_broker_user_that_may_not_declare_exits_3(env, ledger, amqp_user_without_configure):
    """ACCESS_REFUSED on a channel (no configure permission) is a refusal too."""
    env.setup()
    relay = env.relay(amqp_url=amqp_user_without_configure)
    assert relay.wait_exit(60) == 3, relay.tail()
    assert_one_line(relay.log(), "403", "set_permissions")
    worker = ledger.start(metrics=False, wait=False, amqp_url=amqp_user_without_configure)
    assert worker.wait_exit(60) == 3, worker.tail()
    assert_one_line(worker.log(), "ACCESS_REFUSED", "set_permissions")


def test_dlq_list_with_a_bad_password_exits_3(ledger):
    res = ledger.consumers_cli(
        "dlq", "list", "--worker", LEDGER, amqp_url=broker_url(password=SECRET)
    )
    assert res.returncode == 3, (res.stdout, res.stderr)
    assert_one_line(res.stdout + res.stderr, "ACCESS_REFUSED")


# -- outages are retried ------------------------------------------------------------------------


def retries(output: str) -> int:
    return sum("retrying" in line or "reconnecting" in line for line in problems(output))


def test_outages_are_retried_not_fatal(env, ledger, pg_starting_up):
    env.setup()
    closed = free_port()
    relays = [
        env.relay(database_url=f"postgresql://postgres@127.0.0.1:{pg_starting_up.port}/x"),
        env.relay(database_url=f"postgresql://postgres@127.0.0.1:{closed}/x"),
        env.relay(amqp_url=f"amqp://guest:guest@127.0.0.1:{closed}/"),
    ]
    worker = ledger.start(
        metrics=False, wait=False, amqp_url=f"amqp://guest:guest@127.0.0.1:{closed}/"
    )
    for proc in [*relays, worker]:
        ledger.wait_for(
            lambda p=proc: retries(p.log()) >= 3,
            30,
            lambda p=proc: f"{p.name} to retry three times\n{p.tail()}",
        )
        assert proc.alive(), proc.tail()
    assert pg_starting_up.connections >= 3
    for proc in [*relays, worker]:
        assert proc.sigterm() == 0, proc.tail()
    assert "Traceback" not in "".join(p.log() for p in [*relays, worker])


# -- secrets: files, never flags ---------------------------------------------------------------


def secret_file(tmp_path: Path, name: str, value: str) -> Path:
    path = tmp_path / name
    path.write_text(value + "\n")  # as `kubectl create secret --from-file` leaves it
    path.chmod(0o600)
    return path


def test_relay_reads_both_urls_from_files(env, tmp_path):
    db_file = secret_file(tmp_path, "database-url", env.db_url)
    amqp_file = secret_file(tmp_path, "amqp-url", AMQP_URL)
    files = {
        "database_url": None,
        "amqp_url": None,
        "database_url_file": db_file,
        "amqp_url_file": amqp_file,
    }
    res = env.cdc("setup", env=env.relay_env(**files))
    assert res.returncode == 0, res.stderr
    relay = env.relay(**files)
    relay.wait_streaming()
    env.insert([env.event("secret.file") for _ in range(5)])
    msgs = env.drain(5, quiet=0.5)
    env.check_exactly_once(msgs, env.fetch_rows())


def test_variable_and_its_file_together_or_a_bad_file_exit_2(env, ledger, tmp_path):
    amqp_file = secret_file(tmp_path, "amqp-url", AMQP_URL)
    both = env.cdc("relay", env=env.relay_env(amqp_url_file=amqp_file))
    assert both.returncode == 2
    assert_one_line(both.stderr, "CDC_AMQP_URL and CDC_AMQP_URL_FILE are both set")
    missing = env.cdc(
        "relay", env=env.relay_env(database_url=None, database_url_file=tmp_path / "nope")
    )
    assert missing.returncode == 2
    assert_one_line(missing.stderr, "CDC_DATABASE_URL_FILE", "No such file")
    empty = secret_file(tmp_path, "empty", "")
    worker = ledger.consumers_cli(LEDGER, database_url=None, database_url_file=empty)
    assert worker.returncode == 2
    assert_one_line(worker.stderr, "CDC_DATABASE_URL_FILE", "is empty")
    unset = env.cdc("relay", env=env.relay_env(database_url=None))
    assert unset.returncode == 2
    assert_one_line(unset.stderr, "CDC_DATABASE_URL: is not set")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--database-url", f"postgresql://postgres:{SECRET}@127.0.0.1:5432/postgres"),
        ("--database-url", f"host=127.0.0.1 dbname=postgres password={SECRET}"),
        ("--amqp-url", f"amqp://guest:{SECRET}@127.0.0.1:5672/"),
    ],
)
def test_a_password_in_a_flag_is_refused(env, ledger, flag, value):
    relay = env.cdc("relay", flag, value, timeout=30)
    assert relay.returncode == 2
    variable = "CDC_" + flag[2:].replace("-", "_").upper()
    assert_one_line(relay.stderr, flag, f"{variable}_FILE")
    worker = ledger.consumers_cli(LEDGER, flag, value, timeout=30)
    assert worker.returncode == 2
    assert_one_line(worker.stderr, flag, f"{variable}_FILE")


def test_url_flags_without_a_password_still_work(env):
    env.setup()
    url = db_url(env.dbname)  # trust authentication: no password in it
    res = env.cdc("status", "--json", "--database-url", url, "--amqp-url", "amqp://127.0.0.1/")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["exists"] is True


def test_notifications_secrets_come_from_files_not_flags(ledger, tmp_path):
    flag = ledger.consumers_cli("notifications", "--webhook-secret", SECRET)
    assert flag.returncode == 2
    assert_one_line(flag.stderr, "--webhook-secret", "CDC_WEBHOOK_SECRET_FILE")
    secret = secret_file(tmp_path, "webhook-secret", SECRET)
    both = ledger.consumers_cli("notifications", webhook_secret="x", webhook_secret_file=secret)
    assert both.returncode == 2
    assert_one_line(both.stderr, "CDC_WEBHOOK_SECRET and CDC_WEBHOOK_SECRET_FILE")
