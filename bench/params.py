"""Sizes of one harness run: the full run (under ~15 minutes here) and ``--quick``."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cdc.config import RelaySettings


@dataclass(frozen=True, slots=True)
class Params:
    """Every count and duration a scenario uses; printed into the results."""

    payload_size: int = 500  # bytes of the published body (jsonb as PostgreSQL prints it)
    window: int = 1000  # confirm window of the reference publisher (the relay keeps its own)
    backlog_rows_per_txn: int = 100
    drain_events: int = 200_000  # also the ceiling's message count: same queue growth
    drain_pairs: int = 3  # relay drains, each followed by a ceiling (C D C D C D C)
    # Relay windows (CDC_MAX_IN_FLIGHT) the drains take in turn; empty = ``window``. With
    # several, each gets ``drain_pairs`` drains and its own median of paired ratios.
    relay_windows: tuple[int, ...] = ()
    steady_levels: tuple[float, ...] = (0.25, 0.50, 0.75)
    steady_seconds: float = 20.0
    steady_warmup: float = 3.0  # per level, excluded from the figures
    steady_rows_per_txn: int = 10
    shape_events: int = 20_000
    shape_payloads: tuple[int, ...] = (100, 1_000, 10_000)
    shape_txn_sizes: tuple[int, ...] = (1, 10, 100)
    shape_rate: float = 500.0  # offered events/s for the latency of each shape point
    shape_seconds: float = 8.0
    rss_events: int = 1_000_000
    rss_queue_cap: int = 10_000  # the RSS drain's queue keeps the newest N (drop-head)
    seed_poll_interval: float = 5.0
    seed_poll_limit: int = 100
    seed_backlog: int = 2_000
    seed_polls: int = 4  # throughput window = seed_polls x poll interval
    seed_rate: float = 10.0  # events/s (one row per transaction) for the latency comparison
    seed_seconds: float = 20.0
    consumer_pairs: int = 5_000  # device.started + device.stopped pairs (2 events each)
    max_drain_seconds: float = 300.0  # a drain (or a consumer run) slower than this is cut
    rss_max_seconds: float = 420.0  # the RSS drain is cut here; RSS is still reported
    consumer_max_seconds: float = 120.0  # per replica count; a slower drain is cut
    # The whole pipeline (relay + billing + notifications): offered rates tried in turn,
    # each for a warm-up then a measured window; the catch-up bounds the wait for effects.
    # Steps of 250 all the way: the sustained rate is the last level that holds, so a
    # coarser step understates it by up to the step (3,000 then 4,000 would read a pipeline
    # that holds 3,750 as 3,000). Levels past the first that fails are never run.
    pipeline_levels: tuple[float, ...] = tuple(float(r) for r in range(500, 5001, 250))
    pipeline_window: float = 60.0
    pipeline_warmup: float = 5.0
    pipeline_catch_up: float = 30.0
    pipeline_webhook_latency: float = 0.02  # seconds the receiver takes to answer
    # The relay's CDC_PUBLISH_LINGER in the pipeline (0: its default, no linger). At a paced
    # 750 events/s 30 ms took 20-35% off the CPU per event of the broker, billing and
    # PostgreSQL (bigger batches all the way down), for about 25 ms more at p50.
    pipeline_publish_linger: float = 0.03
    # Backlog of the webhook throughput drain: at about 4,500 webhooks/s, 60,000 last some
    # 13 s, well past the 5 s webhook timeout and the first retries, so the 10%-dead drain
    # measures the steady state (20,000 lasted 4 s: mostly the transient after the warm-up).
    pipeline_webhook_events: int = 60_000
    # Drains with 10% of the endpoints dead, each between two healthy ones (H D H D H): the
    # host's speed drifts within minutes, and one healthy drain before one dead one gave
    # ratios anywhere from 0.68x to 1.02x with the same code in one hour.
    pipeline_dead_drains: int = 2
    pipeline_ceiling_events: int = 100_000  # events of the broker round trip ceiling

    @classmethod
    def quick(cls) -> Params:
        """Small counts for development: every scenario in a few minutes, noisy figures."""
        return cls(
            drain_events=20_000, drain_pairs=2, steady_seconds=8.0, steady_warmup=2.0,
            shape_events=5_000, shape_seconds=4.0, rss_events=100_000, seed_backlog=500,
            seed_polls=3,
            seed_seconds=12.0, consumer_pairs=1_000, rss_max_seconds=180.0,
            pipeline_levels=(250, 500, 1000, 1500, 2000, 3000), pipeline_window=10.0,
            pipeline_warmup=3.0, pipeline_catch_up=15.0, pipeline_webhook_events=5_000,
            pipeline_ceiling_events=20_000,
        )


def relay_window() -> int:
    """The relay's unconfirmed-publish window in this run: ``CDC_MAX_IN_FLIGHT``, else its
    default."""
    default = RelaySettings.model_fields["max_in_flight"].default
    return int(os.environ.get("CDC_MAX_IN_FLIGHT") or default)
