"""``python -m bench``: run the benchmark scenarios, print figures and ratios, save JSON.

    python -m bench                      # every scenario, full sizes (~15 min), writes docs
    python -m bench --quick              # small sizes, for development (docs untouched)
    python -m bench --only drain,steady  # by name; what they need (the ceiling) runs too
    python -m bench --repeat 3 --only drain,steady,consumers,pipeline --pipeline-window 20
                                         # three runs in one go: the spread of each figure

Results go to ``bench/results/<start time>.json`` and ``bench/results/latest.json`` (relay
logs and raw arrival times in ``bench/results/runs/<start>-<tag>/``); a full run also
regenerates ``docs/benchmarks.md`` and ``docs/bench-load.png`` (``--docs`` forces it,
``--no-docs`` skips it). Every scenario's resources are removed at the end, also on failure,
SIGTERM or Ctrl-C; a failed scenario is recorded as an error and the run goes on.

PostgreSQL: ``BENCH_PG_URL`` (an admin URL of a server with ``wal_level=logical``), else a
throwaway server of the local binaries started for the run (``bench/pgserver.py``).
RabbitMQ: ``BENCH_AMQP_URL``, else the local broker on 127.0.0.1:5672.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import report
from bench.env import Run
from bench.machine import facts, speed_probe_ms
from bench.nodetool import ensure_node
from bench.params import Params
from bench.pgserver import own_server
from bench.scenario_consumers import consumers
from bench.scenario_pipeline import pipeline
from bench.scenario_seed import seed
from bench.scenarios_relay import ceiling, drain, rss, shape, steady

SCENARIOS = ("ceiling", "drain", "steady", "seed", "shape", "rss", "consumers", "pipeline")
#: What a scenario's ratios are computed against, run first in the same run.
NEEDS = {"drain": ("ceiling",), "steady": ("ceiling",), "seed": ("ceiling", "drain")}
RESULTS_DIR = Path(__file__).resolve().parent / "results"
DOCS_DIR = Path(__file__).resolve().parent.parent / "docs"


def _selection(only: str | None) -> list[str]:
    if not only:
        return list(SCENARIOS)
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    unknown = wanted - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s) {sorted(unknown)}; choose from {SCENARIOS}")
    for name in list(wanted):
        wanted.update(NEEDS.get(name, ()))
    return [name for name in SCENARIOS if name in wanted]


def _rate(results: dict[str, Any], name: str) -> float | None:
    value = results.get(name, {}).get("rate")
    return float(value) if value else None


async def _scenario(
    name: str, run: Run, p: Params, results: dict[str, Any]
) -> dict[str, Any]:
    ceiling_rate = _rate(results, "ceiling")
    jobs: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "ceiling": lambda: ceiling(run, p, warm_up=True),
        "drain": lambda: drain(run, p, ceiling_rate),
        "steady": lambda: steady(run, p, ceiling_rate or 0.0),
        "seed": lambda: seed(run, p, _rate(results, "drain")),
        "shape": lambda: shape(run, p),
        "rss": lambda: rss(run, p),
        "consumers": lambda: consumers(run, p),
        "pipeline": lambda: pipeline(run, p),
    }
    if name == "steady" and not ceiling_rate:
        return {"error": "no broker ceiling measured in this run; the load levels need it"}
    return await jobs[name]()


def params(args: argparse.Namespace) -> Params:
    """The sizes of this invocation: full or quick, with the options that change them."""
    p = Params.quick() if args.quick else Params()
    if args.window:
        p = dataclasses.replace(p, window=args.window)
    if args.relay_windows:
        p = dataclasses.replace(
            p, relay_windows=tuple(int(w) for w in args.relay_windows.split(",")))
    if args.pipeline_window:
        p = dataclasses.replace(p, pipeline_window=args.pipeline_window)
    if args.pipeline_levels:
        p = dataclasses.replace(p, pipeline_levels=args.pipeline_levels)
    if args.pipeline_publish_linger is not None:
        p = dataclasses.replace(p, pipeline_publish_linger=args.pipeline_publish_linger)
    return p


async def _repetition(
    run: Run, p: Params, selection: list[str], started: datetime
) -> dict[str, Any]:
    """Every selected scenario once in ``run`` (its own database and vhost)."""
    out: dict[str, Any] = {"started_at": started.isoformat(timespec="seconds"), "scenarios": {}}
    run.results_dir = RESULTS_DIR / "runs" / f"{started:%Y%m%dT%H%M%S}-{run.tag}"
    await run.open()
    # Not a scenario of --only: the host's speed before and after the run's scenarios.
    host = out["scenarios"]["host"] = {"probe_ms_start": speed_probe_ms()}
    try:
        for name in selection:
            print(f"[bench] {name} ...", flush=True)
            began = time.monotonic()
            try:
                result = await _scenario(name, run, p, out["scenarios"])
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                traceback.print_exc()
                result = {"error": f"{type(exc).__name__}: {exc}"}
            result["elapsed_s"] = round(time.monotonic() - began, 1)
            out["scenarios"][name] = result
            print(f"[bench] {name} done in {result['elapsed_s']}s", flush=True)
        host["probe_ms_end"] = speed_probe_ms()
    finally:
        print("[bench] removing the run's database, slots, vhost ...", flush=True)
        await run.close()
    out["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    return out


async def _main(args: argparse.Namespace, admin_url: str) -> dict[str, Any]:
    p = params(args)
    # The relay runs at its default window (CDC_MAX_IN_FLIGHT) unless --window sets both.
    if args.window:
        os.environ["CDC_MAX_IN_FLIGHT"] = str(p.window)
    amqp_root_url = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    selection = _selection(args.only)
    await ensure_node()
    started = datetime.now(UTC)
    out: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "params": {k: getattr(p, k) for k in p.__slots__},
        "machine": await facts(admin_url, amqp_root_url),
    }
    runs = []
    # Each repetition gets a fresh Run (database, vhost, the workers' tables): nothing one
    # leaves behind can change the next one's figures.
    for i in range(args.repeat):
        if args.repeat > 1:
            print(f"[bench] run {i + 1} of {args.repeat}", flush=True)
        run = Run(admin_url=admin_url, amqp_root_url=amqp_root_url,
                  results_dir=RESULTS_DIR / "runs")
        runs.append(await _repetition(run, p, selection, started if i == 0 else
                                      datetime.now(UTC)))
    # The tables show the last run; every run stays in "runs" for the spread.
    out["scenarios"] = runs[-1]["scenarios"]
    if args.repeat > 1:
        out["repeat"] = args.repeat
        out["runs"] = runs
    out["finished_at"] = runs[-1]["finished_at"]
    return out


def _run_with_signals(args: argparse.Namespace, admin_url: str) -> dict[str, Any]:
    """Run ``_main``; SIGINT/SIGTERM cancel it once (cleanup still runs), later ones wait."""

    async def guarded() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        stopping = False

        def on_signal() -> None:
            nonlocal stopping
            if stopping:
                print("[bench] still cleaning up, please wait", file=sys.stderr, flush=True)
                return
            stopping = True
            print("[bench] interrupted: cleaning up", file=sys.stderr, flush=True)
            task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await _main(args, admin_url)

    return asyncio.run(guarded())


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _rising(text: str) -> tuple[float, ...]:
    """``500,1000,1500``: the search stops at the first level that fails, so they must rise."""
    levels = tuple(float(r) for r in text.split(","))
    if any(r <= 0 for r in levels) or list(levels) != sorted(set(levels)):
        raise argparse.ArgumentTypeError("give rising positive rates, e.g. 500,1000,1500")
    return levels


def command_line() -> argparse.ArgumentParser:
    """The command line of ``python -m bench``."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes for development")
    parser.add_argument("--window", type=int, default=0,
                        help="confirm window of the reference publisher and of the relay "
                             "(CDC_MAX_IN_FLIGHT); default: 1000 for the publisher, the "
                             "relay's own default (CDC_MAX_IN_FLIGHT) for the relay")
    parser.add_argument("--relay-windows", metavar="N,M",
                        help="relay windows the drains take in turn (the reference publisher "
                             "keeps --window), e.g. 1000,3000: paired ratios per window")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    parser.add_argument("--repeat", type=_positive, default=1, metavar="N",
                        help="run the selected scenarios N times (fresh database and vhost "
                             "each, one PostgreSQL server); the report adds the spread of the "
                             "headline figures over the N runs")
    full, quick = Params(), Params.quick()
    parser.add_argument("--pipeline-window", type=float, default=0, metavar="SECONDS",
                        help=f"measured seconds per pipeline level (default "
                             f"{full.pipeline_window:g}, quick {quick.pipeline_window:g}): "
                             "fewer events behind each p99, same levels and bound")
    parser.add_argument("--pipeline-levels", type=_rising, metavar="R,S,..",
                        help="offered events/s the pipeline tries in turn, rising (default "
                             f"{','.join(f'{r:g}' for r in full.pipeline_levels)}); the "
                             "search stops at the first that does not hold")
    parser.add_argument("--pipeline-publish-linger", type=float, metavar="SECONDS",
                        help="the pipeline relay's CDC_PUBLISH_LINGER (default "
                             f"{full.pipeline_publish_linger:g}; 0: none, the relay's default)")
    docs = parser.add_mutually_exclusive_group()
    docs.add_argument("--docs", dest="docs", action="store_true", default=None,
                      help="write docs/benchmarks.md and the PNG (default: full runs only)")
    docs.add_argument("--no-docs", dest="docs", action="store_false")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = command_line().parse_args(argv)
    try:
        given = os.environ.get("BENCH_PG_URL")
        with contextlib.nullcontext(given) if given else own_server() as admin_url:
            results = _run_with_signals(args, admin_url)
    except asyncio.CancelledError:
        print("[bench] interrupted; resources removed", file=sys.stderr)
        return 130
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = results["started_at"].replace(":", "").replace("-", "")
    path = RESULTS_DIR / f"{stamp}.json"
    text = json.dumps(results, indent=2, default=str)
    path.write_text(text)
    (RESULTS_DIR / "latest.json").write_text(text)
    print(report.text_summary(results))
    print(f"[bench] results: {path}")
    write_docs = args.docs if args.docs is not None else not args.quick and not args.only
    if write_docs:
        with contextlib.suppress(KeyboardInterrupt):
            written = report.write_docs(results, DOCS_DIR)
            print(f"[bench] wrote {', '.join(str(w) for w in written)}")
    failed = [k for k, v in results["scenarios"].items() if "error" in v]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
