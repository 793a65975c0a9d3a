"""Pipeline: the relay, billing and notifications workers together, on the seed's topology.

What a user of the platform sees is the time from a business transaction's commit to its
effect. This scenario runs everything at once, each part through its documented entry
point (``cdc setup``/``cdc relay``, ``python -m consumers billing|notifications``), in the
run's own vhost and database:

- topology: the workers declare it (quorum queues; every ``device.*`` event reaches billing's
  queue for its type and ``notification-service.device``); 200 users with in-app and webhook
  notifications on, their webhooks spread over 10 endpoints (ports) of a local receiver
  (``bench.webhook_receiver``) that answers after ``pipeline_webhook_latency`` (20 ms) and
  verifies every signature;
- the relay runs with ``CDC_PUBLISH_LINGER`` = ``pipeline_publish_linger`` (30 ms): it
  writes the transactions of 30 ms to the broker at once instead of each on its own, which
  costs the broker, and through bigger batches the workers and PostgreSQL, less CPU per
  event on these two shared cores, for that much latency;
- load: a paced writer commits a mix of event types shaped like the seed's (device
  lifecycle first, then app, billing, user, scheduler, media and system events; ``MIX``),
  10 rows per transaction, on 1,000 devices;
- effects: billing's inbox row (committed with the usage record; its ``processed_at`` is
  the start of that transaction), the webhook's arrival at the receiver, and the in-app
  notification's inbox row; commit time = the outbox row's ``created_at`` (the start of its
  short transaction). An event with no effect by the end of the catch-up counts as slower
  than any bound;
- search: rising commit rates, ``pipeline_window`` seconds each after a warm-up; a level
  holds if p99 commit -> effect stays under 1 s for billing and webhooks; the sustained rate
  is the highest level that holds. Then p50/p95/p99 at 50% of it (at least 500/s). With one
  replica of each worker, then two;
- CPU per event of every process (relay, each worker, the receiver, the RabbitMQ node on
  5672, the PostgreSQL backends of the run's database: the relay's walsender and the
  workers' sessions) and their RSS;
- the broker's round-trip ceiling for the same topology in the same run: the reference
  publisher (confirms, window 1000) sends the same mix into the same quorum fan-out while
  trivial consumers ack every copy; the pipeline's sustained rate as a ratio of it. Then the
  same, paced at a quarter of that ceiling (the target): the CPU the broker alone spends per
  event at the rate the pipeline is asked to sustain;
- webhook throughput: the notifications worker alone draining a backlog of device events to
  20 endpoints, all healthy, then with 2 of them (10% of users) never answering (measured
  after the first timeouts, once the breaker has opened those endpoints), in the order
  healthy, dead, healthy, dead, healthy: each dead drain against the healthy ones that
  bracket it (``webhook_drains``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import signal
import statistics
import sys
import time
import uuid
from typing import Any

import aiormq
import orjson
import psycopg
from psycopg import sql

from bench.env import Run
from bench.load import paced_writer
from bench.nodetool import AckConsumer, ceiling_publish
from bench.observe import (
    ProcessSampler,
    broker_pids,
    cpu_seconds,
    fetch_text,
    machine_busy_seconds,
    mib,
    postgres_cpu,
    walsender_pids,
)
from bench.params import Params
from bench.relay_process import RelayProcess, free_port
from bench.scenario_consumers import stop_workers
from bench.stats import latency_summary, paired_ratio

#: Event types and their share (percent) of the load, shaped like the seed's report.
MIX: tuple[tuple[str, int], ...] = (
    ("device.started", 22), ("device.stopped", 22), ("device.updated", 5),
    ("device.created", 3), ("device.deleted", 2), ("device.error", 2),
    ("device.connection_lost", 2), ("app.installed", 10), ("app.uninstalled", 5),
    ("billing.payment_success", 8), ("billing.payment_failed", 2), ("user.updated", 4),
    ("user.created", 2), ("user.password_changed", 1), ("scheduler.task_completed", 6),
    ("media.uploaded", 2), ("system.maintenance", 2),
)
BILLING_TYPES = frozenset(
    {"device.started", "device.stopped", "device.updated", "device.deleted", "user.updated"}
)
USERS = 200
DEVICES = 1000
ENDPOINTS = 10
BOUND_S = 1.0  # p99 commit -> effect that a sustained level must hold
ROWS_PER_COMMIT = 10  # events per transaction of the paced writer
TARGET_RATIO = 0.25  # the pipeline's sustained rate asked for, as a share of the round trip
WEBHOOK_TIMEOUT = 5.0  # the notifications worker's default CDC_WEBHOOK_TIMEOUT
SECRET = "whsec-bench-" + secrets.token_hex(8)
BILLING_QUEUES = tuple(
    f"billing-service.{q}"
    for q in ("device-started", "device-stopped", "device-updated", "device-deleted",
              "user-updated")
)
NOTIFICATION_QUEUES = tuple(
    f"notification-service.{f}"
    for f in ("user", "device", "app", "billing", "scheduler", "media", "system")
)


def mix_keys() -> list[str]:
    """100 routing keys in the proportions of ``MIX``, interleaved."""
    keys = [key for key, weight in MIX for _ in range(weight)]
    assert len(keys) == 100
    return keys[::7] + [k for i, k in enumerate(keys) if i % 7]


def mix_insert(table: str) -> sql.Composed:
    """One INSERT of ``%s`` rows drawn from ``MIX`` on random devices (owner = device mod
    users); system events carry no user (in-app only, no webhook)."""
    keys = sql.SQL(", ").join(sql.Literal(k) for k in mix_keys())
    return sql.SQL(
        "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload)"
        " SELECT split_part(k, '.', 1), 'dev-' || d, k, CASE WHEN k LIKE 'system.%%'"
        " THEN jsonb_build_object('title', 'Upgrade', 'message', 'tonight',"
        " 'pad', repeat('x', 300))"
        " ELSE jsonb_build_object('deviceId', 'dev-' || d, 'userId', 'u-' || (d %% {}),"
        " 'appName', 'Maps', 'amount', 10, 'currency', 'USD', 'pad', repeat('x', 300)) END"
        " FROM (SELECT (ARRAY[{}])[1 + floor(random() * 100)::int] AS k,"
        " floor(random() * {})::int AS d FROM generate_series(1, %s)) s"
    ).format(sql.Identifier(table), sql.Literal(USERS), keys, sql.Literal(DEVICES))


class Receiver:
    """``python -m bench.webhook_receiver`` on ``ports`` (and ``dead`` ports)."""

    def __init__(self, ports: list[int], dead: list[int], latency: float, log: Any) -> None:
        self.ports, self.dead, self.latency, self.log = ports, dead, latency, log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.webhook_receiver",
            "--ports", ",".join(map(str, self.ports)),
            "--dead-ports", ",".join(map(str, self.dead)), "--latency", str(self.latency),
            env={**os.environ, "BENCH_WEBHOOK_SECRET": SECRET},
            stdout=asyncio.subprocess.PIPE, stderr=self.log, start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=30)
        if line.strip() != b"ready":
            await self.stop()
            raise RuntimeError("the webhook receiver did not start")

    async def records(self) -> tuple[dict[str, float], int]:
        """messageId -> first arrival (epoch s), and how many POSTs it has accepted."""
        text = await fetch_text(f"http://127.0.0.1:{self.ports[0]}/_records", timeout=30)
        out: dict[str, float] = {}
        total = 0
        for line in text.splitlines():
            at, mid, _ = line.split("\t")
            total += 1
            out.setdefault(mid, float(at))
        return out, total

    async def stop(self) -> None:
        await stop_workers([self.proc] if self.proc else [])
        self.proc = None


class Workers:
    """Replicas of ``python -m consumers <worker>`` with one environment."""

    def __init__(self, worker: str, env: dict[str, str], log: Any) -> None:
        self.worker, self.env, self.log = worker, env, log
        self.extra: dict[str, str] = {}  # on top of ``env`` (bench.pipeline_at's settings)
        self.procs: list[asyncio.subprocess.Process] = []

    async def add(self) -> None:
        # Started in the interpreter's bin directory: ``-m`` puts the working directory first
        # on sys.path, which would win over a PYTHONPATH naming another tree's code
        # (bench/webhooks_ab.py compares trees that way).
        self.procs.append(await asyncio.create_subprocess_exec(
            sys.executable, "-m", "consumers", self.worker, env={**self.env, **self.extra},
            stdout=self.log, stderr=self.log, start_new_session=True,
            cwd=os.path.dirname(sys.executable),
        ))

    def check(self) -> None:
        for proc in self.procs:
            if proc.returncode is not None:
                raise RuntimeError(f"a {self.worker} replica exited {proc.returncode}")

    async def stop(self) -> None:
        await stop_workers(self.procs)
        self.procs = []


async def _queues_exist(run: Run, queues: list[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with run.channel() as channel:
                for queue in queues:
                    await channel.queue_declare(queue, passive=True)
            return
        except aiormq.exceptions.ChannelNotFoundEntity:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers declared no {queues[0]} in {timeout}s") from None
            await asyncio.sleep(0.5)


async def _wait_empty(run: Run, queues: list[str], timeout: float, every: float) -> None:
    """Until every queue of ``queues`` is empty, or ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await _depths(run, queues) == 0:
            return
        await asyncio.sleep(every)


