"""Tables, ratios and the load plot from one run's results (the JSON ``python -m bench`` saves).

``text_summary`` is what the harness prints; ``write_docs`` writes ``docs/benchmarks.md``
and ``docs/bench-load.png``. A hand-written section between ``<!-- notes -->`` and
``<!-- /notes -->`` in the existing page is kept across regenerations.

    python -m bench.report [bench/results/latest.json]   # regenerate the docs from a run
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

from bench import spread

PLOT_NAME = "bench-load.png"
_NOTES_RE = re.compile(r"<!-- notes -->.*?<!-- /notes -->", re.S)


def _n(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None or value == "":
        return "—"
    if isinstance(value, int | float):
        text = f"{value:,.{digits}f}"
        return f"{text}{unit}"
    return str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _mb(mib: float | None) -> float | None:
    return None if mib is None else round(mib * 2**20 / 1e6, 1)


def _scenario(results: dict[str, Any], name: str) -> dict[str, Any]:
    value = results.get("scenarios", {}).get(name) or {}
    return value if isinstance(value, dict) else {}


def _verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("yes" if ok else "**no**")


def targets(results: dict[str, Any]) -> str:
    """The issue's targets against this run's figures (the figures of ``bench/spread.py``
    that have a target; a scenario that did not run shows as —)."""
    scenarios = results.get("scenarios") or {}
    rows = [
        [f.label, _n(f.read(scenarios), f.digits, f.unit), f.goal,
         _verdict(f.met(scenarios))]
        for f in spread.FIGURES if f.met is not None
    ]
    return _table(["target", "measured", "goal", "met"], rows)


def spread_title(results: dict[str, Any]) -> str | None:
    """The spread section's title, or ``None`` for a single run (no spread to show)."""
    n = len(spread.runs_of(results))
    return f"Spread over {n} runs" if n > 1 else None


def _sizes(results: dict[str, Any]) -> str:
    """The sizes of the scenarios that ran (the method section has the rest)."""
    p = results.get("params", {})
    ran = {name for run in spread.runs_of(results) for name in run}
    sizes = {
        "drain": f"ceilings and drains of {_n(p.get('drain_events'))} events "
                 f"({p.get('drain_pairs')} drains per run)",
        "steady": f"steady levels of {p.get('steady_seconds')} s after "
                  f"{p.get('steady_warmup')} s",
        "consumers": f"{_n(p.get('consumer_pairs'))} billing pairs",
        "pipeline": f"pipeline windows of {p.get('pipeline_window')} s after "
                    f"{p.get('pipeline_warmup')} s at "
                    f"{', '.join(_n(r) for r in p.get('pipeline_levels') or [])} events/s, "
                    f"{_n(p.get('pipeline_webhook_events'))}-event webhook backlogs, a "
                    f"{_n(p.get('pipeline_ceiling_events'))}-event round trip",
        "rss": f"a {_n(p.get('rss_events'))}-event RSS drain",
    }
    return "; ".join(text for name, text in sizes.items() if name in ran) or "—"


def spread_table(results: dict[str, Any]) -> str:
    """Min, median and max of every headline figure over the runs, and targets met."""
    runs = results.get("runs") or []
    lines = [
        f"{len(runs)} runs of `{results.get('command')}` in one invocation, one after the "
        "other, each in its own database and vhost on the same PostgreSQL server; the other "
        f"tables show the last run. Sizes: {_sizes(results)}. Runs: "
        + "; ".join(f"{i + 1}. {r.get('started_at')} to {r.get('finished_at')}"
                    for i, r in enumerate(runs)) + ".",
        "",
    ]
    rows = []
    for s in spread.spread(spread.runs_of(results)):
        f = s.figure
        rows.append([f.label, _n(s.low, f.digits, f.unit), _n(s.median, f.digits, f.unit),
                     _n(s.high, f.digits, f.unit), ", ".join(_n(v, f.digits) for v in s.values),
                     f.goal or "—", "—" if s.met is None else f"{s.met} of {len(s.values)}"])
    lines.append(_table(["figure", "min", "median", "max", "per run, in order", "target",
                         "runs that met it"], rows))
    return "\n".join(lines)


