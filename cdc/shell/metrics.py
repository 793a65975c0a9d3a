"""The relay's Prometheus metrics (served by ``cdc/service/metrics_server.py``).

No label or value ever carries a DSN or URL.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from cdc.service.metrics_server import process_registry

STATES = (
    "starting", "standby", "streaming", "blocked", "reconnecting", "draining", "slot_lost"
)


class Metrics:
    """Every metric of the relay, on a private registry (tests may build several)."""

    def __init__(self) -> None:
        r = self.registry = process_registry("cdc_build_info")
        self.published = Counter(
            "cdc_events_published_total", "Events confirmed by the broker", registry=r
        )
        self.parked = Counter(
            "cdc_events_parked_total", "Events parked (and confirmed)", ["kind"], registry=r
        )
        self.ignored = Counter(
            "cdc_rows_ignored_total", "Decoded changes that are not outbox inserts", ["reason"],
            registry=r,
        )
        self.republished = Counter(
            "cdc_republished_total", "Publishes sent again", ["reason"], registry=r
        )
        self.reconnects = Counter(
            "cdc_reconnects_total", "Sessions restarted after a failure", ["side"], registry=r
        )
        self.inflight = Gauge("cdc_inflight_events", "Events awaiting a confirm", registry=r)
        self.flushed_lsn = Gauge("cdc_flushed_lsn", "LSN confirmed to PostgreSQL", registry=r)
        self.received_lsn = Gauge("cdc_received_lsn", "Last WAL position received", registry=r)
        self.server_lsn = Gauge("cdc_server_wal_end_lsn", "Server's WAL end", registry=r)
        self.lag_bytes = Gauge(
            "cdc_replication_lag_bytes", "Server WAL end minus confirmed LSN", registry=r
        )
        self.lag_seconds = Gauge(
            "cdc_replication_lag_seconds",
            "Age of the oldest committed transaction not yet broker-confirmed",
            registry=r,
        )
        self.confirm_latency = Histogram(
            "cdc_confirm_latency_seconds",
            "Commit to broker confirm, per event",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.backfill_done = Gauge(
            "cdc_backfill_rows_done", "Rows the slot's backfill has published", registry=r
        )
        self.backfill_total = Gauge(
            "cdc_backfill_rows_total", "Rows the slot's backfill publishes in all", registry=r
        )
        self.pruned = Counter(
            "cdc_pruned_rows_total", "Published outbox rows deleted by the periodic prune",
            registry=r,
        )
        self.slot_lost = Gauge(
            "cdc_slot_lost",
            "1 when the slot is lost (missing, invalidated, moved, unpublished table): "
            "run `cdc recover`",
            registry=r,
        )
        self.state = Gauge("cdc_relay_state", "1 for the current state", ["state"], registry=r)
        self.broker_blocked = Gauge(
            "cdc_broker_blocked",
            "1 while the broker blocks publishing (connection.blocked: memory or disk alarm)",
            registry=r,
        )
        self.set_state("starting")
        # Every known label value starts at 0, so rate() and increase() have a series to
        # work on from the first scrape and a rule reads "none yet", not "no data".
        for kind in ("unroutable", "malformed"):
            self.parked.labels(kind=kind)
        for reason in ("nack", "timeout"):
            self.republished.labels(reason=reason)
        for side in ("broker", "database"):
            self.reconnects.labels(side=side)
        self.ignored.labels(reason="other_table")
        # Unknown is not zero: until the first status update of a session there is no lag
        # to report, and a 0 would read as "all caught up" on a relay that never connected.
        self.lag_bytes.set(float("nan"))
        self.lag_seconds.set(float("nan"))

    def set_state(self, state: str) -> None:
        """Make ``state`` the one current state."""
        for name in STATES:
            self.state.labels(state=name).set(1 if name == state else 0)
