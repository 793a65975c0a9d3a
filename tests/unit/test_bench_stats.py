"""The benchmark harness's arithmetic (bench/stats.py): the figures in docs/benchmarks.md
are only as right as these few functions."""

from __future__ import annotations

import math

import pytest

from bench.stats import (
    counter_value,
    drain_rate,
    epoch,
    histogram_buckets,
    histogram_quantile,
    latency_summary,
    paired_ratio,
    percentile,
    ratio,
)

# A real scrape of the relay's /metrics (trimmed), before and after 1000 confirms.
BEFORE = """\
# HELP cdc_confirm_latency_seconds Commit to broker confirm, per event
# TYPE cdc_confirm_latency_seconds histogram
cdc_confirm_latency_seconds_bucket{le="0.001"} 0.0
cdc_confirm_latency_seconds_bucket{le="0.005"} 10.0
cdc_confirm_latency_seconds_bucket{le="0.01"} 10.0
cdc_confirm_latency_seconds_bucket{le="+Inf"} 10.0
cdc_confirm_latency_seconds_count 10.0
cdc_events_published_total 10.0
cdc_events_parked_total{kind="unroutable"} 1.0
cdc_events_parked_total{kind="malformed"} 2.0
"""
AFTER = BEFORE.replace('le="0.005"} 10.0', 'le="0.005"} 510.0').replace(
    'le="0.01"} 10.0', 'le="0.01"} 1000.0'
).replace('le="+Inf"} 10.0', 'le="+Inf"} 1010.0')


def test_percentile_interpolates_and_handles_edges() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert percentile(list(map(float, range(101))), 99) == pytest.approx(99.0)


def test_latency_summary_in_milliseconds() -> None:
    summary = latency_summary([0.001, 0.002, 0.003, 0.004, 0.100])
    assert summary == {"count": 5, "p50_ms": 3.0, "p95_ms": pytest.approx(80.8),
                       "p99_ms": pytest.approx(96.16), "max_ms": 100.0}
    assert latency_summary([])["p99_ms"] is None


def test_drain_rate_excludes_startup_and_counts_the_first_interval() -> None:
    # Nothing for 5 s (start-up), then 1000 events/s from t=5 to t=15.
    samples = [(t * 0.5, 0) for t in range(11)]
    samples += [(5.0 + k * 0.5, 500 * k) for k in range(1, 21)]
    rate, started, finished = drain_rate(samples, 10_000) or (0.0, 0.0, 0.0)
    assert (started, finished) == (5.0, 15.0)
    assert rate == pytest.approx(1000.0)


def test_drain_rate_none_when_target_never_reached() -> None:
    assert drain_rate([(0.0, 0), (1.0, 10), (2.0, 20)], 100) is None
    assert drain_rate([], 1) is None


def test_histogram_quantile_of_the_window_between_two_scrapes() -> None:
    before = histogram_buckets(BEFORE, "cdc_confirm_latency_seconds")
    after = histogram_buckets(AFTER, "cdc_confirm_latency_seconds")
    assert before[-1] == (math.inf, 10.0)
    # Window: 500 in (1 ms, 5 ms], 490 in (5 ms, 10 ms], 10 above 10 ms.
    assert histogram_quantile(before, after, 0.5) == pytest.approx(0.005)
    assert histogram_quantile(before, after, 0.25) == pytest.approx(0.001 + 0.004 * 0.5)
    assert histogram_quantile(before, after, 0.995) == pytest.approx(0.01)  # +Inf -> 10 ms
    assert histogram_quantile(after, after, 0.5) is None  # nothing observed in between


def test_counter_value_sums_label_sets_and_ignores_similar_names() -> None:
    assert counter_value(BEFORE, "cdc_events_parked_total") == 3.0
    assert counter_value(BEFORE, "cdc_events_published_total") == 10.0
    assert counter_value(BEFORE, "cdc_events") == 0.0


def test_epoch_reads_the_relay_headers() -> None:
    assert epoch("1970-01-01T00:00:01.500000+00:00") == 1.5
    assert epoch("2026-12-03T08:00:00+00:00") == epoch("2026-12-03T09:00:00+01:00")


def test_ratio() -> None:
    assert ratio(9.0, 3.0) == 3.0
    assert ratio(None, 3.0) is None
    assert ratio(1.0, 0.0) is None


def test_paired_ratio_is_to_the_mean_of_the_bracketing_references() -> None:
    # A drain of 9,000/s between ceilings of 8,000 and 10,000 is 1.0x, not 1.125x or 0.9x.
    assert paired_ratio(9_000, 8_000, 10_000) == 1.0
    assert paired_ratio(9_000, None, 10_000) == 0.9  # one reference missing: the other
    assert paired_ratio(9_000, 10_000, 0) == 0.9  # a failed measurement reads as 0
    assert paired_ratio(9_000, None, None) is None
    assert paired_ratio(None, 8_000, 10_000) is None
