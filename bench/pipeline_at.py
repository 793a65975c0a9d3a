"""``python -m bench.pipeline_at``: the pipeline's latency at one rate, settings alternated.

    python -m bench.pipeline_at --rate 500 --window 30 --rounds 3 \\
        --set CDC_WORKER_BATCH_LINGER_MAX=0.05 --set CDC_WORKER_BATCH_LINGER_MAX=0.01
    python -m bench.pipeline_at --rate 1500 --set CDC_PUBLISH_LINGER=0 \\
        --set CDC_PUBLISH_LINGER=0.02
    python -m bench.pipeline_at --set PYTHONPATH=/abs/tree_a,PYTHONSAFEPATH=1 \\
        --set PYTHONPATH=/abs/tree_b,PYTHONSAFEPATH=1    # trees: absolute paths

One ``scenario_pipeline.Pipeline`` (relay, one billing and one notifications replica, the
webhook receiver) in a fresh database and vhost; each ``--set`` is one arm: comma-separated
``NAME=VALUE`` pairs put on top of the relay's and both workers' environment (a relay or
worker setting, or ``PYTHONPATH`` with ``PYTHONSAFEPATH=1`` to run another source tree's
relay and workers). Each round restarts the relay and the workers with every arm in turn
(A B A B ...: the machine's load hits all alike) and measures ``Pipeline.level(rate)``:
p50/p95/p99 commit -> usage record (billing's inbox row) and commit -> webhook received,
the CPU per event of each process, the load average. To see what sets the tail, each level
also prints the relay's own commit -> confirm p50/p99 (its histogram), the seconds whose
slowest event exceeded ``--spike-ms`` (by commit second), where the server's last
checkpoint started relative to the window, the tables autovacuum vacuumed or analyzed and
those sequential scans read during the level, and the CPU per event of each PostgreSQL
session of the run's database (by application name: each worker's connections, the
writer's, the walsender). ``--timeline`` adds, after each level, its second by second table
(``bench.timeline``): commits, usage records, in-app rows and webhooks per second, the
notifications device queue's depth, and the cores each process used.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import timeline
from bench.env import Run
from bench.observe import DepthSampler, cpu_seconds, machine_busy_seconds
from bench.params import Params
from bench.pgserver import own_server
from bench.scenario_pipeline import Pipeline
from bench.stats import histogram_buckets, histogram_quantile

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "runs"
RELAY_HISTOGRAM = "cdc_confirm_latency_seconds"  # the relay's commit -> broker confirm
START_UP_S = 3.0  # a restarted worker's connect and declare, before the level's warm-up


def parse_arm(text: str) -> dict[str, str]:
    """``A=1,B=2`` -> {"A": "1", "B": "2"}; an empty text is the defaults."""
    arm = {}
    for pair in filter(None, text.split(",")):
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"not NAME=VALUE: {pair!r}")
        arm[name.strip()] = value.strip()
    return arm


async def spikes(
    pipe: Pipeline, start: float, end: float, bound_s: float
) -> dict[str, list[tuple[int, int]]]:
    """Per effect, the commit seconds (from ``start``) of the window whose slowest event took
    longer than ``bound_s``, with that event's lag in ms."""
    async with await psycopg.AsyncConnection.connect(pipe.run.db_url, autocommit=True) as db:
        cur = await db.execute(sql.SQL(
            "SELECT o.id::text, extract(epoch FROM o.created_at)::float8,"
            " extract(epoch FROM i.processed_at)::float8 FROM {} o LEFT JOIN consumer_inbox i"
            " ON i.message_id = o.id::text AND i.consumer = 'billing'"
            " WHERE o.created_at >= to_timestamp(%s) AND o.created_at < to_timestamp(%s)"
        ).format(sql.Identifier(pipe.names.table)), (start, end))
        rows = await cur.fetchall()
    hooks, _ = await pipe.receiver.records()
    out: dict[str, list[tuple[int, int]]] = {}
    for name, done in (("billing", {r[0]: r[2] for r in rows if r[2] is not None}),
                       ("webhook", hooks)):
        worst: dict[int, float] = {}
        for mid, committed, _ in rows:
            if mid in done:
                second = int(committed - start)
                worst[second] = max(worst.get(second, 0.0), done[mid] - committed)
        out[name] = [(s, round(lag * 1000)) for s, lag in sorted(worst.items()) if lag > bound_s]
    return out