def broker_vs_relay(results: dict[str, Any]) -> str:
    """The interleaved ceilings and drains in the order they ran, with CPU per event."""
    ceiling = _scenario(results, "ceiling")
    drain = _scenario(results, "drain")

    def cpu(step: dict[str, Any], name: str) -> str:
        return _n((step.get("cpu_us_per_event") or {}).get(name), 0)

    def load(step: dict[str, Any]) -> str:
        return _n((step.get("load_average") or [None])[0], 1)

    rows = [["broker ceiling (Node amqplib), warmed up", _n(ceiling.get("rate"), 0), "—",
             "—", cpu(ceiling, "rabbitmq"), cpu(ceiling, "publisher"), "—",
             cpu(ceiling, "machine"),
             _n(ceiling.get("machine_busy_cores"), 2), load(ceiling)]]
    for i, pair in enumerate(drain.get("pairs") or []):
        after = {"cpu_us_per_event": pair.get("ceiling_after_cpu_us_per_event")}
        rows.append([
            f"relay backlog drain {i + 1} ({_n(pair.get('events'))} events, window "
            f"{_n(pair.get('relay_window'))})",
            _n(pair.get("rate"), 0), _n(pair.get("ratio_to_ceiling"), 2, "x"),
            _n(pair.get("relay_cpu_cores"), 2), cpu(pair, "rabbitmq"), cpu(pair, "relay"),
            cpu(pair, "postgres"), cpu(pair, "machine"), _n(pair.get("machine_busy_cores"), 2),
            load(pair),
        ])
        rows.append([f"broker ceiling again, after drain {i + 1}",
                     _n(pair.get("ceiling_after"), 0), "—", "—", cpu(after, "rabbitmq"),
                     cpu(after, "publisher"), "—", cpu(after, "machine"), "—", "—"])
    rows.append(["**relay / ceiling, median of the paired ratios**", _n(drain.get("rate"), 0),
                 _n(drain.get("ratio_to_ceiling"), 2, "x") + " (range "
                 + " to ".join(_n(r, 2, "x") for r in drain.get("ratio_range") or []) + ")",
                 _n(drain.get("relay_cpu_cores"), 2), "", "", "", "", "", ""])
    for window, paired in (drain.get("by_relay_window") or {}).items():
        if len(drain.get("by_relay_window") or {}) > 1:
            rows.append([f"relay window {window}: median of paired ratios", "",
                         _n(paired.get("median"), 2, "x") + " ("
                         + ", ".join(_n(r, 2, "x") for r in paired.get("ratios") or []) + ")",
                         "", "", "", "", "", "", ""])
    return _table(["step (in order)", "events/s", "x ceilings before/after",
                   "relay CPU (cores)", "RabbitMQ µs/ev", "relay (or Node publisher) µs/ev",
                   "PostgreSQL µs/ev",
                   "machine µs/ev (everyone)", "machine busy cores", "load (1 min)"], rows)


def _div(a: Any, b: Any) -> float | None:
    return round(a / b, 3) if a and b else None


def steady_table(results: dict[str, Any]) -> str:
    levels = _scenario(results, "steady").get("levels", {})
    rows = []
    for key, level in levels.items():
        lat = level.get("latency", {})
        hist = level.get("relay_histogram", {})
        rows.append([
            key, _n(level.get("target_rate")), _n(level.get("offered_rate")),
            _n(level.get("delivered_rate")), _n(lat.get("p50_ms"), 1), _n(lat.get("p95_ms"), 1),
            _n(lat.get("p99_ms"), 1), _n(hist.get("p50_ms"), 1), _n(hist.get("p99_ms"), 1),
            _n(level.get("relay_cpu_cores"), 2), _n(_mb(level.get("relay_rss_max_mib")), 1),
        ])
    return _table(["load", "target ev/s", "offered", "delivered", "p50 ms", "p95 ms", "p99 ms",
                   "relay p50 ms", "relay p99 ms", "relay CPU", "relay RSS MB"], rows)


