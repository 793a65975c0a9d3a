"""`cdc status` on live processes: the slot, the three lags, the relay's state and the parked
counts in one screen, ``--json`` with the old keys and the new ones, ``--watch``.

A relay and a ledger worker (on the relay's exchange) run with metrics; one event is
unroutable, so it is parked. Unknown is never shown as 0: before the relay runs and after
it stops, the broker-confirmed lag is unknown, and the consumer lag is unknown while a
worker does not answer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from harness.common import free_port
from harness.session import REPO

pytestmark = pytest.mark.integration

#: The keys `cdc status --json` had before the screen grew: they stay.
SLOT_KEYS = {
    "slot_name", "exists", "plugin", "active", "active_pid", "restart_lsn",
    "confirmed_flush_lsn", "current_wal_lsn", "lag_bytes", "retained_bytes", "wal_status",
    "safe_wal_size", "invalidation_reason", "health", "health_reason", "checkpoint",
}
NEW_KEYS = {"relay", "workers", "lags", "parked"}


def _status(env, *args: str, **overrides) -> subprocess.CompletedProcess[str]:
    res = env.cdc("status", *args, env=env.relay_env(**overrides))
    assert res.returncode == 0, res.stderr
    return res


def _doc(env, *args: str, **overrides) -> dict:
    return json.loads(_status(env, "--json", *args, **overrides).stdout)


def test_status_shows_slot_lags_relay_and_parked(env, ledger):
    env.broker.unbind(env.sink_queue, env.exchange, "#")
    env.broker.bind(env.sink_queue, env.exchange, "ok.#")
    env.setup()
    relay_port, worker_port = free_port(), free_port()
    urls = (
        "--relay-metrics", f"http://127.0.0.1:{relay_port}/metrics",
        "--worker-metrics", f"http://127.0.0.1:{worker_port}/metrics",
    )

    # Nothing runs yet: the slot is known, everything the processes report is unknown.
    doc = _doc(env, *urls)
    assert set(doc) >= SLOT_KEYS | NEW_KEYS, doc
    assert doc["exists"] is True and doc["lags"]["slot_bytes"] == doc["lag_bytes"] >= 0
    assert doc["relay"]["reachable"] is False and doc["relay"]["error"]
    lags = doc["lags"]
    assert lags["broker_confirmed_bytes"] is None and lags["broker_confirmed_seconds"] is None
    assert lags["consumer_seconds"] is None
    text = _status(env, *urls).stdout
    assert "relay     unknown (no answer" in text, text
    assert "broker-confirmed unknown, unknown" in text and "consumers        unknown" in text

    relay = env.relay(metrics_port=relay_port)
    relay.wait_streaming()
    worker = ledger.start(exchange=env.exchange, worker_metrics_port=worker_port)
    env.insert([env.event("ledger.entry", {"key": f"k{i}", "amount": i}) for i in range(10)])
    env.insert([env.event("nobody.listens", {"u": 1})])
    ledger.wait_rows(10)

    def settled() -> dict | None:
        d = _doc(env, *urls)
        ready = (
            d["lags"]["broker_confirmed_bytes"] is not None
            and d["lags"]["consumer_seconds"] is not None
            and d["parked"]["messages"] == 1
        )
        return d if ready else None

    doc = env.wait_for(settled, 30, lambda: f"status to settle: {_doc(env, *urls)}")
    assert doc["relay"]["reachable"] is True and doc["relay"]["state"] == "streaming", doc
    assert doc["relay"]["flushed_lsn"] and doc["relay"]["in_flight"] == 0
    assert doc["active"] is True and doc["health"] == "ok"
    lags = doc["lags"]
    assert lags["broker_confirmed_bytes"] >= 0 and lags["broker_confirmed_seconds"] >= 0
    # the worker measured commit-to-ack of real events: a positive, plausible age
    assert 0 < lags["consumer_seconds"] < 120, lags
    assert lags["consumer_messages"] == 0, lags  # the broker's count of the worker's queue
    (w,) = doc["workers"]
    assert w["reachable"] is True and w["state"] == "consuming" and w["worker"], w
    assert ledger.queue in w["event_age_seconds"] and ledger.queue in w["queues"], w
    parked = doc["parked"]
    assert (parked["queue"], parked["source"]) == (env.parking_queue, "broker"), parked
    assert parked["relay_total"] == {"unroutable": 1, "malformed": 0}, parked
    assert parked["workers"].get(ledger.parking_queue) == 0, parked

    text = _status(env, *urls).stdout
    for line in (
        f"slot      {env.slot} (pgoutput) active",
        "health: ok",
        "relay     streaming, 0 in flight",
        f"worker    {w['worker']}: consuming",
        f"parked    {env.parking_queue}: 1 waiting (broker); relay parked since start: "
        "unroutable 1, malformed 0",
    ):
        assert line in text, f"{line!r} not in\n{text}"
    assert len(text.splitlines()) <= 24, text  # one screen

    # Without CDC_AMQP_URL: status still runs; the relay's own count stands in.
    no_broker = _doc(env, *urls, amqp_url=None)
    assert no_broker["parked"]["messages"] is None and no_broker["parked"]["source"] is None
    assert no_broker["parked"]["relay_total"]["unroutable"] == 1
    assert no_broker["lags"]["consumer_messages"] is None
    assert "CDC_AMQP_URL not set" in _status(env, *urls, amqp_url=None).stdout

    # A worker that stops answering makes the consumer lag unknown, not its last value.
    worker.sigterm()
    gone = _doc(env, *urls)
    assert gone["workers"][0]["reachable"] is False and gone["lags"]["consumer_seconds"] is None
    # The relay stopped: its lags are unknown again, the slot's lag stays known.
    assert relay.sigterm() == 0
    stopped = _doc(env, *urls)
    assert stopped["relay"]["reachable"] is False and stopped["relay"]["state"] is None
    assert stopped["lags"]["broker_confirmed_bytes"] is None
    assert stopped["lags"]["slot_bytes"] is not None


def _start_watch(env, *args: str, **overrides) -> subprocess.Popen[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    full.update(env.relay_env(**overrides))
    return subprocess.Popen(
        [sys.executable, "-m", "cdc", "status", *args],
        cwd=REPO, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        stdin=subprocess.DEVNULL,
    )


def _first_line(proc: subprocess.Popen[str], stream: str) -> str:
    """The first line the watch writes to ``stream``: from then on it is watching (a Ctrl-C
    during the imports of a slow start is Python's traceback, not the watch's exit)."""
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(getattr(proc, stream).readline()))
    reader.start()
    reader.join(60)
    assert got and got[0], f"no first line on {stream} within 60 s"
    return got[0]


def _interrupt(proc: subprocess.Popen[str]) -> tuple[str, str, float]:
    """SIGINT, then the rest of the output and how long the exit took; asserts exit 0."""
    try:
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    return out, err, took


def _watch(env, *args: str, run_for: float, first_on: str = "stdout", **overrides
           ) -> tuple[str, str]:
    """Output of `cdc status ARGS` interrupted ``run_for`` s after its first line."""
    proc = _start_watch(env, *args, **overrides)
    first = _first_line(proc, first_on)
    time.sleep(run_for)
    out, err, _ = _interrupt(proc)
    return (first + out, err) if first_on == "stdout" else (out, first + err)


def test_watch_redraws_until_ctrl_c(env):
    env.setup()
    out, _ = _watch(env, "--watch", "0.3", run_for=4.0)
    # at least two screens in 4 s on a loaded machine (each needs PostgreSQL round trips)
    assert out.count("cdc status  outbox-cdc") >= 2, out
    lines, _ = _watch(env, "--json", "--watch", "0.3", run_for=4.0)
    docs = [json.loads(line) for line in lines.splitlines() if line.strip()]
    assert len(docs) >= 2 and all(set(d) >= SLOT_KEYS | NEW_KEYS for d in docs), lines


def test_ctrl_c_at_any_moment_of_the_watch_exits_0_promptly(env):
    # SIGINT lands at a different moment of the round each time: in the pause, while
    # PostgreSQL answers, while the broker answers (the parking queue does not exist, so
    # the broker closes the channel: the path where a cancellation used to be lost)
    env.setup()
    for delay in (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.45):
        proc = _start_watch(env, "--watch", "0.2")
        assert _first_line(proc, "stdout").startswith("cdc status  outbox-cdc")
        time.sleep(delay)
        _, _, took = _interrupt(proc)
        assert took < 10, (delay, took)  # the watch looks at the signal every 0.1 s


def test_watch_goes_on_through_a_database_outage(env):
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    once = env.cdc("status", env=env.relay_env(database_url=closed))
    assert once.returncode == 3, once.stderr  # without --watch: the usual refusal exit
    out, err = _watch(env, "--watch", "0.3", run_for=6.0, first_on="stderr",
                      database_url=closed)
    assert err.count("PostgreSQL: cannot connect") >= 2, err
    assert out == ""
