"""The timeline's arithmetic (bench/timeline.py): cores per interval from cumulative CPU
seconds, counts per second, and the table they make."""

from __future__ import annotations

import pytest

from bench.timeline import Sample, per_second, render, rows

# Three readings a second apart, as the sampler takes them during a 1,750 events/s level:
# the writer's session (inside "postgres") ended between the last two.
SAMPLES = [
    Sample(1000.0, {"relay": 10.00, "notifications": 20.0, "postgres": 30.0}, 500.0, 85),
    Sample(1001.0, {"relay": 10.14, "notifications": 20.47, "postgres": 30.41}, 501.95, 381),
    Sample(1002.0, {"relay": 10.29, "notifications": 20.9, "postgres": 29.9}, 503.9, 538),
]


def test_rows_are_cores_used_per_interval() -> None:
    table = rows(SAMPLES)
    assert [r.second for r in table] == [1001, 1002]
    assert table[0].cores["relay"] == pytest.approx(0.14)
    assert table[0].cores["notifications"] == pytest.approx(0.47)
    assert table[0].busy == pytest.approx(1.95)
    assert table[1].depth == 538


def test_a_reading_that_went_down_has_no_figure() -> None:
    # A process of the group ended: its CPU left the sum; no negative share is made up.
    assert rows(SAMPLES)[1].cores["postgres"] is None


def test_a_sample_taken_twice_in_the_same_instant_is_skipped() -> None:
    twice = [SAMPLES[0], SAMPLES[0], SAMPLES[1]]
    assert [r.second for r in rows(twice)] == [1001]


def test_per_second_counts_whole_seconds() -> None:
    assert per_second([1000.1, 1000.9, 1001.0, 1003.5]) == {1000: 2, 1001: 1, 1003: 1}


def test_render_puts_each_count_beside_the_cpu_of_the_same_second() -> None:
    counts = {"commits": per_second([1000.2] * 1740), "webhooks": per_second([1000.5] * 1393)}
    text = render(rows(SAMPLES), 1000.0, counts).splitlines()
    assert text[0].split() == ["s", "commits", "webhooks", "depth", "busy", "relay",
                               "notifica", "postgres"]
    # The row sampled at 1001 covers the second 1000-1001: its counts are those of 1000.
    assert text[1].split() == ["0", "1740", "1393", "381", "1.95", "0.14", "0.47", "0.41"]
    assert text[2].split() == ["1", "0", "0", "538", "1.95", "0.15", "0.43", "-"]