def seed_table(results: dict[str, Any]) -> str:
    seed = _scenario(results, "seed")
    rows = []
    for label, key in (("seed poller (one by one)", "poller"),
                       ("seed poller, batched plan", "batched")):
        v = seed.get(key, {})
        rows.append([label, _n(v.get("throughput"), 1), _n(v.get("latency", {}).get("p50_ms"), 0),
                     _n(v.get("latency", {}).get("p95_ms"), 0)])
    relay = seed.get("relay_same_load", {})
    rows.append(["outbox-cdc relay", _n(seed.get("relay_throughput"), 0),
                 _n(relay.get("latency", {}).get("p50_ms"), 1),
                 _n(relay.get("latency", {}).get("p95_ms"), 1)])
    ratios = seed.get("ratios", {})
    rows.append(["**relay ÷ poller**", _n(ratios.get("throughput_vs_poller"), 0, "x"),
                 _n(ratios.get("median_latency_poller_over_relay"), 0, "x lower"), ""])
    rows.append(["**relay ÷ batched poller**", _n(ratios.get("throughput_vs_batched"), 0, "x"),
                 _n(ratios.get("median_latency_batched_over_relay"), 0, "x lower"), ""])
    return _table(["relay", "throughput ev/s", "median latency ms", "p95 ms"], rows)


def shape_table(results: dict[str, Any]) -> str:
    rows = []
    for point in _scenario(results, "shape").get("points", []):
        lat = point.get("latency", {})
        rows.append([
            _n(point.get("payload_bytes"), 0, " B"), _n(point.get("rows_per_txn")),
            _n(point.get("drain_rate"), 0), _n(lat.get("p50_ms"), 1), _n(lat.get("p99_ms"), 1),
            _n(point.get("relay_histogram", {}).get("p99_ms"), 1),
        ])
    return _table(["payload", "rows/txn", "drain ev/s", "p50 ms", "p99 ms", "relay p99 ms"],
                  rows)


def rss_table(results: dict[str, Any]) -> str:
    rss = _scenario(results, "rss")
    drained = "yes" if rss.get("complete") else (
        f"**cut** at {_n(rss.get('cut_after_s'), 0)} s ({_n(rss.get('published'))} published)"
    )
    rows = [[_n(rss.get("events")), drained,
             _n(rss.get("seconds"), 0, " s"), _n(rss.get("rate_incl_startup"), 0),
             _n(_mb(rss.get("rss_first_mib")), 1), _n(_mb(rss.get("rss_max_mib")), 1),
             _n(_mb(rss.get("rss_last_mib")), 1),
             _n(_mb(rss.get("rss_growth_second_half_mib")), 1), _n(rss.get("rss_samples"))]]
    return _table(["events", "drained", "time", "ev/s (incl. start)", "RSS first MB",
                   "RSS max MB", "RSS last MB", "2nd-half peak - 1st-half peak MB", "samples"],
                  rows)


def consumers_table(results: dict[str, Any]) -> str:
    cons = _scenario(results, "consumers")
    if not cons.get("available", False):
        reason = cons.get("reason") or cons.get("error") or "not run"
        return f"Not available in this run: {reason}."
    rows = []
    for key in ("one", "two"):
        v = cons.get(key) or {}
        if "error" in v:
            rows.append([key, v["error"], "", "", "", ""])
            continue
        if v.get("complete", True):
            exact = "yes" if v.get("exact") else "**no**"
        else:
            exact = (f"**incomplete**: {_n(v.get('usage_records'))} of "
                     f"{_n(v.get('expected_records'))} records after {_n(v.get('seconds'), 0)} s")
        rows.append([_n(v.get("replicas")), _n(v.get("deliveries")), _n(v.get("events_per_s"), 0),
                     _n(v.get("events_per_s_per_replica"), 0), _n(v.get("seconds"), 1), exact])
    return _table(["replicas", "deliveries (10% duplicates)", "events/s", "per replica",
                   "seconds", "exact effects"], rows)