async def start_timeline(pipe: Pipeline) -> tuple[timeline.Sampler, DepthSampler]:
    """Sample every process group's CPU (the bench process too) and the device queue."""
    meter = await pipe.meter()
    me = os.getpid()
    depth = DepthSampler(pipe.run.amqp_url, "notification-service.device", interval=0.5)
    await depth.start()

    def cpu() -> dict[str, float]:
        return {**meter.cpu_now(), "bench": cpu_seconds(me)}

    sampler = timeline.Sampler(cpu, machine_busy_seconds, lambda: depth.depth)
    sampler.start()
    return sampler, depth


async def stop_timeline(started: tuple[timeline.Sampler, DepthSampler]) -> list[timeline.Sample]:
    """End :func:`start_timeline`'s sampling; its samples."""
    sampler, depth = started
    samples = await sampler.stop()
    await depth.stop()
    return samples


async def timeline_table(pipe: Pipeline, samples: list[timeline.Sample], start: float) -> str:
    """The level's timeline (``bench.timeline.render``) from ``start`` (epoch seconds)."""
    async with await psycopg.AsyncConnection.connect(pipe.run.db_url, autocommit=True) as db:
        cur = await db.execute(sql.SQL(
            "SELECT extract(epoch FROM created_at)::float8 FROM {} WHERE created_at >="
            " to_timestamp(%s)").format(sql.Identifier(pipe.names.table)), (start,))
        commits = [t for (t,) in await cur.fetchall()]
        cur = await db.execute(
            "SELECT consumer, extract(epoch FROM processed_at)::float8 FROM consumer_inbox"
            " WHERE processed_at >= to_timestamp(%s)", (start,))
        done = await cur.fetchall()
    hooks, _ = await pipe.receiver.records()
    counts = {
        "commits": timeline.per_second(commits),
        "usage": timeline.per_second(t for c, t in done if c == "billing"),
        "in-app": timeline.per_second(t for c, t in done if c == "notifications"),
        "webhooks": timeline.per_second(t for t in hooks.values() if t >= start),
    }
    return timeline.render(timeline.rows(samples), start, counts)


async def session_cores(pipe: Pipeline, after: float, seconds: float) -> dict[str, float]:
    """Cores each PostgreSQL session of the run's database used (by application name, the
    walsender by its type) over ``seconds``, starting ``after`` seconds from now; a session
    that ends meanwhile (a writer's, at the level's end) is left out."""
    await asyncio.sleep(after)
    async with await psycopg.AsyncConnection.connect(pipe.run.admin_url, autocommit=True) as db:
        cur = await db.execute(
            "SELECT pid, coalesce(nullif(application_name, ''), backend_type)"
            " FROM pg_stat_activity WHERE datname = %s", (pipe.run.db_name,))
        names = dict(await cur.fetchall())
    before = {pid: cpu_seconds(pid) for pid in names}
    await asyncio.sleep(seconds)
    cores: dict[str, float] = {}
    for pid, name in names.items():
        used = cpu_seconds(pid) - before[pid]
        if used >= 0:
            cores[name] = cores.get(name, 0.0) + used / seconds
    return dict(sorted(cores.items(), key=lambda kv: -kv[1]))


Counts = dict[str, tuple[int, int, int]]


async def table_counts(run: Run) -> Counts:
    """Per table of the run's database: autovacuum runs, autoanalyze runs, rows read by
    sequential scans, so far."""
    async with await psycopg.AsyncConnection.connect(run.db_url, autocommit=True) as db:
        cur = await db.execute(
            "SELECT relname, autovacuum_count, autoanalyze_count, seq_tup_read"
            " FROM pg_stat_user_tables")
        return {name: (vac, ana, seq) for name, vac, ana, seq in await cur.fetchall()}


def tables_during(before: Counts, after: Counts) -> str:
    """What autovacuum did, and which tables sequential scans read, between two
    :func:`table_counts` (the statistics collector reports within about a second)."""
    ran, scanned = [], []
    for name, (vac, ana, seq) in sorted(after.items()):
        vac0, ana0, seq0 = before.get(name, (0, 0, 0))
        done = [w for w, n in (("vacuum", vac - vac0), ("analyze", ana - ana0)) if n > 0]
        if done:
            ran.append(f"{name} ({' and '.join(done)})")
        if seq - seq0 >= 10_000:
            scanned.append(f"{name} {seq - seq0:,}")
    return (f"autovacuum: {', '.join(ran) or 'nothing'}; rows read by sequential scans: "
            f"{', '.join(scanned) or 'none over 10,000'}")