async def _depths(run: Run, queues: list[str]) -> int:
    async with run.channel() as channel:
        total = 0
        for queue in queues:
            total += int((await channel.queue_declare(queue, passive=True)).message_count or 0)
        return total


class Meter:
    """CPU seconds and RSS of the pipeline's processes over a window."""

    def __init__(
        self, groups: dict[str, list[int]], db_name: str, walsenders: list[int]
    ) -> None:
        self.groups = groups
        self.db_name = db_name
        self.walsenders = walsenders
        self.samplers = {
            pid: ProcessSampler(pid, interval=1.0) for pids in groups.values() for pid in pids
        }
        self.start_cpu: dict[str, float] = {}

    def cpu_now(self) -> dict[str, float]:
        """CPU seconds so far of each group, and of the run database's PostgreSQL backends."""
        out = {name: sum(cpu_seconds(pid) for pid in pids) for name, pids in self.groups.items()}
        out["postgres"] = postgres_cpu(self.db_name, self.walsenders)
        return out

    def begin(self) -> None:
        for sampler in self.samplers.values():
            sampler.start()
        self.start_cpu = self.cpu_now()

    async def end(self, events: int) -> dict[str, Any]:
        cpu = self.cpu_now()
        for sampler in self.samplers.values():
            await sampler.stop()
        # A process that ended in the window (RabbitMQ restarted by someone) reads lower:
        # no figure rather than a wrong one.
        us = {
            name: round((cpu[name] - self.start_cpu.get(name, 0.0)) / events * 1e6, 1)
            if events and cpu[name] >= self.start_cpu.get(name, 0.0) else None
            for name in cpu
        }
        rss = {
            name: [mib([v for _, v in self.samplers[pid].rss]) for pid in pids]
            for name, pids in self.groups.items()
        }
        pipeline = [k for k in us if k not in ("receiver",)]
        return {
            "cpu_us_per_event": us,
            "cpu_us_per_event_total": round(sum(us[k] or 0 for k in pipeline), 1),
            "rss_mib": rss,
        }


