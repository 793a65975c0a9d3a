"""Billing worker throughput: events/s drained from a backlog, effects checked exactly.

Run by hand (not part of ``make test``)::

    .venv/bin/python bench/billing_throughput.py [--events 20000] [--devices 1000] [--replicas 1 2]
        [--rate EVENTS_PER_S] [--lock-timeout SECONDS] [--linger-max SECONDS]

For each replica count: a fresh database and topology (quorum queues by default), a backlog
of ``device.started``/``device.stopped`` pairs (seed payloads, in event-time order, spread
over the five seed queues so starts and stops are consumed concurrently), then the replicas
of ``python -m consumers billing``. Events/s is measured from the first committed inbox row
to the last (start-up excluded), CPU per event (replicas, and their PostgreSQL backends) over
the same span from /proc, the share of samples (every 0.2 s) in which a replica's backend
waited for a lock, and the 1-minute load average while draining (the machine may be
shared). The usage records and balances are then compared with the pure metering of the
same event set; everything created is removed. One table row per replica count, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import psycopg
from psycopg import sql

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.consumer_throughput import AMQP, PG, _db_url, _delete  # noqa: E402
from consumers.billing.metering import DeviceEvent, Pricing  # noqa: E402
from consumers.billing.worker import DEFAULT_PLAN_RATES, BillingSettings, build  # noqa: E402
from consumers.runtime.runner import names_for  # noqa: E402
from tests.harness.billing_model import meter  # noqa: E402

T0 = dt.datetime(2025, 10, 30, tzinfo=dt.UTC)


def _events(n: int, devices: int, seed: int = 1) -> list[tuple[str, str, dict[str, Any]]]:
    rng = random.Random(seed)
    out: list[tuple[float, str, str, dict[str, Any]]] = []
    per_device = max(1, n // (2 * devices))
    for d in range(devices):
        t = rng.uniform(0, 60)
        for _ in range(per_device):
            start, t = t, t + rng.uniform(1, 120)
            out.append((start, "device.started", str(uuid.uuid4()),
                        {"deviceId": f"dev-{d}", "userId": f"u-{d % 200}",
                         "startedAt": (T0 + dt.timedelta(seconds=start)).isoformat()}))
            out.append((t, "device.stopped", str(uuid.uuid4()),
                        {"deviceId": f"dev-{d}",
                         "stoppedAt": (T0 + dt.timedelta(seconds=t)).isoformat()}))
            t += rng.uniform(1, 60)
    out.sort(key=lambda e: e[0])
    return [(key, mid, payload) for _, key, mid, payload in out]


async def _publish(
    exchange: str, events: list[tuple[str, str, dict[str, Any]]], rate: float | None = None
) -> dict[str, float]:
    """Publish ``events`` (confirmed), all at once or paced at ``rate`` events/s in steps
    of 50 ms; returns each message id's publish time (epoch seconds)."""
    conn = await aio_pika.connect(AMQP)
    ch = await conn.channel()
    ex = await ch.get_exchange(exchange, ensure=False)
    step = max(1, round(rate / 20)) if rate else 1000
    sent: dict[str, float] = {}
    began = time.monotonic()
    for start in range(0, len(events), step):
        if rate:
            await asyncio.sleep(max(0.0, began + start / rate - time.monotonic()))
        now = time.time()
        sent.update((mid, now) for _, mid, _ in events[start : start + step])
        await asyncio.gather(*(
            ex.publish(
                aio_pika.Message(json.dumps(payload).encode(), message_id=mid,
                                 delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                key, mandatory=True,
            )
            for key, mid, payload in events[start : start + step]
        ))
    await conn.close()
    return sent


def _expected(events: list[tuple[str, str, dict[str, Any]]]) -> tuple[int, Decimal]:
    metering = [
        DeviceEvent(mid, p["deviceId"], "start" if key == "device.started" else "stop",
                    dt.datetime.fromisoformat(p.get("startedAt") or p["stoppedAt"]),
                    p.get("userId"))
        for key, mid, p in events
    ]
    records, spent = meter(metering, Pricing(DEFAULT_PLAN_RATES, Decimal("1.20")))
    return len(records), sum(spent.values(), Decimal(0))


def _ticks(pid: int) -> float:
    """CPU seconds (user + system) of a live process, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu(db: psycopg.Connection[Any], procs: list[subprocess.Popen[bytes]]) -> tuple[float, float]:
    """CPU seconds so far of the replicas and of their PostgreSQL backends."""
    backends = db.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name LIKE 'cdc-worker:%'"
    ).fetchall()
    return sum(_ticks(p.pid) for p in procs), sum(_ticks(pid) for (pid,) in backends)


def _run(events: list[tuple[str, str, dict[str, Any]]], replicas: int, queue_type: str,
         batch: int, prefetch: int, lock_timeout: float | None,
         rate: float | None, linger_max: float | None = None) -> dict[str, float]:
    tag = f"{int(time.time()):08x}{secrets.token_hex(2)}"
    ns, dbname = f"cdc_bench.{tag}", f"cdc_bench_{tag}"
    with psycopg.connect(PG, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    env.update(
        CDC_DATABASE_URL=_db_url(dbname), CDC_AMQP_URL=AMQP, CDC_EXCHANGE=f"{ns}.events",
        CDC_WORKER_QUEUE_PREFIX=f"{ns}.", CDC_WORKER_METRICS_PORT="0",
        CDC_WORKER_QUEUE_TYPE=queue_type, CDC_WORKER_BATCH_SIZE=str(batch),
        CDC_WORKER_PREFETCH=str(prefetch), CDC_WORKER_LOG_LEVEL="INFO",
    )
    if lock_timeout is not None:
        env["CDC_BILLING_LOCK_TIMEOUT"] = str(lock_timeout)
    if linger_max is not None:
        env["CDC_WORKER_BATCH_LINGER_MAX"] = str(linger_max)
    # The replicas' log (INFO): each "retrying message" line is a message that failed in its
    # batch (a lock wait given up, in the per-message fallback) and comes back after a delay.
    log_path = Path(tempfile.mkstemp(prefix="billing_bench_", suffix=".log")[1])
    settings = BillingSettings(**{k[4:].lower(): v for k, v in env.items()
                                  if k.startswith("CDC_")})
    names = names_for(settings, build(settings))
    cmd = [sys.executable, "-m", "consumers", "billing"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        db = psycopg.connect(_db_url(dbname), autocommit=True)
        db.execute("CREATE TABLE event_outbox (id uuid PRIMARY KEY, aggregate_type text,"
                   " aggregate_id text, event_type text, payload jsonb)")
        first = subprocess.Popen(cmd, cwd=REPO, env=env)  # declares the topology
        while not db.execute("SELECT to_regclass('usage_records')").fetchone()[0]:  # type: ignore[index]
            time.sleep(0.2)
        time.sleep(1.5)
        first.terminate()
        first.wait(20)
        if not rate:
            sent = asyncio.run(_publish(f"{ns}.events", events))
        profile = os.environ.get("CDC_BENCH_PROFILE")  # cProfile output of the replicas
        run = cmd if not profile else [sys.executable, "-m", "cProfile", "-o", profile, *cmd[1:]]
        with log_path.open("ab") as log:
            procs = [subprocess.Popen(run, cwd=REPO, env=env, stdout=log, stderr=log)
                     for _ in range(replicas)]
        count, cpu0, load = 0, None, []
        if rate:  # paced: the replicas consume as the events come, sampled meanwhile
            time.sleep(3.0)
            sent = {}
            cpu0, counted0 = _cpu(db, procs), 0
            publisher = threading.Thread(
                target=lambda: sent.update(asyncio.run(_publish(f"{ns}.events", events, rate)))
            )
            publisher.start()
        samples = [0, 0]  # backends seen waiting for a lock, backends seen
        while count < len(events):
            time.sleep(0.2)
            count = db.execute("SELECT count(*) FROM consumer_inbox").fetchone()[0]  # type: ignore[index]
            if count and cpu0 is None:  # start-up excluded, as for events/s
                cpu0, counted0 = _cpu(db, procs), count
            load.append(os.getloadavg()[0])
            waiting, backends = db.execute(
                "SELECT count(*) FILTER (WHERE wait_event_type = 'Lock'), count(*)"
                " FROM pg_stat_activity WHERE datname = current_database()"
                " AND application_name LIKE 'cdc-worker:%'"
            ).fetchone()  # type: ignore[misc]
            samples[0] += waiting
            samples[1] += backends
        cpu1 = _cpu(db, procs)
        if rate:
            publisher.join()
        # processed_at is now(): the start of the transaction, so one value per batch
        first_at, last_at, batches = db.execute(
            "SELECT min(processed_at), max(processed_at), count(DISTINCT processed_at)"
            " FROM consumer_inbox"
        ).fetchone()  # type: ignore[misc]
        seconds = (last_at - first_at).total_seconds()
        # Lag = the start of the transaction that stored the event (processed_at) minus its
        # publish: a message that failed in its batch and came back later shows its delay.
        lags = sorted(
            at.timestamp() - sent[mid] for mid, at in db.execute(
                "SELECT message_id, processed_at FROM consumer_inbox").fetchall()
        )
        records, spent = db.execute(
            "SELECT (SELECT count(*) FROM usage_records), (SELECT sum(spent) FROM balances)"
        ).fetchone()  # type: ignore[misc]
        want_records, want_spent = _expected(events)
        assert (records, spent) == (want_records, want_spent), (records, spent, want_records,
                                                                 want_spent)
        db.close()
        assert cpu0 is not None
        done = len(events) - counted0
        return {"events/s": len(events) / seconds, "seconds": seconds, "records": records,
                "worker_us": (cpu1[0] - cpu0[0]) / done * 1e6,
                "pg_us": (cpu1[1] - cpu0[1]) / done * 1e6,
                "load": sum(load) / len(load), "batch": len(events) / batches,
                "lock_wait": 100 * samples[0] / max(1, samples[1]),
                "retried": log_path.read_text(errors="replace").count("retrying message"),
                "lag_p50_ms": 1000 * lags[len(lags) // 2],
                "lag_p99_ms": 1000 * lags[min(len(lags) - 1, int(len(lags) * 0.99))],
                "lag_max_ms": 1000 * lags[-1]}
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        queues = [q for q, _ in names.queues] + [r.name for r in names.retry_queues]
        asyncio.run(_delete([*queues, names.parking_queue],
                            [names.retry_exchange, f"{ns}.events"]))
        with psycopg.connect(PG, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
            )
        log_path.unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--queue-type", default="quorum", choices=["quorum", "classic"])
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--rate", type=float, default=None,
                        help="publish paced at this many events/s while the replicas run "
                             "(default: a backlog published before they start)")
    parser.add_argument("--lock-timeout", type=float, default=None,
                        help="CDC_BILLING_LOCK_TIMEOUT of the replicas (default: the worker's)")
    parser.add_argument("--linger-max", type=float, default=None,
                        help="CDC_WORKER_BATCH_LINGER_MAX of the replicas (default: the worker's)")
    args = parser.parse_args()
    events = _events(args.events, args.devices)
    print(f"{len(events)} events, {args.devices} devices, batch {args.batch}, prefetch "
          f"{args.prefetch}, {args.queue_type} queues, {os.cpu_count()} CPUs", flush=True)
    print(f"{'replicas':>8} {'events/s':>9} {'per replica':>11} {'seconds':>8}"
          f" {'worker us/ev':>12} {'pg us/ev':>9} {'mean batch':>10} {'lock wait':>9}"
          f" {'retried':>7} {'lag p50/p99/max ms':>20} {'load avg':>8}", flush=True)
    rates = {}
    for n in args.replicas:
        r = _run(events, n, args.queue_type, args.batch, args.prefetch, args.lock_timeout,
                 args.rate, args.linger_max)
        lag = f"{r['lag_p50_ms']:.0f}/{r['lag_p99_ms']:.0f}/{r['lag_max_ms']:.0f}"
        rates[n] = r["events/s"]
        print(f"{n:>8} {r['events/s']:>9.0f} {r['events/s'] / n:>11.0f} {r['seconds']:>8.1f}"
              f" {r['worker_us']:>12.0f} {r['pg_us']:>9.0f} {r['batch']:>10.1f}"
              f" {r['lock_wait']:>8.0f}% {r['retried']:>7} {lag:>20} {r['load']:>8.2f}"
              f"  ({r['records']} usage records, exact)", flush=True)
    if len(rates) > 1:
        base = min(rates)
        print("ratio to " + f"{base} replica(s): " + ", ".join(
            f"{n}: {v / rates[base]:.2f}x" for n, v in rates.items() if n != base))


if __name__ == "__main__":
    main()
