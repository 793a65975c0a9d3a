"""Prometheus metrics of one worker process (served with the relay's ``/metrics`` endpoint).

Every counter is labelled by ``worker`` and ``queue`` (the origin queue); the parking gauge
by the parking queue. No label carries a URL or a payload.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from prometheus_client import Counter, Gauge, Histogram

from cdc.service.metrics_server import process_registry
from consumers.runtime.batch import DONE, DUPLICATE, FAILED, FALLBACK, FIRST, RETRIED, BatchMessage

STATES = ("starting", "consuming", "reconnecting", "draining", "stopped")


class WorkerMetrics:
    """The worker's metrics on a private registry."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        r = self.registry = process_registry("cdc_build_info", {"worker": worker})
        labels = ["worker", "queue"]
        self.processed = Counter(
            "cdc_worker_processed_total",
            "Messages whose handler succeeded and whose transaction committed",
            labels,
            registry=r,
        )
        self.duplicates = Counter(
            "cdc_worker_duplicates_total",
            "Messages skipped because the inbox already had their message_id",
            labels,
            registry=r,
        )
        self.retried = Counter(
            "cdc_worker_retried_total",
            "Messages sent to a retry (TTL) queue after a failed attempt",
            labels,
            registry=r,
        )
        self.parked = Counter(
            "cdc_worker_parked_total",
            "Messages sent to the parking queue, by reason",
            [*labels, "reason"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "cdc_worker_handler_seconds",
            "Time in the handler, per message (inside the batch transaction)",
            labels,
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5),
            registry=r,
        )
        # A series per queue, looked up once: ``labels()`` cost more than the observation,
        # once per message.
        self._handler_timers: dict[str, Histogram] = {}
        self.batch_size = Histogram(
            "cdc_worker_batch_messages",
            "Messages per PostgreSQL transaction",
            ["worker"],
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.optimistic_batches = Counter(
            "cdc_worker_optimistic_batches_total",
            "Batches of a db_only worker by how they committed: first (pipelined, first try),"
            " retried (a later try, after losing lock races to another replica), fallback"
            " (a savepoint per message, after a failure or too many lost races)",
            ["worker", "result"],
            registry=r,
        )
        self.parked_messages = Gauge(
            "cdc_worker_parked_messages",
            "Messages waiting in the parking queue (read from the broker)",
            ["worker", "queue"],
            registry=r,
        )
        self.event_age = Gauge(
            "cdc_worker_event_age_seconds",
            "Commit (relay's commit_time header, else the AMQP timestamp) to ack, of the last"
            " event acked: the consumer-acked level of lag",
            ["worker", "queue"],
            registry=r,
        )
        self.reconnects = Counter(
            "cdc_worker_reconnects_total",
            "Sessions restarted after a broker or database failure",
            ["worker", "side"],
            registry=r,
        )
        self.state = Gauge(
            "cdc_worker_state", "1 for the current state", ["worker", "state"], registry=r
        )
        self.set_state("starting")

    def start_at_zero(self, queues: list[str], parking_queue: str, reasons: list[str]) -> None:
        """Create every series the worker will count, at 0, before the first message: a
        rule or a panel then reads "none yet" instead of "no data", and ``rate()`` sees
        the first increase."""
        w = self.worker
        for queue in queues:
            for metric in (self.processed, self.duplicates, self.retried, self.handler_seconds):
                metric.labels(worker=w, queue=queue)
            for reason in reasons:
                self.parked.labels(worker=w, queue=queue, reason=reason)
        self.batch_size.labels(worker=w)
        for result in (FIRST, RETRIED, FALLBACK):
            self.optimistic_batches.labels(worker=w, result=result)
        # Not the parking gauge nor the event age: their value is unknown until read.
        for side in ("broker", "database"):
            self.reconnects.labels(worker=w, side=side)

    def set_state(self, state: str) -> None:
        """Make ``state`` the one current state."""
        for name in STATES:
            self.state.labels(worker=self.worker, state=name).set(1 if name == state else 0)

    def count_batch(self, items: Sequence[BatchMessage]) -> None:
        """Count a batch's outcomes: processed and duplicate messages by queue, the handler
        time of each message that ran, the batch's size."""
        w = self.worker
        counts: dict[tuple[str, str], int] = {}
        timers = self._handler_timers
        for item in items:
            key = (item.queue, item.outcome or "")
            counts[key] = counts.get(key, 0) + 1
            if item.outcome in (DONE, FAILED):
                timer = timers.get(item.queue)
                if timer is None:
                    timer = timers[item.queue] = self.handler_seconds.labels(
                        worker=w, queue=item.queue
                    )
                timer.observe(item.seconds)
        for (queue, outcome), n in counts.items():
            if outcome == DONE:
                self.processed.labels(worker=w, queue=queue).inc(n)
            elif outcome == DUPLICATE:
                self.duplicates.labels(worker=w, queue=queue).inc(n)
        if items:
            self.batch_size.labels(worker=w).observe(len(items))

    def acked(self, queue: str, committed_at: float | None) -> None:
        """An event of ``queue`` committed at ``committed_at`` (epoch seconds, when known)
        is acked: set the event age to the time since."""
        if committed_at is not None:
            self.event_age.labels(worker=self.worker, queue=queue).set(
                max(0.0, time.time() - committed_at)
            )