class Pipeline:
    """The relay, the workers and the receiver of one run, and their measurements."""

    def __init__(self, run: Run, p: Params) -> None:
        self.run, self.p = run, p
        self.names = run.names("pipeline")
        self.log = (run.results_dir / "pipeline-workers.log").open("ab")
        self.ports = [free_port() for _ in range(ENDPOINTS)]
        self.receiver = Receiver(self.ports, [], p.pipeline_webhook_latency, self.log)
        self.relay = RelayProcess(
            run, self.names, "pipeline", CDC_PUBLISH_LINGER=str(p.pipeline_publish_linger)
        )
        base = {
            **os.environ,
            "CDC_DATABASE_URL": run.db_url,
            "CDC_AMQP_URL": run.amqp_url,
            "CDC_EXCHANGE": self.names.exchange,
            "CDC_OUTBOX_TABLE": f"public.{self.names.table}",
            "CDC_WORKER_METRICS_PORT": "0",
            "CDC_WORKER_LOG_LEVEL": "WARNING",
        }
        self.billing = Workers("billing", base, self.log)
        self.notifications = Workers("notifications", {
            **base,
            "CDC_WEBHOOK_SECRET": SECRET,
            "CDC_WEBHOOK_ALLOW_HTTP": "true",
            "CDC_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.1/32",
        }, self.log)

    async def open(self) -> None:
        await self.run.declare_sink(self.names, bind="bench.unused")
        await self.relay.setup()
        await self.receiver.start()
        await self.billing.add()
        await self.notifications.add()
        await _queues_exist(self.run, list(BILLING_QUEUES + NOTIFICATION_QUEUES))
        async with await psycopg.AsyncConnection.connect(self.run.db_url, autocommit=True) as db:
            for _ in range(60):  # the worker creates its tables right after the queues
                try:
                    await db.execute(
                        "INSERT INTO notification_preferences (user_id, in_app, webhook,"
                        " webhook_url) SELECT 'u-' || i, true, true, 'http://127.0.0.1:'"
                        " || (%s::int[])[1 + i %% %s] || '/hooks/u-' || i"
                        " FROM generate_series(0, %s) i ON CONFLICT DO NOTHING",
                        (self.ports, ENDPOINTS, USERS - 1),
                    )
                    break
                except psycopg.errors.UndefinedTable:
                    await asyncio.sleep(0.5)
        await self.relay.start()

    async def close(self) -> None:
        await self.billing.stop()
        await self.notifications.stop()
        await self.relay.stop()
        await self.receiver.stop()
        with contextlib.suppress(Exception):
            await self.run.delete_sink(self.names)
        self.log.close()

    async def restart(self, extra: dict[str, str]) -> None:
        """The relay and one replica of each worker again, with ``extra`` on top of their
        environment (what ``bench.pipeline_at`` alternates; each program reads the settings
        it has); what the old workers held unacked is redelivered."""
        for workers in (self.billing, self.notifications):
            await workers.stop()
        await self.relay.stop()
        self.relay.extra = dict(extra)
        await self.relay.start()
        for workers in (self.billing, self.notifications):
            workers.extra = dict(extra)
            await workers.add()

    async def meter(self) -> Meter:
        beam = broker_pids()
        walsenders = await walsender_pids(self.run.admin_url, self.run.db_name)
        assert self.relay.proc is not None and self.receiver.proc is not None
        return Meter({
            "relay": [self.relay.pid],
            "billing": [p.pid for p in self.billing.procs],
            "notifications": [p.pid for p in self.notifications.procs],
            "rabbitmq": beam,
            "receiver": [self.receiver.proc.pid],
        }, self.run.db_name, walsenders)

    async def level(self, rate: float) -> dict[str, Any]:
        """Offer ``rate`` events/s for warm-up + window; latencies of the window's events."""
        p = self.p
        writer = asyncio.create_task(paced_writer(
            self.run.db_url, self.names.table, rate=rate,
            duration=p.pipeline_warmup + p.pipeline_window, rows_per_txn=ROWS_PER_COMMIT,
            payload_size=0,
            insert=mix_insert(self.names.table), connections=4,
        ))
        meter: Meter | None = None
        try:
            await asyncio.sleep(p.pipeline_warmup)
            start = time.time()
            meter = await self.meter()
            meter.begin()
            offered = await writer
            end = time.time()
        finally:
            if not writer.done():
                writer.cancel()
        async with await psycopg.AsyncConnection.connect(self.run.db_url, autocommit=True) as db:
            cur = await db.execute(
                sql.SQL(
                    "SELECT id::text, extract(epoch FROM created_at)::float8, event_type,"
                    " payload ? 'userId' FROM {} WHERE created_at >= to_timestamp(%s)"
                    " AND created_at < to_timestamp(%s)"
                ).format(sql.Identifier(self.names.table)),
                (start, end),
            )
            events = await cur.fetchall()
            figures = await meter.end(len(events))
            # Catch-up: wait (bounded) for the window's effects, so the slow ones count.
            ids = [e[0] for e in events]
            deadline = time.monotonic() + p.pipeline_catch_up
            effects: dict[str, dict[str, float]] = {}
            while True:
                for consumer in ("billing", "notifications"):
                    cur = await db.execute(
                        "SELECT message_id, extract(epoch FROM processed_at)::float8"
                        " FROM consumer_inbox WHERE consumer = %s AND message_id = ANY(%s)",
                        (consumer, ids),
                    )
                    effects[consumer] = dict(await cur.fetchall())
                webhooks, posts = await self.receiver.records()
                wanted_billing = sum(1 for e in events if e[2] in BILLING_TYPES)
                wanted_hooks = sum(1 for e in events if e[3])
                done = (
                    len(effects["billing"]) >= wanted_billing
                    and len(effects["notifications"]) >= len(events)
                    and sum(1 for e in events if e[3] and e[0] in webhooks) >= wanted_hooks
                )
                if done or time.monotonic() > deadline:
                    break
                await asyncio.sleep(1.0)
        self.billing.check()
        self.notifications.check()

        def lags(effect: dict[str, float], wanted: list[tuple[Any, ...]]) -> dict[str, Any]:
            lat = [effect[e[0]] - e[1] if e[0] in effect else float("inf") for e in wanted]
            finite = [x for x in lat if x != float("inf")]
            summary: dict[str, Any] = dict(latency_summary(finite))
            summary["missing"] = len(lat) - len(finite)
            # Nearest rank, so a missing effect (infinite) can be the p99 without arithmetic.
            p99 = sorted(lat)[max(0, math.ceil(0.99 * len(lat)) - 1)] if lat else None
            summary["p99_with_missing_ms"] = (
                None if p99 is None else (round(p99 * 1000, 1) if p99 != float("inf") else "inf")
            )
            summary["holds"] = p99 is not None and p99 < BOUND_S
            return summary

        billing = lags(effects["billing"], [e for e in events if e[2] in BILLING_TYPES])
        hooks = lags(webhooks, [e for e in events if e[3]])
        in_app = lags(effects["notifications"], list(events))
        return {
            "target_rate": round(rate, 1),
            "offered_rate": round(offered.rate, 1),
            "events_in_window": len(events),
            "window_s": round(end - start, 1),
            "billing": billing,
            "webhook": hooks,
            "in_app": in_app,
            "holds": bool(billing["holds"] and hooks["holds"]),
            "webhook_posts_total": posts,
            "load_average": os.getloadavg(),
            **figures,
        }

    async def search(self, start_index: int = 0) -> dict[str, Any]:
        """Rising levels until one does not hold; then the latency level at 50%."""
        levels = []
        sustained = None
        for rate in self.p.pipeline_levels[start_index:]:
            print(f"[bench] pipeline: {rate:.0f} events/s ...", flush=True)
            result = await self.level(rate)
            levels.append(result)
            print(f"[bench] pipeline: {rate:.0f}/s holds={result['holds']} billing p99="
                  f"{result['billing']['p99_with_missing_ms']} webhook p99="
                  f"{result['webhook']['p99_with_missing_ms']} cpu="
                  f"{result['cpu_us_per_event']}", flush=True)
            if not result["holds"]:
                break
            sustained = rate
            await self.settle()
        await self.settle()
        half = None
        if sustained:
            rate = max(sustained * 0.5, 500.0)
            print(f"[bench] pipeline: latency at {rate:.0f} events/s ...", flush=True)
            half = await self.level(rate)
            await self.settle()
        return {"levels": levels, "sustained_rate": sustained, "at_half": half}

    async def settle(self, timeout: float = 60.0) -> None:
        """Let every queue empty before the next level (bounded)."""
        await _wait_empty(self.run, list(BILLING_QUEUES + NOTIFICATION_QUEUES), timeout, 0.5)


