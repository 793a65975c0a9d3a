"""Consumers: events/s of the billing worker (``python -m consumers billing``), 1 and 2 replicas.

Driven only through the documented entry point and ``CDC_*`` variables. For each replica
count: a fresh database and queue prefix; one worker start declares the topology and schema
and is stopped; then a backlog of seed-like ``device.started`` / ``device.stopped`` pairs
(plus 10% duplicate deliveries, for the inbox to drop) is published, confirmed, into its
queues; then the replicas start, and the clock runs from the first usage record to the
moment ``usage_records`` holds every session. Effects are checked exactly: one record per
pair, total cost = pairs x 60 s x the default hourly rate.

When the worker is not installed (the runtime and billing land on other branches) the
scenario says "not available" instead of failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import random
import signal
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiormq
import orjson
import psycopg
from psycopg import sql

from bench.env import Run, drop_database, with_path
from bench.params import Params
from bench.seed_poller import create_seed_table

SESSION_SECONDS = 60
DEFAULT_RATE = Decimal("1.20")  # billing's rate for a device with no known plan (per hour)
DUPLICATE_SHARE = 0.10


def available() -> str | None:
    """``None`` if ``python -m consumers billing`` can run here, else why not."""
    for module in ("consumers.__main__", "consumers.billing.worker"):
        try:
            found = importlib.util.find_spec(module)
        except ModuleNotFoundError:
            found = None
        if found is None:
            return f"{module} is not installed here (the worker is not on this branch yet)"
    return None


def _events(pairs: int) -> list[tuple[str, str, bytes, dict[str, Any]]]:
    """``(message_id, routing_key, body, headers)`` for every delivery, in the order the
    platform would publish them (by event time: a session starts every second and lasts
    60 s), a random 10% delivered a second time right after the first."""
    base = datetime(2026, 1, 1, tzinfo=UTC)
    timed: list[tuple[datetime, tuple[str, str, bytes, dict[str, Any]]]] = []
    for i in range(pairs):
        device, user = f"bench-dev-{i}", f"bench-user-{i % 50}"
        started = base + timedelta(seconds=i)
        stopped = started + timedelta(seconds=SESSION_SECONDS)
        for key, payload, at in (
            ("device.started", {"deviceId": device, "userId": user,
                                "startedAt": started.isoformat()}, started),
            ("device.stopped", {"deviceId": device, "userId": user,
                                "stoppedAt": stopped.isoformat()}, stopped),
        ):
            headers = {"aggregate_type": "device", "aggregate_id": device,
                       "created_at": at.isoformat()}
            timed.append((at, (str(uuid.uuid4()), key, orjson.dumps(payload), headers)))
    timed.sort(key=lambda item: item[0])
    rng = random.Random(7)
    out: list[tuple[str, str, bytes, dict[str, Any]]] = []
    for _, event in timed:
        out.append(event)
        if rng.random() < DUPLICATE_SHARE:
            out.append(event)
    return out


async def _publish(amqp_url: str, exchange: str, events: list[Any]) -> None:
    """Publish ``events`` persistent with confirms, a window of 500 at a time."""
    conn = await aiormq.connect(amqp_url)
    try:
        channel = await conn.channel(publisher_confirms=True)
        for start in range(0, len(events), 500):
            confirms = [
                channel.basic_publish(
                    body, exchange=exchange, routing_key=key, mandatory=True,
                    properties=aiormq.spec.Basic.Properties(
                        message_id=message_id, message_type=key, content_type="application/json",
                        delivery_mode=2, headers=headers,
                    ),
                )
                for message_id, key, body, headers in events[start:start + 500]
            ]
            for result in await asyncio.gather(*confirms):
                if not isinstance(result, aiormq.spec.Basic.Ack):
                    raise RuntimeError(f"the broker did not take a bench event: {result!r}")
    finally:
        await conn.close()


async def _queues_ready(
    amqp_url: str, queues: list[str], timeout: float, procs: list[Any]
) -> bool:
    conn = await aiormq.connect(amqp_url)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and all(p.returncode is None for p in procs):
            try:
                channel = await conn.channel()
                for queue in queues:
                    await channel.queue_declare(queue, passive=True)
                return True
            except aiormq.exceptions.ChannelNotFoundEntity:
                await asyncio.sleep(0.5)
        return False
    finally:
        await conn.close()


async def _start_workers(env: dict[str, str], count: int, log_path: Path) -> list[Any]:
    procs = []
    with log_path.open("ab") as log:
        for _ in range(count):
            # cwd away from any checkout, so the installed package is what runs.
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "consumers", "billing", env=env, cwd=log_path.parent,
                stdout=log, stderr=log, start_new_session=True,
            ))
    return procs


async def stop_workers(procs: list[Any]) -> None:
    """SIGTERM each process, wait up to 30 s, then SIGKILL."""
    for proc in procs:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


async def _effects(db_url: str) -> tuple[int, Decimal]:
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        try:
            cur = await db.execute("SELECT count(*), coalesce(sum(cost), 0) FROM usage_records")
        except psycopg.errors.UndefinedTable:
            return 0, Decimal(0)
        row = await cur.fetchone()
    assert row is not None
    return int(row[0]), Decimal(row[1])


async def _replicas(run: Run, p: Params, replicas: int) -> dict[str, Any]:
    db_name = f"{run.db_name}_c{replicas}"
    db_url = with_path(run.admin_url, db_name)
    prefix = f"bench{replicas}."
    exchange = run.names("consumers").exchange
    env = {
        **os.environ,
        "CDC_DATABASE_URL": db_url,
        "CDC_AMQP_URL": run.amqp_url,
        "CDC_EXCHANGE": exchange,
        "CDC_OUTBOX_TABLE": "public.event_outbox",
        "CDC_WORKER_QUEUE_PREFIX": prefix,
        "CDC_WORKER_METRICS_PORT": "0",
        "CDC_WORKER_LOG_LEVEL": os.environ.get("CDC_WORKER_LOG_LEVEL", "WARNING"),
    }
    log_path = run.results_dir / f"billing-{replicas}.log"
    async with await psycopg.AsyncConnection.connect(run.admin_url, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(db_name)))
    procs: list[Any] = []
    try:
        await create_seed_table(db_url, "event_outbox")
        queues = [f"{prefix}billing-service.device-{kind}" for kind in ("started", "stopped")]
        procs = await _start_workers(env, 1, log_path)
        ready = await _queues_ready(run.amqp_url, queues, timeout=60, procs=procs)
        await stop_workers(procs)
        if not ready:
            code = procs[0].returncode
            return {"error": f"the billing worker declared no queues (exit code {code}); "
                             f"see {log_path}"}
        events = _events(p.consumer_pairs)
        await _publish(run.amqp_url, exchange, events)
        procs = await _start_workers(env, replicas, log_path)
        started = time.monotonic()
        first: float | None = None
        count, cost = 0, Decimal(0)
        deadline = started + p.consumer_max_seconds
        while time.monotonic() < deadline:
            count, cost = await _effects(db_url)
            now = time.monotonic()
            if first is None and count > 0:
                first = now
            if count >= p.consumer_pairs:
                break
            if any(proc.returncode is not None for proc in procs):
                return {"error": f"a billing replica exited early; see {log_path}"}
            await asyncio.sleep(0.2)
        finished = time.monotonic()
        complete = count >= p.consumer_pairs
        await asyncio.sleep(1.0)  # anything extra (a doubled effect) would show now
        count, cost = await _effects(db_url)
        expected_cost = (DEFAULT_RATE * SESSION_SECONDS / 3600 * p.consumer_pairs).quantize(
            Decimal("0.000001")
        )
        elapsed = finished - (first or started)
        return {
            "replicas": replicas,
            "deliveries": len(events),
            "duplicates": len(events) - 2 * p.consumer_pairs,
            "order": "by event time, each duplicate right after its original",
            "complete": complete,
            "cut_after_s": None if complete else p.consumer_max_seconds,
            "events_per_s": round(len(events) / elapsed, 1) if complete else None,
            "events_per_s_per_replica": (
                round(len(events) / elapsed / replicas, 1) if complete else None
            ),
            "seconds": round(elapsed, 2),
            "startup_seconds": round((first or started) - started, 2),
            "usage_records": count,
            "expected_records": p.consumer_pairs,
            "total_cost": str(cost),
            "expected_cost": str(expected_cost),
            "exact": count == p.consumer_pairs and cost == expected_cost,
        }
    finally:
        await stop_workers(procs)
        with contextlib.suppress(Exception):
            await drop_database(run.admin_url, db_name)


async def consumers(run: Run, p: Params) -> dict[str, Any]:
    """Billing throughput with inbox dedup, one replica then two."""
    reason = available()
    if reason is None and run.vhost is None:
        reason = "needs rabbitmqctl for a throwaway vhost (the worker's queue names are fixed)"
    if reason is not None:
        return {"available": False, "reason": reason}
    names = run.names("consumers")
    # The exchange the worker binds to (the sink queue is bound to nothing it publishes).
    await run.declare_sink(names, bind="bench.unused")
    try:
        return {
            "available": True,
            "pairs": p.consumer_pairs,
            "duplicate_share": DUPLICATE_SHARE,
            "one": await _replicas(run, p, 1),
            "two": await _replicas(run, p, 2),
        }
    finally:
        with contextlib.suppress(Exception):
            await run.delete_sink(names)