async def checkpoint(run: Run, start: float) -> str:
    """When the server's last checkpoint started, in seconds from ``start`` (its log says how
    long each took: ``log_checkpoints`` is on by default)."""
    async with await psycopg.AsyncConnection.connect(run.admin_url, autocommit=True) as db:
        cur = await db.execute(
            "SELECT extract(epoch FROM checkpoint_time)::float8 FROM pg_control_checkpoint()"
        )
        row = await cur.fetchone()
    assert row is not None
    return f"last checkpoint at {row[0] - start:+.0f}s"


def line(arm: str, r: dict[str, Any]) -> str:
    """One level's figures on one line."""
    def ms(effect: dict[str, Any]) -> str:
        return (f"p50 {effect['p50_ms']} p95 {effect['p95_ms']} p99 "
                f"{effect['p99_with_missing_ms']} max {effect['max_ms']}")

    cpu = r["cpu_us_per_event"]
    return (f"[{arm}] {r['offered_rate']}/s: usage record {ms(r['billing'])} | webhook "
            f"{ms(r['webhook'])} | in-app p99 {r['in_app']['p99_with_missing_ms']} | cpu "
            f"us/event {', '.join(f'{k} {v}' for k, v in cpu.items())} | load "
            f"{tuple(round(x, 2) for x in r['load_average'])}")


async def _main(args: argparse.Namespace, admin_url: str, arms: list[str]) -> None:
    p = dataclasses.replace(Params(), pipeline_window=args.window, pipeline_warmup=args.warmup)
    run = Run(
        admin_url=admin_url,
        amqp_root_url=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        results_dir=RESULTS_DIR,
    )
    await run.open()
    pipe: Pipeline | None = None
    try:
        if run.vhost is None:
            raise SystemExit("needs rabbitmqctl for a throwaway vhost")
        pipe = Pipeline(run, p)
        await pipe.open()
        for round_ in range(args.rounds):
            for arm in arms:
                await pipe.restart(parse_arm(arm))
                await asyncio.sleep(START_UP_S)
                begun = time.time()
                before = histogram_buckets(await pipe.relay.metrics(), RELAY_HISTOGRAM)
                timed = await start_timeline(pipe) if args.timeline else None
                counted = await table_counts(run)
                sessions = asyncio.create_task(session_cores(
                    pipe, p.pipeline_warmup + 1, max(1.0, p.pipeline_window - 2)))
                r = await pipe.level(args.rate)
                samples = await stop_timeline(timed) if timed is not None else []
                after = histogram_buckets(await pipe.relay.metrics(), RELAY_HISTOGRAM)
                relay = [histogram_quantile(before, after, q) for q in (0.5, 0.99)]
                start = begun + p.pipeline_warmup
                print(f"round {round_ + 1} " + line(arm or "defaults", r), flush=True)
                slow = await spikes(pipe, start, start + r["window_s"], args.spike_ms / 1000)
                print(f"    relay commit -> confirm p50/p99 (warm-up included, bucket-"
                      f"interpolated) {[None if v is None else round(v * 1000, 1) for v in relay]}"
                      f" ms; > {args.spike_ms} ms by second: {slow}; "
                      f"{await checkpoint(run, start)}; "
                      f"{tables_during(counted, await table_counts(run))}",
                      flush=True)
                per_event = {name: round(c / args.rate * 1e6, 1)
                             for name, c in (await sessions).items()}
                print(f"    PostgreSQL CPU µs/event by session: {per_event}", flush=True)
                if timed is not None:
                    print("    second by second, from the warm-up's start (cores per process):")
                    print(await timeline_table(pipe, samples, begun), flush=True)
                await pipe.settle()
    finally:
        if pipe is not None:
            await pipe.close()
        await run.close()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline_at", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=500.0, help="offered events/s")
    parser.add_argument("--window", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds before the window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", dest="arms", action="append", type=str,
                        help="one arm: NAME=VALUE[,NAME=VALUE...] for the relay and the workers "
                             "(repeat)")
    parser.add_argument("--spike-ms", type=int, default=100)
    parser.add_argument("--timeline", action="store_true",
                        help="print each level second by second (bench.timeline)")
    args = parser.parse_args()
    arms = args.arms or [""]
    for arm in arms:
        try:
            parse_arm(arm)  # a malformed arm fails before anything starts
        except argparse.ArgumentTypeError as exc:
            parser.error(str(exc))
    given = os.environ.get("BENCH_PG_URL")
    with contextlib.nullcontext(given) if given else own_server() as admin_url:
        asyncio.run(_main(args, admin_url, arms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
