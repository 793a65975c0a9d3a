"""The spread of the headline figures over the runs of one ``--repeat N`` invocation.

Pure aggregation over the saved JSON: each ``Figure`` reads one number from a run's
scenarios (``None`` when the scenario did not run or did not produce it) and, when the
issue sets a target for it, says whether that run met it. ``spread`` gives min, median and
max over the runs that produced the figure and how many runs met the target.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Scenarios = dict[str, Any]

#: Processes whose CPU per event the pipeline reports at its measured level.
PIPELINE_PROCESSES = ("relay", "billing", "notifications", "rabbitmq", "postgres", "receiver")


@dataclass(frozen=True, slots=True)
class Figure:
    """One headline figure: where it is in a run, how to print it, and its target."""

    label: str
    scenario: str  # the figure exists in a run if this scenario ran, even with no value
    read: Callable[[Scenarios], float | None]
    unit: str = ""
    digits: int = 0
    goal: str = ""
    met: Callable[[Scenarios], bool | None] | None = None


@dataclass(frozen=True, slots=True)
class Spread:
    """A figure over the runs: ``values`` in run order (``None`` where it is missing)."""

    figure: Figure
    values: tuple[float | None, ...]
    low: float | None  # None: no run produced a value (the scenario ran, e.g. nothing held)
    median: float | None
    high: float | None
    met: int | None  # runs that met the target (a missing value never does); None: no target


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        tree = tree.get(key) if isinstance(tree, dict) else None
    return tree


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _at(*path: str) -> Callable[[Scenarios], float | None]:
    return lambda scenarios: _number(_get(scenarios, *path))


def _mb(*path: str) -> Callable[[Scenarios], float | None]:
    def read(scenarios: Scenarios) -> float | None:
        mib = _at(*path)(scenarios)
        return None if mib is None else mib * 2**20 / 1e6
    return read


def _drain_cpu(process: str) -> Callable[[Scenarios], float | None]:
    """Median over the run's drains of ``process``'s CPU µs per event."""
    def read(scenarios: Scenarios) -> float | None:
        values = [_number(_get(pair, "cpu_us_per_event", process))
                  for pair in _get(scenarios, "drain", "pairs") or []]
        found = [v for v in values if v is not None]
        return statistics.median(found) if found else None
    return read


def _steady_rss(scenarios: Scenarios) -> float | None:
    """The relay's largest RSS over the steady levels, MB."""
    levels = (_get(scenarios, "steady", "levels") or {}).values()
    found = [v for v in (_number(_get(lv, "relay_rss_max_mib")) for lv in levels) if v is not None]
    return max(found) * 2**20 / 1e6 if found else None


def _check(read: Callable[[Scenarios], float | None], ok: Callable[[float], bool]
           ) -> Callable[[Scenarios], bool | None]:
    def met(scenarios: Scenarios) -> bool | None:
        value = read(scenarios)
        return None if value is None else ok(value)
    return met


def _figure(label: str, read: Callable[[Scenarios], float | None] | tuple[str, ...],
            unit: str = "", digits: int = 0, goal: str = "",
            ok: Callable[[float], bool] | None = None, scenario: str = "") -> Figure:
    """A figure read at a path of keys (its first key is the scenario) or by a function."""
    if isinstance(read, tuple):
        scenario, read = read[0], _at(*read)
    return Figure(label, scenario, read, unit, digits, goal,
                  None if ok is None else _check(read, ok))


def _billing_met(scenarios: Scenarios) -> bool | None:
    """≥ 2,000 events/s with one replica, and exact effects."""
    rate = _at("consumers", "one", "events_per_s_per_replica")(scenarios)
    exact = _get(scenarios, "consumers", "one", "exact")
    return None if rate is None else rate >= 2000 and exact is True


def _rss_met(scenarios: Scenarios) -> bool | None:
    """Under 150 MB through the whole backlog (a cut drain proves nothing)."""
    mb = _mb("rss", "rss_max_mib")(scenarios)
    return None if mb is None else mb < 150 and _get(scenarios, "rss", "complete") is True