async def broker_ceiling(
    run: Run, p: Params, exchange: str, rate: float | None = None
) -> dict[str, Any]:
    """The same mix into the same (quorum) queues, acked by trivial consumers; the workers
    are stopped so only the instruments touch the queues. ``rate``: paced at that many
    events per second for ``pipeline_window`` seconds (what the broker alone costs at that
    rate) instead of flat out."""
    queues = list(BILLING_QUEUES + NOTIFICATION_QUEUES)
    # Paced, the consumers ack as the workers do (one multiple ack per batch of 100 or
    # 10 ms): an ack per copy would cost the broker more than the pipeline's own consumers.
    consumer = AckConsumer(run.amqp_url, queues, batch=100 if rate else 1)
    await consumer.start()
    beam = broker_pids()
    count = round(rate * p.pipeline_window) if rate else p.pipeline_ceiling_events
    cpu_before, busy_before = sum(cpu_seconds(pid) for pid in beam), machine_busy_seconds()
    try:
        started = time.monotonic()
        result = await ceiling_publish(
            run.amqp_url, exchange, "device.started", count=count,
            size=p.payload_size, window=p.window, routing_keys=mix_keys(), rate=rate,
            burst=ROWS_PER_COMMIT,
        )
        await _wait_empty(run, queues, 120, 0.05)
        seconds = time.monotonic() - started
        broker_cpu = sum(cpu_seconds(pid) for pid in beam) - cpu_before
        busy = machine_busy_seconds() - busy_before
    finally:
        acked = await consumer.stop()
    events = int(result["published"])
    paced = f", paced at {rate:.0f}/s in groups of {ROWS_PER_COMMIT}" if rate else ""
    return {
        "events": events,
        "copies_acked": acked,
        "rate": round(events / seconds, 1),
        "publisher_rate": round(float(result["rate"]), 1),
        "paced_at": rate,
        "broker_cpu_us_per_event": round(broker_cpu / events * 1e6, 1) if events else None,
        "broker_cores": round(broker_cpu / seconds, 2),
        "machine_busy_cores": round(busy / seconds, 2),
        "method": "reference publisher (confirms, window "
                  f"{p.window}{paced}) with the pipeline's mix of routing keys into the "
                  "workers' quorum queues; one Node "
                  f"consumer per queue acks {'batches of copies' if rate else 'every copy'}; "
                  "clock from the first publish until every queue is empty",
    }


