"""Pure arithmetic of the harness: percentiles, rates from depth samples, histogram quantiles.

No I/O here: every function takes plain numbers (seconds, counts) and returns numbers, so the
figures printed and written to JSON are computed one way for every scenario.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from datetime import datetime


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_summary(latencies_s: Sequence[float]) -> dict[str, float | int | None]:
    """p50/p95/p99/max in milliseconds, and the sample count."""
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000.0, 2)

    return {
        "count": len(latencies_s),
        "p50_ms": ms(percentile(latencies_s, 50)),
        "p95_ms": ms(percentile(latencies_s, 95)),
        "p99_ms": ms(percentile(latencies_s, 99)),
        "max_ms": ms(max(latencies_s) if latencies_s else None),
    }


def epoch(iso: str) -> float:
    """ISO 8601 text with an offset (the relay's headers) -> POSIX seconds."""
    return datetime.fromisoformat(iso).timestamp()


def drain_rate(
    samples: Sequence[tuple[float, int]], target: int
) -> tuple[float, float, float] | None:
    """Events/s of a drain seen through ``(time, delivered)`` samples, start-up excluded.

    The clock starts at the last sample before anything arrived (so start-up is excluded
    but the first interval's events are counted) and stops at the first sample that shows
    ``target`` delivered. Returns ``(rate, started_at, finished_at)``, or ``None`` if the
    samples never reach ``target``.
    """
    start: tuple[float, int] | None = None
    previous: tuple[float, int] | None = None
    for when, count in samples:
        if start is None and count > 0:
            start = previous if previous is not None else (when, count)
        if start is not None and count >= target:
            elapsed = when - start[0]
            if elapsed <= 0:
                return None
            return (target - start[1]) / elapsed, start[0], when
        previous = (when, count)
    return None


_BUCKET_RE = re.compile(r'^(\w+)_bucket\{.*le="([^"]+)".*\}\s+(\S+)$')


def histogram_buckets(metrics_text: str, name: str) -> list[tuple[float, float]]:
    """Cumulative ``(upper_bound, count)`` pairs of histogram ``name`` in Prometheus text."""
    out: list[tuple[float, float]] = []
    for line in metrics_text.splitlines():
        match = _BUCKET_RE.match(line)
        if match and match.group(1) == name:
            out.append((float(match.group(2)), float(match.group(3))))
    return sorted(out)


def counter_value(metrics_text: str, name: str) -> float:
    """Sum of the samples of ``name`` (all label sets) in Prometheus text; 0 if absent."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            metric = head.split("{", 1)[0]
            if metric == name:
                total += float(value)
    return total


def histogram_quantile(
    before: Sequence[tuple[float, float]], after: Sequence[tuple[float, float]], q: float
) -> float | None:
    """Quantile ``q`` (0..1) of the observations made between two scrapes, in seconds.

    Interpolates linearly inside the bucket, as Prometheus' ``histogram_quantile`` does; an
    answer in the ``+Inf`` bucket is reported as the largest finite bound.
    """
    start = dict(before)
    delta = [(bound, count - start.get(bound, 0.0)) for bound, count in after]
    if not delta or delta[-1][1] <= 0:
        return None
    rank = q * delta[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in delta:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            share = (rank - lower_count) / (count - lower_count)
            return lower_bound + (bound - lower_bound) * share
        lower_bound, lower_count = bound, count
    return None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator`` rounded to 3 digits, ``None`` when either is missing or 0."""
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def paired_ratio(
    rate: float | None, before: float | None, after: float | None
) -> float | None:
    """``rate`` over the mean of the reference rates measured right before and right after
    it (either alone if the other is missing), rounded to 3 digits; ``None`` without them.

    On a shared machine the reference moves by more than 10% within minutes; a ratio to the
    references that bracket a measurement cancels the drift common to the three.
    """
    bracket = [r for r in (before, after) if r]
    return ratio(rate, sum(bracket) / len(bracket)) if bracket else None