_HALF = ("pipeline", "one", "at_half")
FIGURES: tuple[Figure, ...] = (
    _figure("host speed probe before the run, ms (fixed work; lower is faster)",
            ("host", "probe_ms_start"), "", 1),
    _figure("host speed probe after the run, ms", ("host", "probe_ms_end"), "", 1),
    _figure("backlog drain / broker ceiling (median of paired ratios)",
            ("drain", "ratio_to_ceiling"), "x", 2, "≥ 0.95x", lambda v: v >= 0.95),
    _figure("broker ceiling, events/s", ("ceiling", "rate")),
    _figure("p99 commit→consumer at 50% of the ceiling",
            ("steady", "levels", "50%", "latency", "p99_ms"), " ms", 1, "≤ 25 ms",
            lambda v: v <= 25),
    _figure("p99 commit→confirm at 50% (relay histogram)",
            ("steady", "levels", "50%", "relay_histogram", "p99_ms"), " ms", 1, "≤ 25 ms",
            lambda v: v <= 25),
    _figure("pipeline sustained rate, events/s (1 replica each)",
            ("pipeline", "one", "sustained_rate")),
    _figure("pipeline sustained rate / broker round trip",
            ("pipeline", "one", "ratio_to_ceiling"), "x", 2, "≥ 0.25x", lambda v: v >= 0.25),
    _figure("pipeline: broker round trip for the same topology, events/s",
            ("pipeline", "ceiling", "rate")),
    _figure("pipeline: RabbitMQ alone paced at 0.25x of its round trip, CPU µs/event",
            ("pipeline", "broker_at_target", "broker_cpu_us_per_event")),
    _figure("pipeline: RabbitMQ alone paced at 0.25x of its round trip, cores",
            ("pipeline", "broker_at_target", "broker_cores"), "", 2),
    _figure("pipeline: the measured level (50% of sustained, ≥ 500), events/s",
            (*_HALF, "target_rate")),
    _figure("p99 commit→usage record at the measured level", (*_HALF, "billing", "p99_ms"),
            " ms", 1, "≤ 100 ms at ≥ 500/s", lambda v: v <= 100),
    _figure("p99 commit→webhook at the measured level", (*_HALF, "webhook", "p99_ms"),
            " ms", 1, "≤ 150 ms at ≥ 500/s", lambda v: v <= 150),
    _figure("webhooks/s per replica, all endpoints healthy",
            ("pipeline", "webhooks_healthy", "webhooks_per_s"), "", 0, "≥ 2,000",
            lambda v: v >= 2000),
    _figure("webhooks/s with 10% of endpoints timing out / all healthy",
            ("pipeline", "webhooks_dead_ratio"), "x", 2, "≥ 0.9x", lambda v: v >= 0.9),
    _figure("throughput vs the seed poller", ("seed", "ratios", "throughput_vs_poller"),
            "x", 0, "≥ 20x", lambda v: v >= 20),
    _figure("median latency, poller / relay",
            ("seed", "ratios", "median_latency_poller_over_relay"), "x", 0, "≥ 100x",
            lambda v: v >= 100),
    Figure("billing events/s, 1 replica", "consumers", _at("consumers", "one", "events_per_s"),
           "", 0, "≥ 2,000, exact", _billing_met),
    _figure("billing events/s, 2 replicas", ("consumers", "two", "events_per_s")),
    *(_figure(f"CPU µs/event in the drains: {name}", _drain_cpu(process), scenario="drain")
      for name, process in (("relay", "relay"), ("RabbitMQ", "rabbitmq"),
                            ("PostgreSQL", "postgres"))),
    _figure("CPU µs/event, broker ceiling: Node publisher",
            ("ceiling", "cpu_us_per_event", "publisher")),
    *(_figure(f"CPU µs/event, pipeline at the measured level: {process}",
              (*_HALF, "cpu_us_per_event", process)) for process in PIPELINE_PROCESSES),
    _figure("CPU µs/event, pipeline at the measured level: all but the receiver",
            (*_HALF, "cpu_us_per_event_total")),
    _figure("CPU µs per webhook, notifications worker (healthy)",
            ("pipeline", "webhooks_healthy", "worker_cpu_us_per_webhook")),
    _figure("relay RSS max in the drains, MB", _mb("drain", "relay_rss_max_mib"), "", 1,
            scenario="drain"),
    _figure("relay RSS max under steady load, MB", _steady_rss, "", 1, scenario="steady"),
    Figure("relay RSS max, large-backlog drain, MB", "rss", _mb("rss", "rss_max_mib"), "", 1,
           "< 150 MB, drained", _rss_met),
)


def runs_of(results: dict[str, Any]) -> list[Scenarios]:
    """Each run's scenarios: ``runs`` of a ``--repeat`` result, else its one run."""
    runs = results.get("runs")
    if isinstance(runs, list) and runs:
        return [run.get("scenarios") or {} for run in runs]
    return [results.get("scenarios") or {}]


def spread(runs: list[Scenarios], figures: tuple[Figure, ...] = FIGURES) -> list[Spread]:
    """Min, median, max and targets met of every figure whose scenario some run ran."""
    out = []
    for figure in figures:
        if not any(figure.scenario in run for run in runs):
            continue
        values = tuple(figure.read(run) for run in runs)
        found = [v for v in values if v is not None]
        met = None if figure.met is None else sum(figure.met(run) is True for run in runs)
        out.append(Spread(figure, values, min(found, default=None),
                          statistics.median(found) if found else None,
                          max(found, default=None), met))
    return out
