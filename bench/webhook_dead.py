"""What a dead webhook endpoint costs the notifications worker, before and after a change.

    python -m bench.webhook_dead [--base PYTHON] [--rounds 3] [--events 20000]

Runs the pipeline scenario's webhook throughput drain (``scenario_pipeline.webhook_throughput``)
all healthy, then with 10% of the users' endpoints dead, and gives the ratio of the two rates
and what one event to a dead endpoint costs in CPU: the worker's, the RabbitMQ node's and
PostgreSQL's (the dead drain's CPU minus what its healthy webhooks cost at the healthy
drain's rate per webhook, over the dead events). With ``--base`` (the interpreter of another
checkout's venv, e.g. main's) every round runs that code too, alternated with this one
(this, base, base, this, ...), so the pairs see the same load. Load averages are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from typing import Any

from bench.__main__ import RESULTS_DIR
from bench.env import Run
from bench.params import Params
from bench.pgserver import own_server
from bench.scenario_pipeline import webhook_throughput

_PARTS = ("worker", "rabbitmq", "postgres")
_KEYS = {
    "worker": "worker_cpu_us_per_webhook",
    "rabbitmq": "rabbitmq_cpu_us_per_webhook",
    "postgres": "postgres_cpu_us_per_webhook",
}


def per_dead_event(healthy: dict[str, Any], dead: dict[str, Any]) -> dict[str, float | None]:
    """CPU µs per event to a dead endpoint, by process: the dead drain's CPU less its
    delivered webhooks at the healthy drain's cost each, over the dead events."""
    dead_events = dead["events"] - dead["deliverable"]
    out: dict[str, float | None] = {}
    for part in _PARTS:
        h, d = healthy.get(_KEYS[part]), dead.get(_KEYS[part])
        if h is None or d is None or not dead_events:
            out[part] = None
            continue
        delivered = max(dead["delivered"], 1)
        out[part] = round((d * delivered - h * delivered) / dead_events, 1)
    return out


async def _pair(run: Run, p: Params, python: str, label: str) -> dict[str, Any]:
    healthy = await webhook_throughput(run, p, 0.0, python)
    dead = await webhook_throughput(run, p, 0.10, python)
    h, d = healthy["webhooks_per_s"], dead["webhooks_per_s"]
    out = {
        "code": label,
        "healthy_per_s": h,
        "dead_per_s": d,
        "ratio": round(d / h, 3) if h and d else None,
        "us_per_healthy_webhook": {part: healthy.get(_KEYS[part]) for part in _PARTS},
        "us_per_dead_event": per_dead_event(healthy, dead),
        "load_average": [healthy["load_average"], dead["load_average"]],
        "healthy": healthy,
        "dead": dead,
    }
    print(json.dumps({k: v for k, v in out.items() if k not in ("healthy", "dead")}), flush=True)
    return out


async def _main(args: argparse.Namespace, admin_url: str) -> list[dict[str, Any]]:
    p = dataclasses.replace(Params(), pipeline_webhook_events=args.events)
    codes = [("this", sys.executable)] + ([("base", args.base)] if args.base else [])
    out = []
    for n in range(args.rounds):
        for label, python in codes if n % 2 == 0 else codes[::-1]:
            # A run (database, vhost) per pair: the drains' queues and inboxes start empty.
            run = Run(
                admin_url=admin_url,
                amqp_root_url=os.environ.get(
                    "BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"
                ),
                results_dir=RESULTS_DIR / "runs" / f"webhook-dead-{os.getpid()}",
            )
            await run.open()
            try:
                out.append(await _pair(run, p, python, label))
            finally:
                await run.close()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_dead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", help="python of the checkout to compare with (its venv)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--events", type=int, default=Params().pipeline_webhook_events)
    args = parser.parse_args(argv)
    with own_server() as admin_url:
        results = asyncio.run(_main(args, admin_url))
    print(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