def pipeline_table(results: dict[str, Any]) -> str:
    pipe = _scenario(results, "pipeline")
    if not pipe.get("available", False):
        return f"Not available in this run: {pipe.get('reason') or pipe.get('error') or 'not run'}."
    ceiling = pipe.get("ceiling") or {}
    linger = (results.get("params") or {}).get("pipeline_publish_linger")
    out = [
        f"The relay runs with `CDC_PUBLISH_LINGER={_n(linger, 2)}` (the default is 0).",
        "",
        f"Broker round trip for the same topology (quorum fan-out, trivial consumers): "
        f"{_n(ceiling.get('rate'), 0)} events/s, RabbitMQ "
        f"{_n(ceiling.get('broker_cpu_us_per_event'), 0)} µs CPU per event.",
    ]
    floor = pipe.get("broker_at_target") or {}
    if floor:
        out.append(
            f"The broker alone at the pipeline's target, paced at a quarter of that "
            f"({_n(floor.get('rate'), 0)} events/s, in groups of 10, consumers acking "
            f"batches): RabbitMQ {_n(floor.get('broker_cpu_us_per_event'), 0)} µs CPU per "
            f"event, {_n(floor.get('broker_cores'), 2)} of the 2 cores (the whole machine "
            f"{_n(floor.get('machine_busy_cores'), 2)} cores busy)."
        )
    out.append("")
    rows = []
    for key, label in (("one", "1 replica each"), ("two", "2 replicas each")):
        v = pipe.get(key) or {}
        half = v.get("at_half") or {}
        cpu = half.get("cpu_us_per_event") or {}

        def lat(effect: str, half: dict[str, Any] = half) -> str:
            e = half.get(effect) or {}
            return f"{_n(e.get('p50_ms'), 0)} / {_n(e.get('p95_ms'), 0)} / {_n(e.get('p99_ms'), 0)}"

        rows.append([
            label, _n(v.get("sustained_rate"), 0), _n(v.get("ratio_to_ceiling"), 2, "x"),
            _n(half.get("target_rate"), 0), lat("billing"), lat("webhook"), lat("in_app"),
            ", ".join(f"{k} {_n(c, 0)}" for k, c in cpu.items()),
            _n(half.get("cpu_us_per_event_total"), 0),
        ])
    out.append(_table(
        ["workers", "sustained ev/s (p99 < 1 s)", "x ceiling", "at ev/s",
         "usage record p50/p95/p99 ms", "webhook p50/p95/p99 ms", "in-app p50/p95/p99 ms",
         "CPU µs/event per process", "pipeline µs/event"], rows))
    hook_rows = []
    for key, label in (("webhooks_healthy", "all endpoints healthy"),
                       ("webhooks_10pct_dead", "10% of endpoints never answer")):
        v = pipe.get(key) or {}
        hook_rows.append([label, _n(v.get("webhooks_per_s"), 0),
                          _n(v.get("worker_cpu_us_per_webhook"), 0),
                          _n(v.get("delivered")), _n(v.get("posts"))])
    out += ["", _table(["notifications worker alone", "webhooks/s", "worker µs/webhook",
                        "delivered", "POSTs"], hook_rows)]
    drains = pipe.get("webhook_drains")
    if drains:
        out += ["", "Webhook drains in order (the table shows those with the median rate, "
                "the lower of two): "
                f"healthy {', '.join(_n(r, 0) for r in drains['healthy_per_s'])}; 10% dead "
                f"{', '.join(_n(r, 0) for r in drains['dead_per_s'])}; each dead drain over "
                "the mean of the healthy ones around it: "
                f"{', '.join(_n(r, 2, 'x') for r in drains['dead_ratios'])}."]
    return "\n".join(out)


#: (title, table, the scenarios it shows)
SECTIONS = (
    ("Targets", targets, ()),
    ("Broker ceiling and backlog drain", broker_vs_relay, ("ceiling", "drain")),
    ("Steady load (latency = consumer arrival - commit_time)", steady_table, ("steady",)),
    ("Seed baseline", seed_table, ("seed",)),
    ("Shape: payload size and transaction size", shape_table, ("shape",)),
    ("RSS through a large backlog", rss_table, ("rss",)),
    ("Consumers: billing worker", consumers_table, ("consumers",)),
    ("Pipeline: relay, billing and notifications together", pipeline_table, ("pipeline",)),
)


def _sections(results: dict[str, Any]) -> tuple[Any, ...]:
    """``SECTIONS``, with the spread after the targets when the run was repeated."""
    title = spread_title(results)
    if title is None:
        return SECTIONS
    return (SECTIONS[0], (title, spread_table, ()), *SECTIONS[1:])


def _errors(results: dict[str, Any]) -> str:
    failed = [f"- `{name}`: {v['error']}" for name, v in results.get("scenarios", {}).items()
              if isinstance(v, dict) and "error" in v]
    return "\n".join(failed)


