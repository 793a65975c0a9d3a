"""The spread of the headline figures over repeated harness runs (bench/spread.py), on the
JSON of real runs: ``quick-one-run.json`` (one ``--quick`` run of drain, steady, consumers
and pipeline on a loaded machine) and ``quick-repeat-2.json`` (the same with ``--repeat 2``)."""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.__main__ import command_line, params
from bench.machine import speed_probe_ms
from bench.spread import FIGURES, Figure, runs_of, spread

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "bench"


def _load(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / name).read_text()))


@pytest.fixture(scope="module")
def one() -> dict[str, Any]:
    return _load("quick-one-run.json")


@pytest.fixture(scope="module")
def repeated() -> dict[str, Any]:
    return _load("quick-repeat-2.json")


def _figure(label: str) -> Figure:
    return next(f for f in FIGURES if f.label == label)


DRAIN = "backlog drain / broker ceiling (median of paired ratios)"


def test_a_single_run_is_its_own_spread(one):
    runs = runs_of(one)
    assert runs == [one["scenarios"]]
    rows = {s.figure.label: s for s in spread(runs)}
    ratio = one["scenarios"]["drain"]["ratio_to_ceiling"]
    drain = rows[DRAIN]
    assert (drain.low, drain.median, drain.high) == (ratio, ratio, ratio)
    assert drain.met == int(ratio >= 0.95)
    ceiling = rows["broker ceiling, events/s"]
    assert ceiling.median == one["scenarios"]["ceiling"]["rate"]
    assert ceiling.met is None  # no target


def test_every_run_of_a_repeat_counts(repeated):
    runs = runs_of(repeated)
    assert len(runs) == repeated["repeat"] == 2
    assert runs[-1] == repeated["scenarios"]  # the tables show the last run
    ratios = [run["drain"]["ratio_to_ceiling"] for run in runs]
    drain = {s.figure.label: s for s in spread(runs)}[DRAIN]
    assert drain.values == tuple(ratios)
    assert (drain.low, drain.median, drain.high) == (
        min(ratios), statistics.median(ratios), max(ratios))
    assert drain.met == sum(r >= 0.95 for r in ratios)


def test_runs_of_different_invocations_combine(one, repeated):
    runs = [one["scenarios"], *runs_of(repeated)]
    rates = sorted(run["consumers"]["one"]["events_per_s"] for run in runs)
    billing = {s.figure.label: s for s in spread(runs)}["billing events/s, 1 replica"]
    assert (billing.low, billing.median, billing.high) == (rates[0], rates[1], rates[2])
    assert billing.met == sum(
        run["consumers"]["one"]["events_per_s_per_replica"] >= 2000
        and run["consumers"]["one"]["exact"] for run in runs)


def test_a_scenario_that_ran_without_the_figure_shows_it_missing(one):
    # No pipeline level held on that machine: no sustained rate and no measured level.
    assert one["scenarios"]["pipeline"]["one"]["sustained_rate"] is None
    rows = {s.figure.label: s for s in spread(runs_of(one))}
    ratio = rows["pipeline sustained rate / broker round trip"]
    assert ratio.values == (None,)
    assert (ratio.low, ratio.median, ratio.high) == (None, None, None)
    assert ratio.met == 0  # a missing figure never meets its target
    assert rows["p99 commit→usage record at the measured level"].met == 0
    assert "webhooks/s per replica, all endpoints healthy" in rows


def test_a_scenario_no_run_ran_is_left_out(one):
    labels = {s.figure.label for s in spread(runs_of(one))}
    assert "rss" not in one["scenarios"]
    assert "relay RSS max, large-backlog drain, MB" not in labels
    assert {f.scenario for f in FIGURES} >= {"ceiling", "drain", "steady", "consumers",
                                              "pipeline", "rss"}


def test_a_run_without_the_scenario_is_missing_not_zero(one):
    drain_only = {k: v for k, v in one["scenarios"].items() if k in ("ceiling", "drain")}
    rows = {s.figure.label: s for s in spread([drain_only, one["scenarios"]])}
    hooks = rows["webhooks/s per replica, all endpoints healthy"]
    rate = one["scenarios"]["pipeline"]["webhooks_healthy"]["webhooks_per_s"]
    assert hooks.values == (None, rate)
    assert hooks.low == hooks.high == rate
    assert hooks.met == int(rate >= 2000)


def test_inexact_billing_never_meets_the_target(one):
    run = copy.deepcopy(one["scenarios"])
    run["consumers"]["one"]["events_per_s_per_replica"] = 5000.0
    exact = _figure("billing events/s, 1 replica").met
    assert exact is not None and exact(run) is True
    run["consumers"]["one"]["exact"] = False
    assert exact(run) is False


def test_drain_cpu_is_the_median_over_the_drains(one):
    pairs = one["scenarios"]["drain"]["pairs"]
    relay = _figure("CPU µs/event in the drains: relay").read(one["scenarios"])
    assert relay == statistics.median(p["cpu_us_per_event"]["relay"] for p in pairs)


def test_the_report_shows_the_spread_only_for_repeats(one, repeated):
    assert report.spread_title(one) is None
    assert "Spread over" not in report.markdown(one, "")
    assert "Spread over" not in report.text_summary(one)
    page = report.markdown(repeated, "")
    assert "## Spread over 2 runs" in page
    assert repeated["command"] in page
    table = report.spread_table(repeated)
    for run in repeated["runs"]:
        assert run["started_at"] in table
    drain = next(line for line in table.splitlines() if line.startswith(f"| {DRAIN}"))
    assert drain.endswith(f"| ≥ 0.95x | {spread(runs_of(repeated))[0].met} of 2 |")


def test_pipeline_options_change_only_the_pipeline_sizes():
    args = command_line().parse_args(
        ["--repeat", "3", "--pipeline-window", "20", "--pipeline-levels", "500,1000,1500"])
    p = params(args)
    default = params(command_line().parse_args([]))
    assert args.repeat == 3
    assert (p.pipeline_window, p.pipeline_levels) == (20.0, (500.0, 1000.0, 1500.0))
    assert p.drain_events == default.drain_events
    assert p.pipeline_warmup == default.pipeline_warmup
    assert command_line().parse_args([]).repeat == 1
    for wrong in (["--repeat", "0"], ["--pipeline-levels", "1000,500"]):
        with pytest.raises(SystemExit):
            command_line().parse_args(wrong)


PROBE = "host speed probe before the run, ms (fixed work; lower is faster)"


def test_each_runs_host_probe_is_in_the_spread_and_the_shown_ones_in_the_machine_table(
    repeated,
):
    results = copy.deepcopy(repeated)
    for n, run in enumerate(results["runs"]):
        run["scenarios"]["host"] = {"probe_ms_start": 100.0 + n, "probe_ms_end": 150.5 + n}
    results["scenarios"] = results["runs"][-1]["scenarios"]
    rows = {s.figure.label: s for s in spread(runs_of(results))}
    assert rows[PROBE].values == (100.0, 101.0)
    assert rows[PROBE].met is None  # a fact about the host, no target
    assert rows["host speed probe after the run, ms"].high == 151.5
    assert "| host speed probe (the run shown) | 101.0 ms before, 151.5 ms after" in (
        report.markdown(results, "")
    )


def test_runs_recorded_before_the_probe_leave_it_out(repeated):
    assert PROBE not in {s.figure.label for s in spread(runs_of(repeated))}
    assert "host speed probe" not in report.markdown(repeated, "").split("## Targets")[0]


def test_the_probe_times_its_work():
    ms = speed_probe_ms(repeats=1)
    assert 1.0 < ms < 60_000.0