async def _start_receiver(
    endpoints: int, dead: int, latency: float, log: Any
) -> tuple[list[int], Receiver]:
    """A receiver on ``endpoints`` free ports, the first ``dead`` of them dead; new ports
    if another process took one between the pick and the bind."""
    for attempt in range(3):
        ports = [free_port() for _ in range(endpoints)]
        receiver = Receiver(ports[dead:], ports[:dead], latency, log)
        try:
            await receiver.start()
        except RuntimeError:
            if attempt == 2:
                raise
            continue
        return ports, receiver
    raise AssertionError("unreachable")


async def webhook_throughput(
    run: Run, p: Params, dead_share: float, drain: int = 0
) -> dict[str, Any]:
    """The notifications worker alone draining ``pipeline_webhook_events`` device events to
    20 endpoints, ``dead_share`` of the users' endpoints never answering; ``drain`` numbers
    the drains of a run (each has its own schema, exchange and queues).

    CPU is per delivered webhook: the worker's, the RabbitMQ node's and the PostgreSQL
    backends' of the run's database, over the whole drain."""
    endpoints = 20
    dead_count = round(endpoints * dead_share)
    label = ("webhooks_dead" if dead_count else "webhooks") + (f"{drain}" if drain else "")
    names = run.names(label)
    schema = label
    log = (run.results_dir / f"{label}.log").open("ab")
    workers = Workers("notifications", {
        **os.environ,
        "CDC_DATABASE_URL": run.db_url,
        "CDC_AMQP_URL": run.amqp_url,
        "CDC_EXCHANGE": names.exchange,
        "CDC_WORKER_QUEUE_PREFIX": f"{label}.",
        "CDC_WORKER_INBOX_TABLE": f"{schema}.inbox",
        "CDC_NOTIFICATIONS_SCHEMA": schema,
        "CDC_WORKER_METRICS_PORT": "0",
        "CDC_WORKER_LOG_LEVEL": "ERROR",
        "CDC_WEBHOOK_SECRET": SECRET,
        "CDC_WEBHOOK_ALLOW_HTTP": "true",
        "CDC_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.1/32",
    }, log)
    queue = f"{label}.notification-service.device"
    await run.declare_sink(names, bind="bench.unused")
    async with await psycopg.AsyncConnection.connect(run.db_url, autocommit=True) as db:
        await db.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
    ports, receiver = await _start_receiver(endpoints, dead_count, p.pipeline_webhook_latency, log)
    try:
        await workers.add()
        await _queues_exist(run, [queue])
        async with await psycopg.AsyncConnection.connect(run.db_url, autocommit=True) as db:
            for _ in range(60):
                try:
                    await db.execute(
                        sql.SQL(
                            "INSERT INTO {}.notification_preferences (user_id, in_app, webhook,"
                            " webhook_url) SELECT 'u-' || i, true, true, 'http://127.0.0.1:'"
                            " || (%s::int[])[1 + i %% %s] || '/hooks/u-' || i"
                            " FROM generate_series(0, %s) i ON CONFLICT DO NOTHING"
                        ).format(sql.Identifier(schema)),
                        (ports, endpoints, USERS - 1),
                    )
                    break
                except psycopg.errors.UndefinedTable:
                    await asyncio.sleep(0.5)
        warm = 0
        if dead_count:
            # First contact with a dead endpoint costs CDC_WEBHOOK_TIMEOUT per message until
            # its breaker opens: measured separately, then the steady drain.
            warm = 2000
            started = time.monotonic()
            await _publish_devices(run, names.exchange, warm)
            await _wait_empty(run, [queue], 120, 0.2)
            # The queue empties as soon as the prefetch takes everything; the dead endpoints'
            # first requests time out only after CDC_WEBHOOK_TIMEOUT (5 s): then the
            # breakers are open and the steady state begins.
            await asyncio.sleep(WEBHOOK_TIMEOUT + 1.0)
            warm_s = time.monotonic() - started
        # The backlog goes in while the worker is paused (SIGSTOP: a restart would forget
        # the breakers' state, well inside their 30 s), so the rate is the worker's, not the
        # publisher's; it is taken between the first and the last healthy arrival, and CPU
        # over the drain alone.
        events = p.pipeline_webhook_events
        _, before = await receiver.records()
        pid = workers.procs[0].pid
        assert receiver.proc is not None
        beam = broker_pids()
        os.kill(pid, signal.SIGSTOP)
        try:
            publishing = time.monotonic()
            ids = await _publish_devices(run, names.exchange, events)
            published = time.monotonic() - publishing
            cpu0, rcpu0 = cpu_seconds(pid), cpu_seconds(receiver.proc.pid)
            bcpu0, pcpu0 = sum(map(cpu_seconds, beam)), postgres_cpu(run.db_name, [])
            started = time.monotonic()
        finally:
            os.kill(pid, signal.SIGCONT)
        healthy = {mid for mid, user in ids if int(user[2:]) % endpoints >= dead_count}
        deadline = started + p.max_drain_seconds
        got = 0
        while time.monotonic() < deadline:
            records, _ = await receiver.records()
            got = sum(1 for mid in healthy if mid in records)
            if got >= len(healthy):
                break
            await asyncio.sleep(0.5)
        seconds = time.monotonic() - started
        cpu = cpu_seconds(pid) - cpu0
        receiver_cpu = cpu_seconds(receiver.proc.pid) - rcpu0
        broker_cpu = sum(map(cpu_seconds, beam)) - bcpu0
        pg_cpu = postgres_cpu(run.db_name, []) - pcpu0
        records, total = await receiver.records()
        arrivals = sorted(records[mid] for mid in healthy if mid in records)
        span = arrivals[-1] - arrivals[0] if len(arrivals) > 1 else None
        return {
            "endpoints": endpoints,
            "dead_endpoints": dead_count,
            "events": events,
            "deliverable": len(healthy),
            "delivered": got,
            "posts": total - before,
            "seconds": round(seconds, 2),
            # The backlog went in before the drain, with the worker paused.
            "publish_seconds": round(published, 2),
            "webhooks_per_s": round(len(arrivals) / span, 1) if span else None,
            # Seconds from the first healthy arrival to the 99th percentile's and to the
            # last: a few late ones (retried) stretch the span the rate is taken over.
            "arrivals_p99_s": round(arrivals[int(0.99 * (len(arrivals) - 1))] - arrivals[0], 2)
            if span else None,
            "arrivals_span_s": round(span, 2) if span else None,
            "worker_cpu_us_per_webhook": round(cpu / max(got, 1) * 1e6, 1),
            "receiver_cpu_us_per_webhook": round(receiver_cpu / max(got, 1) * 1e6, 1),
            "rabbitmq_cpu_us_per_webhook": round(broker_cpu / max(got, 1) * 1e6, 1),
            "postgres_cpu_us_per_webhook": round(pg_cpu / max(got, 1) * 1e6, 1),
            "warm_up_events": warm,
            "warm_up_seconds": round(warm_s, 1) if dead_count else None,
            "load_average": os.getloadavg(),
        }
    finally:
        await workers.stop()
        await receiver.stop()
        with contextlib.suppress(Exception):
            await run.delete_sink(names)
        log.close()


