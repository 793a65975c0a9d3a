"""``python -m bench.webhooks_ab``: the pipeline's webhook drain, source trees alternated.

    python -m bench.webhooks_ab --trees /work/base,/work/wt/mine --rounds 3 --events 60000
    python -m bench.webhooks_ab --trees . --rounds 1 --profile /tmp/prof   # py-spy flame SVG
    python -m bench.webhooks_ab --trees /work/base,. --dead               # 10% dead endpoints

Each measurement is ``scenario_pipeline.webhook_throughput`` (one notifications replica, 20
endpoints answering in 20 ms, no dead ones) in a fresh database and vhost, with the worker's
code taken from one tree (``PYTHONPATH`` and ``PYTHONSAFEPATH``, so neither the current
directory nor the installed package wins). The trees take turns (A B A B ...), so a change
in the machine's load hits both alike; the load average is printed with each figure.
``--profile DIR`` also runs ``py-spy record`` on the worker for the drain (py-spy needed),
the dead drain's too with ``--dead``.
``--dead`` follows each tree's healthy drain with one where 10% of the users' endpoints never
answer, and prints the ratio of the two rates and what one event to a dead endpoint costs in
CPU (worker, RabbitMQ node, PostgreSQL): the dead drain's CPU less its delivered webhooks at
the healthy drain's cost each, over the dead events.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import psutil
import psycopg

from bench.env import Run
from bench.params import Params
from bench.pgserver import own_server
from bench.scenario_pipeline import webhook_throughput

RESULTS_DIR = Path(__file__).resolve().parent / "results" / "runs"


async def _worker() -> psutil.Process:
    """The notifications worker under this process, once it runs."""
    me = psutil.Process()
    while True:
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.cmdline()[-2:] == ["consumers", "notifications"]:
                    return child
        await asyncio.sleep(0.05)


async def _count_syscalls(last: list[float]) -> None:
    """Keep ``last`` at the worker's read and write system calls and its user and system
    CPU seconds so far (start-up included: the same for every tree), read every 0.2 s until
    it exits."""
    worker = await _worker()
    with contextlib.suppress(psutil.Error):
        while True:
            io, cpu = worker.io_counters(), worker.cpu_times()
            last[:] = [io.read_count, io.write_count, cpu.user, cpu.system]
            await asyncio.sleep(0.2)


async def _profile(out: Path, seconds: float, extra: list[str]) -> None:
    """py-spy the notifications worker under this process during its drain, for ``seconds``
    from when it resumes after the backlog went in; ``extra``: more py-spy flags."""
    worker = await _worker()
    # The drain begins when the worker, paused while the backlog goes in, runs again: a
    # drain with dead endpoints sends webhooks earlier too, in its warm-up.
    for paused in (True, False):
        while True:
            if (worker.status() == psutil.STATUS_STOPPED) == paused:
                break
            await asyncio.sleep(0.05)
    proc = await asyncio.create_subprocess_exec(
        "py-spy", "record", "-r", "250", "-d", str(int(seconds)), "--pid", str(worker.pid),
        "-o", str(out), "-f", "raw", *extra,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode:
        print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)


async def _database_work(db_url: str, webhooks: int) -> str:
    """Transactions and scans of the preferences table per webhook in the run's database
    (start-up included): one scan per chunk lookup while it read them with
    ``user_id = ANY(array)``, one per user of a chunk since it probes the index per id."""
    await asyncio.sleep(1.0)  # the statistics collector reports about every 500 ms
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        cur = await db.execute(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname ="
            " current_database()), (SELECT idx_scan + seq_scan FROM pg_stat_user_tables"
            " WHERE relname = 'notification_preferences')"
        )
        row = await cur.fetchone()
    assert row is not None
    n = max(webhooks, 1)
    return f"{row[0] / n:.2f} commits and {(row[1] or 0) / n:.3f} preference scans per webhook"


_CPU_KEYS = {
    "worker": "worker_cpu_us_per_webhook",
    "rabbitmq": "rabbitmq_cpu_us_per_webhook",
    "postgres": "postgres_cpu_us_per_webhook",
}


def per_dead_event(healthy: dict[str, Any], dead: dict[str, Any]) -> dict[str, float | None]:
    """CPU µs per event to a dead endpoint, by process: the dead drain's CPU less its
    delivered webhooks at the healthy drain's cost each, over the dead events."""
    dead_events = dead["events"] - dead["deliverable"]
    delivered = max(dead["delivered"], 1)
    out: dict[str, float | None] = {}
    for part, key in _CPU_KEYS.items():
        h, d = healthy.get(key), dead.get(key)
        if h is None or d is None or not dead_events:
            out[part] = None
        else:
            out[part] = round((d - h) * delivered / dead_events, 1)
    return out