def text_summary(results: dict[str, Any]) -> str:
    """Every table, as printed at the end of a run."""
    parts = [f"\n== outbox-cdc benchmarks, {results.get('started_at')}"
             f"{' (QUICK: small sizes, noisy)' if results.get('quick') else ''}"]
    ran = results.get("scenarios", {})
    for title, render, shows in _sections(results):
        if not shows or any(name in ran for name in shows):
            parts += [f"\n-- {title}", render(results)]
    errors = _errors(results)
    if errors:
        parts += ["\n-- Scenarios that failed", errors]
    parts.append(f"\n(scenarios run: {', '.join(ran)})")
    return "\n".join(parts)


def plot(results: dict[str, Any], path: Path) -> bool:
    """Throughput and p99 latency against offered load; ``False`` if there is no data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = list(_scenario(results, "steady").get("levels", {}).values())
    if not levels:
        return False
    offered = [lv.get("offered_rate") or 0 for lv in levels]
    delivered = [lv.get("delivered_rate") or 0 for lv in levels]
    p99 = [lv.get("latency", {}).get("p99_ms") for lv in levels]
    p50 = [lv.get("latency", {}).get("p50_ms") for lv in levels]
    hist99 = [lv.get("relay_histogram", {}).get("p99_ms") for lv in levels]
    ceiling = _scenario(results, "ceiling").get("rate")
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6))
    left.plot(offered, delivered, "o-", label="relay, delivered")
    top = max([*offered, *delivered, ceiling or 0]) * 1.1
    left.plot([0, top], [0, top], ":", color="grey", label="delivered = offered")
    if ceiling:
        left.axhline(ceiling, color="tab:red", linestyle="--", label="broker ceiling")
    left.set_xlabel("offered load (events/s)")
    left.set_ylabel("throughput (events/s)")
    left.set_xlim(0, top)
    left.set_ylim(0, top)
    left.legend(loc="best", fontsize="small")
    left.set_title("Throughput")
    for values, style, label in (
        (p99, "o-", "p99, commit→consumer"),
        (p50, "s-", "p50, commit→consumer"),
        (hist99, "^--", "p99, commit→confirm (relay histogram)"),
    ):
        points = [(x, y) for x, y in zip(offered, values, strict=True) if y]
        if points:
            right.plot(*zip(*points, strict=True), style, label=label)
    right.axhline(25, color="tab:red", linestyle="--", label="target: p99 ≤ 25 ms at 50%")
    right.set_xlabel("offered load (events/s)")
    right.set_ylabel("latency (ms, log scale)")
    right.set_yscale("log")
    right.set_ylim(bottom=1)
    right.set_xlim(0, top)
    right.legend(loc="best", fontsize="small")
    right.set_title("Latency")
    commit = (results.get("machine", {}).get("relay", {}).get("commit") or "?")[:10]
    fig.suptitle(f"outbox-cdc relay, {results.get('started_at')}, relay {commit}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _machine(results: dict[str, Any]) -> str:
    m = results.get("machine", {})
    relay = m.get("relay", {})
    rows = [
        ["CPU", f"{m.get('cpu_model')}, {m.get('cores')} cores"],
        ["RAM", f"{m.get('ram_gib')} GiB"],
        ["OS", str(m.get("os"))],
        ["PostgreSQL", f"{m.get('postgresql')} "
                       f"(synchronous_commit={m.get('postgresql_synchronous_commit')})"],
        ["RabbitMQ", str(m.get("rabbitmq"))],
        ["Python", str(m.get("python"))],
        ["Node / amqplib", f"{m.get('node')} / {m.get('amqplib')}"],
        ["relay measured", f"`{relay.get('commit')}` ({relay.get('branch')}"
                           f"{', with local changes' if relay.get('dirty') else ''})"],
    ]
    host = _scenario(results, "host")
    if host:
        rows.append(["host speed probe (the run shown)",
                     f"{_n(host.get('probe_ms_start'), 1)} ms before, "
                     f"{_n(host.get('probe_ms_end'), 1)} ms after (lower is faster)"])
    return _table(["", ""], rows)


def _origin(results: dict[str, Any], quick: str) -> str:
    runs = len(spread.runs_of(results))
    if runs == 1:
        return (f"Generated by the harness from one run started **{results.get('started_at')}"
                f"** (finished {results.get('finished_at')}){quick}. Every ratio below comes "
                "from that single run on the same machine.")
    return (f"Generated by the harness from {runs} runs in one invocation started "
            f"**{results.get('started_at')}** (finished {results.get('finished_at')}){quick}. "
            "The spread table covers every run; the other tables show the last one.")


def markdown(results: dict[str, Any], notes: str) -> str:
    """The whole ``docs/benchmarks.md``."""
    p = results.get("params", {})
    quick = " — **quick run (small sizes): indicative only**" if results.get("quick") else ""
    out = [
        "# Benchmarks",
        "",
        _origin(results, quick) + " The machine is small and shared, so read the "
        "figures as ratios rather than promises.",
        "",
        "Reproduce (not part of `make test`; installs the `bench` extra and the locked npm "
        "packages, then runs every scenario in about 15 minutes):",
        "",
        "```sh",
        "make bench                                  # = .venv/bin/python -m bench",
        "make bench BENCH_ARGS='--quick'             # small sizes, for development",
        "make bench BENCH_ARGS='--only drain,steady' # by name (the ceiling runs too)",
        "make bench BENCH_ARGS='--repeat 3 --only drain,steady,consumers,pipeline "
        "--pipeline-window 20'  # three runs in one go: the spread of every figure",
        "```",
        "",
        f"This run: `{results.get('command')}`. Raw figures: `bench/results/*.json`.",
        "",
        "## Machine",
        "",
        _machine(results),
        "",
    ]
    for title, render, _shows in _sections(results):
        out += [f"## {title}", "", render(results), ""]
        if title.startswith("Steady"):
            out += [f"![throughput and p99 latency against offered load]({PLOT_NAME})", ""]
    errors = _errors(results)
    if errors:
        out += ["## Scenarios that failed in this run", "", errors, ""]
    out += [
        "## How each figure is measured",
        "",
        "- **Host speed probe**: the milliseconds a fixed piece of work takes (pure-Python "
        "dict and string operations, then SHA-256 over 4 MB), best of 5, before and after "
        "each run's scenarios while nothing else of the run is running. The host is a shared "
        "virtual machine whose speed drifts; runs whose probes differ are not comparable "
        "figure for figure, only as ratios within each run.",
        f"- **Broker ceiling**: Node amqplib publishes {_n(p.get('drain_events'))} messages "
        f"of {p.get('payload_size')} B, persistent, `mandatory`, publisher confirms with "
        f"{p.get('window')} unconfirmed at most (the relay runs at its own default window), "
        "with the relay's "
        "properties and headers, into a topic exchange bound to one durable classic queue "
        "nobody reads. Rate = queue depth sampled every 50 ms, from the last empty sample to "
        "the first full one.",
        f"- **Backlog drain**: the same number of events committed first "
        f"({p.get('backlog_rows_per_txn')} rows per transaction, {p.get('payload_size')} B "
        "payloads), then `cdc relay` starts; the same depth sampling on the same kind of "
        "queue, so start-up is excluded and the ratio compares like with like. Ceilings and "
        f"drains alternate (C D C D .., {p.get('drain_pairs')} drains); each drain's ratio "
        "is to the mean of the ceilings right before and after it, and the headline is the "
        "median of those paired ratios. CPU per event: psutil CPU seconds of the RabbitMQ "
        "node, the relay, the run database's PostgreSQL backends (the walsender) and the "
        "whole machine (everyone's) over the drain after start-up, per event drained.",
        f"- **Steady load**: a paced writer commits {p.get('steady_rows_per_txn')}-row "
        f"transactions at 25/50/75% of the ceiling measured in the run, "
        f"{p.get('steady_seconds')} s per level after {p.get('steady_warmup')} s of warm-up. "
        "Latency = arrival at an auto-ack Node consumer of the bound queue minus the "
        "`commit_time` header (the commit time of the Begin message; same clock). The relay's "
        "own `cdc_confirm_latency_seconds` histogram (commit → broker confirm) is shown beside "
        "it, interpolated within its buckets. CPU and RSS: psutil on the relay process.",
        f"- **Seed baseline**: `bench/seed_poller.py` re-implements the seed report's relay: a "
        f"tick every {p.get('seed_poll_interval')} s (skipped while one runs), `status = "
        f"'pending'` rows oldest first, LIMIT {p.get('seed_poll_limit')} (the report gives no "
        "batch size; assumed), published one by one with confirms, marked `published`, or "
        "`retry_count + 1` with the error and `failed` at the third failure. The batched "
        "variant is the report's plan: groups of 10 published concurrently, one UPDATE per "
        f"group. Throughput = confirmed deliveries from a standing backlog over "
        f"{p.get('seed_polls')} ticks; latency = consumer arrival minus `created_at` at "
        f"{p.get('seed_rate')} events/s, one row per transaction, measured the same way for "
        "the relay.",
        f"- **Shape**: for each payload size ({p.get('backlog_rows_per_txn')} rows/txn) and "
        f"each transaction size ({p.get('payload_size')} B), a {_n(p.get('shape_events'))}"
        f"-event backlog drain, then {p.get('shape_rate')} events/s offered for "
        f"{p.get('shape_seconds')} s for latency (at most 10 rows per transaction).",
        f"- **RSS**: a {_n(p.get('rss_events'))}-event backlog drained while psutil samples "
        "the relay's RSS every 0.5 s; done when the slot's `confirmed_flush_lsn` passes the "
        f"end of the backlog. The queue keeps only the newest {_n(p.get('rss_queue_cap'))} "
        "messages (drop-head; still persisted and confirmed). Cut after "
        f"{_n(p.get('rss_max_seconds'))} s; the RSS figures then cover what was drained.",
        f"- **Consumers**: {_n(p.get('consumer_pairs'))} `device.started`/`device.stopped` "
        "pairs (a session starts every second, lasts 60 s) in event-time order, 10% of them "
        "delivered twice right after the first, published into the billing worker's queues; "
        "then `python -m consumers billing` (1, then 2 replicas) drains them; events/s from "
        "the first usage record until `usage_records` holds every session; exact = one "
        f"record per pair and the expected total cost. Cut after "
        f"{_n(p.get('consumer_max_seconds'))} s.",
        "- **Pipeline**: `bench/scenario_pipeline.py` (its docstring has the whole method): "
        "the relay and both workers on their quorum topology (the relay with "
        f"`CDC_PUBLISH_LINGER={_n(p.get('pipeline_publish_linger'), 2)}`, default 0: it "
        "writes that many seconds of transactions to the broker at once), a paced mix of "
        "the seed's event types at rising rates ("
        f"{', '.join(_n(r) for r in p.get('pipeline_levels') or [])} events/s, "
        f"{p.get('pipeline_window')} s windows), effects timed from "
        "the outbox row's `created_at` to billing's inbox row, the webhook's arrival at a "
        f"receiver answering in {p.get('pipeline_webhook_latency')} s, and the in-app row; "
        "CPU per event from psutil over each window (PostgreSQL: the backends of the run's "
        "database, i.e. the relay's walsender and the workers' sessions). Webhook "
        "throughput: one notifications replica drains a backlog of device events published "
        "while it is paused (SIGSTOP), so the rate is the worker's and not the publisher's; "
        "webhooks/s between the first and the last healthy arrival, CPU over the drain; "
        "healthy and 10%-dead drains alternate H D H D H, each dead drain's rate over the "
        "mean of the healthy ones that bracket it, the median of those ratios reported and "
        "the drains with the median rate (the lower of two) shown. "
        "The broker alone at the target: the round trip's publisher paced at a quarter of "
        "the round trip's rate, in groups of 10 (the writer's transactions), its consumers "
        "acking batches of 100 or every 10 ms (as the workers do), "
        f"{p.get('pipeline_window')} s.",
        "",
        "Each scenario uses its own table, publication, slot, exchange and queues in a "
        "throwaway database and RabbitMQ vhost, removed at the end even on failure or Ctrl-C.",
        "",
        notes,
        "",
    ]
    return "\n".join(out)


def write_docs(results: dict[str, Any], docs_dir: Path) -> list[Path]:
    """Write ``benchmarks.md`` (keeping its notes section) and the PNG; returns the paths."""
    docs_dir.mkdir(parents=True, exist_ok=True)
    page = docs_dir / "benchmarks.md"
    notes = "<!-- notes -->\n<!-- /notes -->"
    if page.exists():
        found = _NOTES_RE.search(page.read_text())
        if found:
            notes = found.group(0)
    written = []
    if plot(results, docs_dir / PLOT_NAME):
        written.append(docs_dir / PLOT_NAME)
    page.write_text(markdown(results, notes))
    written.append(page)
    return written


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else Path(__file__).parent / "results" / "latest.json"
    results = json.loads(source.read_text())
    for path in write_docs(results, Path(__file__).resolve().parent.parent / "docs"):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
