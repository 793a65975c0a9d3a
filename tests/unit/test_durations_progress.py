"""Operator-facing text: ``7d``-style durations (cdc/core/durations.py), progress lines
(cdc/core/progress.py)."""

from __future__ import annotations

import pytest

from cdc.core.durations import parse_duration
from cdc.core.progress import ProgressReport


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("1s", 1), ("90s", 90), ("15m", 900), ("12h", 43200), ("7d", 604800), ("2w", 1209600),
     ("1.5h", 5400), (" 7D ", 604800)],
)
def test_parse_duration(given, seconds):
    assert parse_duration(given) == seconds


@pytest.mark.parametrize("given", ["", "7", "d", "7x", "-1d", "0s", "7 days", "1d2h"])
def test_parse_duration_refuses(given):
    with pytest.raises(ValueError, match=r"duration|longer than zero"):
        parse_duration(given)


def test_progress_lines_are_throttled_and_show_rate_and_eta():
    report = ProgressReport("backfill", total=10_000, start_done=2_000, started=100.0, every=3.0)
    assert report.update(2_500, 101.0) is None  # not due yet
    assert report.update(4_000, 104.0) == "backfill: 4000/10000 rows (40.0%), 500 rows/s, ETA 0m12s"
    assert report.update(4_100, 105.0) is None
    assert report.update(10_003, 105.5, final=True) == (
        "backfill: 10000/10000 rows (100.0%), 1455 rows/s, ETA 0m00s"
    )
    empty = ProgressReport("backfill", total=0, start_done=0, started=0.0)
    assert empty.update(0, 0.0, final=True) == "backfill: 0/0 rows, 0 rows/s, ETA unknown"