async def _one(
    admin_url: str,
    tree: Path,
    p: Params,
    profile: Path | None,
    dead_share: float = 0.0,
    spy_flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    run = Run(
        admin_url=admin_url,
        amqp_root_url=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
        results_dir=RESULTS_DIR,
    )
    os.environ["PYTHONPATH"] = str(tree)
    os.environ["PYTHONSAFEPATH"] = "1"
    await run.open()
    spy = None if profile is None else asyncio.create_task(_profile(profile, 8, list(spy_flags)))
    syscalls = [0.0, 0.0, 0.0, 0.0]
    counter = asyncio.create_task(_count_syscalls(syscalls))
    try:
        result = await webhook_throughput(run, p, dead_share)
        n = max(result["delivered"], 1)
        result["syscalls"] = f"{syscalls[0] / n:.2f} reads and {syscalls[1] / n:.2f} writes"
        user, system = syscalls[2], syscalls[3]
        result["cpu_split"] = f"user {user / n * 1e6:.0f} us, system {system / n * 1e6:.0f} us"
        result["database"] = await _database_work(run.db_url, result["delivered"])
        return result
    finally:
        counter.cancel()
        if spy is not None:
            spy.cancel()
        await run.close()


async def _main(
    args: argparse.Namespace, admin_url: str, trees: list[Path], profiles: Path | None
) -> None:
    p = dataclasses.replace(Params.quick(), pipeline_webhook_events=args.events)
    for round_ in range(args.rounds):
        for i, tree in enumerate(trees):
            profile = None if profiles is None else profiles / f"tree{i}-round{round_}.txt"
            r = await _one(admin_url, tree, p, profile, spy_flags=tuple(args.spy_flags.split()))
            print(
                f"{tree}: {r['webhooks_per_s']} webhooks/s, worker "
                f"{r['worker_cpu_us_per_webhook']} us/webhook, receiver "
                f"{r['receiver_cpu_us_per_webhook']} us, RabbitMQ "
                f"{r['rabbitmq_cpu_us_per_webhook']} us, PostgreSQL "
                f"{r['postgres_cpu_us_per_webhook']} us, delivered {r['delivered']}/"
                f"{r['deliverable']} (published in {r['publish_seconds']} s), {r['database']}, "
                f"system calls per webhook: {r['syscalls']}, "
                f"whole-life CPU per webhook: {r['cpu_split']}, "
                f"load {tuple(round(x, 2) for x in r['load_average'])}",
                flush=True,
            )
            if args.dead:
                dead_profile = (
                    None if profiles is None else profiles / f"tree{i}-round{round_}-dead.txt"
                )
                flags = tuple(args.spy_flags.split())
                d = await _one(admin_url, tree, p, dead_profile, 0.10, flags)
                ratio = d["webhooks_per_s"] / r["webhooks_per_s"] if r["webhooks_per_s"] else 0
                print(
                    f"{tree}: 10% dead {d['webhooks_per_s']} webhooks/s = {ratio:.2f}x of "
                    f"healthy (worker {d['worker_cpu_us_per_webhook']}, RabbitMQ "
                    f"{d['rabbitmq_cpu_us_per_webhook']}, PostgreSQL "
                    f"{d['postgres_cpu_us_per_webhook']} us/webhook, {d['database']}); "
                    f"CPU µs per dead event "
                    f"{per_dead_event(r, d)}, {d['posts']} POSTs, healthy arrivals over "
                    f"{d['arrivals_span_s']} s (99% in {d['arrivals_p99_s']} s; healthy drain "
                    f"{r['arrivals_span_s']} s, 99% in {r['arrivals_p99_s']} s), load "
                    f"{tuple(round(x, 2) for x in d['load_average'])}",
                    flush=True,
                )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhooks_ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", required=True, help="comma-separated source trees")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--events", type=int, default=Params().pipeline_webhook_events)
    parser.add_argument("--profile", help="directory for py-spy raw profiles of each run")
    parser.add_argument("--spy-flags", default="",
                        help="more py-spy record flags with --profile, e.g. '--native --idle'")
    parser.add_argument("--dead", action="store_true",
                        help="also a drain with 10%% of the endpoints dead, per tree")
    args = parser.parse_args()
    if args.profile and shutil.which("py-spy") is None:
        print("--profile needs py-spy on PATH", file=sys.stderr)
        return 2
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    profiles = None if args.profile is None else Path(args.profile)
    if profiles is not None:
        profiles.mkdir(parents=True, exist_ok=True)
    given = os.environ.get("BENCH_PG_URL")
    with contextlib.nullcontext(given) if given else own_server() as admin_url:
        asyncio.run(_main(args, admin_url, trees, profiles))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