async def webhook_drains(run: Run, p: Params) -> dict[str, Any]:
    """Webhook drains with all endpoints healthy and with 10% dead, as H D H D .. H
    (``pipeline_dead_drains`` dead ones). The host's speed drifts by more than 10% within
    minutes, so each dead drain is compared with the mean of the healthy drains right
    before and after it (paired ratio, as the relay's drains are with the broker's
    ceilings); the ratio reported is the median of those, and the drains shown are the
    healthy and the dead one with the median rate (the lower of two)."""
    healthy = [await webhook_throughput(run, p, 0.0)]
    print(f"[bench] pipeline: {healthy[-1]}", flush=True)
    dead: list[dict[str, Any]] = []
    ratios: list[float] = []
    for n in range(1, p.pipeline_dead_drains + 1):
        dead.append(await webhook_throughput(run, p, 0.10, n))
        print(f"[bench] pipeline: {dead[-1]}", flush=True)
        healthy.append(await webhook_throughput(run, p, 0.0, n))
        print(f"[bench] pipeline: {healthy[-1]}", flush=True)
        paired = paired_ratio(
            dead[-1]["webhooks_per_s"], healthy[-2]["webhooks_per_s"],
            healthy[-1]["webhooks_per_s"],
        )
        if paired is not None:
            ratios.append(paired)

    def median_drain(drains: list[dict[str, Any]]) -> dict[str, Any]:
        done = sorted((d for d in drains if d["webhooks_per_s"]),
                      key=lambda d: d["webhooks_per_s"])
        return done[(len(done) - 1) // 2] if done else drains[0]

    return {
        "webhooks_healthy": median_drain(healthy),
        "webhooks_10pct_dead": median_drain(dead),
        "webhooks_dead_ratio": round(statistics.median(ratios), 3) if ratios else None,
        "webhook_drains": {
            "healthy_per_s": [d["webhooks_per_s"] for d in healthy],
            "dead_per_s": [d["webhooks_per_s"] for d in dead],
            "dead_ratios": ratios,
            "method": "H D H D .. H: each dead drain's rate over the mean of the healthy "
                      "drains right before and after it; median of those paired ratios",
        },
    }


async def _publish_devices(run: Run, exchange: str, n: int) -> list[tuple[str, str]]:
    """``n`` device.* events (confirmed) straight to ``exchange``; their (id, user)."""
    out = []
    conn = await aiormq.connect(run.amqp_url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        for start in range(0, n, 500):
            batch = []
            for i in range(start, min(n, start + 500)):
                mid, user = str(uuid.uuid4()), f"u-{i % USERS}"
                key = ("device.started", "device.stopped", "device.error")[i % 3]
                body = orjson.dumps({"deviceId": f"dev-{i % DEVICES}", "userId": user})
                out.append((mid, user))
                batch.append(channel.basic_publish(
                    body, exchange=exchange, routing_key=key, mandatory=True,
                    properties=aiormq.spec.Basic.Properties(
                        message_id=mid, content_type="application/json", delivery_mode=2,
                    ),
                ))
            await asyncio.gather(*batch)
    finally:
        await conn.close()
    return out


async def pipeline(run: Run, p: Params) -> dict[str, Any]:
    """The whole scenario (module doc)."""
    if run.vhost is None:
        return {"available": False,
                "reason": "needs rabbitmqctl for a throwaway vhost (the workers' queue names "
                          "are fixed)"}
    out: dict[str, Any] = {
        "available": True, "mix": dict(MIX), "users": USERS, "devices": DEVICES,
        "endpoints": ENDPOINTS, "webhook_latency_s": p.pipeline_webhook_latency,
        "window_s": p.pipeline_window, "bound_s": BOUND_S,
    }
    print("[bench] pipeline: webhook throughput ...", flush=True)
    out.update(await webhook_drains(run, p))
    pipe = Pipeline(run, p)
    try:
        await pipe.open()
        out["one"] = await pipe.search()
        await pipe.billing.add()
        await pipe.notifications.add()
        levels = p.pipeline_levels
        found = out["one"]["sustained_rate"]
        start = max(0, levels.index(found) - 1) if found in levels else 0
        out["two"] = await pipe.search(start)
        await pipe.billing.stop()
        await pipe.notifications.stop()
        print("[bench] pipeline: broker ceiling for the same topology ...", flush=True)
        out["ceiling"] = await broker_ceiling(run, p, pipe.names.exchange)
        # The floor at the target: the broker alone, paced at a quarter of its round trip.
        target = round(TARGET_RATIO * out["ceiling"]["rate"])
        print(f"[bench] pipeline: the broker alone at {target} events/s ...", flush=True)
        out["broker_at_target"] = await broker_ceiling(run, p, pipe.names.exchange, target)
    finally:
        await pipe.close()
    ceiling_rate = out["ceiling"]["rate"]
    for key in ("one", "two"):
        sustained = out[key]["sustained_rate"]
        out[key]["ratio_to_ceiling"] = (
            round(sustained / ceiling_rate, 3) if sustained and ceiling_rate else None
        )
    return out
