"""Each command asks only for what it uses, and ``cdc-worker`` is ``python -m consumers``.

- ``cdc setup``, ``cdc status`` and ``cdc prune`` run without ``CDC_AMQP_URL``; ``cdc relay``,
  ``cdc recover``, ``cdc setup --backfill`` and a worker without one exit 2 with one line
  naming the variable and the command;
- ``dlq list`` runs without ``CDC_DATABASE_URL``;
- the ``cdc-worker`` console script runs a worker as ``python -m consumers`` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness.session import REPO

pytestmark = pytest.mark.integration

LEDGER = "tests.workers.ledger"
CDC_WORKER = Path(sys.executable).parent / "cdc-worker"


def _one_line(res: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for text in expected:
        assert text in lines[0], (text, lines[0])


def test_cdc_commands_need_only_their_urls(env):
    no_broker = env.relay_env(amqp_url=None)
    setup = env.cdc("setup", env=no_broker)
    assert setup.returncode == 0, setup.stderr
    status = env.cdc("status", env=no_broker)
    assert status.returncode == 0 and f"slot      {env.slot}" in status.stdout, status.stderr
    _one_line(env.cdc("relay", env=no_broker), "CDC_AMQP_URL: is not set", "`cdc relay`")
    _one_line(env.cdc("demo", env=no_broker), "CDC_AMQP_URL", "`cdc demo`")
    _one_line(env.cdc("recover", env=no_broker), "CDC_AMQP_URL", "`cdc recover`")
    backfill = env.cdc("setup", "--backfill", "all", env=no_broker)
    _one_line(backfill, "CDC_AMQP_URL", "`cdc setup --backfill`")
    prune = env.cdc("prune", "--older-than", "7d", env=no_broker)
    assert prune.returncode == 0 and "pruned 0 published rows" in prune.stderr, prune.stderr
    no_db = env.relay_env(database_url=None)
    for command in ("setup", "status", "relay"):
        _one_line(env.cdc(command, env=no_db), "CDC_DATABASE_URL: is not set", f"`cdc {command}`")


def test_worker_needs_both_dlq_list_only_the_broker(ledger):
    _one_line(
        ledger.consumers_cli(LEDGER, amqp_url=None), "CDC_AMQP_URL: is not set", "worker"
    )
    _one_line(ledger.consumers_cli(LEDGER, "--check", database_url=None), "CDC_DATABASE_URL")
    ledger.start(metrics=False)  # declares the ledger's queues, its parking queue included
    listed = ledger.consumers_cli("dlq", "list", "--worker", LEDGER, database_url=None)
    assert listed.returncode == 0, listed.stderr
    assert f"{ledger.parking_queue}\t0" in listed.stdout, listed.stdout
    _one_line(ledger.consumers_cli("dlq", "list", amqp_url=None), "CDC_AMQP_URL", "`dlq list`")


def test_cdc_worker_is_python_m_consumers(ledger):
    assert CDC_WORKER.is_file(), f"{CDC_WORKER} missing: pyproject's console script (make install)"
    full = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    full.update(ledger.worker_env())
    # A console script does not put the working directory on sys.path as `-m` does: the
    # test worker module is found through PYTHONPATH, as any custom worker module would be.
    full["PYTHONPATH"] = str(REPO)

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*argv], cwd=REPO, env=full, capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL, check=False,
        )

    script = run(str(CDC_WORKER), "--help")
    module = run(sys.executable, "-m", "consumers", "--help")
    assert script.returncode == module.returncode == 0
    assert script.stdout.replace("cdc-worker", "PROG") == module.stdout.replace(
        "python -m consumers", "PROG"
    )
    check = run(str(CDC_WORKER), LEDGER, "--check")
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok:" in check.stdout + check.stderr
