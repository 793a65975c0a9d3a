"""What the relay's and a worker's ``/metrics`` expose before any work: process facts, the
version, lag as unknown (not 0), and every counted label value at 0."""

from __future__ import annotations

import math

from harness.common import parse_metrics
from prometheus_client import generate_latest

from cdc import __version__
from cdc.shell.metrics import Metrics
from consumers.runtime.metrics import WorkerMetrics


def test_relay_exposes_process_version_and_unknown_lag_before_connecting() -> None:
    series = parse_metrics(generate_latest(Metrics().registry).decode())
    assert series["cdc_build_info"] == [({"version": __version__}, 1.0)]
    assert series["process_resident_memory_bytes"][0][1] > 0
    assert "python_info" in series
    for name in ("cdc_replication_lag_bytes", "cdc_replication_lag_seconds"):
        [(_, value)] = series[name]
        assert math.isnan(value), name
    kinds = {labels["kind"]: v for labels, v in series["cdc_events_parked_total"]}
    assert kinds == {"unroutable": 0.0, "malformed": 0.0}
    assert {lb["reason"] for lb, _ in series["cdc_republished_total"]} == {"nack", "timeout"}
    assert {lb["side"] for lb, _ in series["cdc_reconnects_total"]} == {"broker", "database"}


def test_two_registries_in_one_process_both_export_process_facts() -> None:
    first, second = Metrics(), WorkerMetrics("billing")
    for registry in (first.registry, second.registry):
        assert "process_cpu_seconds_total" in generate_latest(registry).decode()


def test_worker_counts_start_at_zero_for_its_queues_but_age_stays_unknown() -> None:
    m = WorkerMetrics("billing")
    m.start_at_zero(["q1", "q2"], "q.parked", ["exhausted", "validation"])
    series = parse_metrics(generate_latest(m.registry).decode())
    assert series["cdc_build_info"] == [({"version": __version__, "worker": "billing"}, 1.0)]
    processed = {lb["queue"]: v for lb, v in series["cdc_worker_processed_total"]}
    assert processed == {"q1": 0.0, "q2": 0.0}
    parked = {(lb["queue"], lb["reason"]) for lb, _ in series["cdc_worker_parked_total"]}
    assert parked == {(q, r) for q in ("q1", "q2") for r in ("exhausted", "validation")}
    assert "cdc_worker_handler_seconds_count" in series
    optimistic = {lb["result"]: v for lb, v in series["cdc_worker_optimistic_batches_total"]}
    assert optimistic == {"first": 0.0, "retried": 0.0, "fallback": 0.0}
    # Unknown until read from the broker / until an event is acked.
    assert "cdc_worker_parked_messages" not in series
    assert "cdc_worker_event_age_seconds" not in series


def test_batch_counts_and_handler_times_go_to_each_queues_series() -> None:
    from consumers.runtime.batch import DONE, DUPLICATE, FAILED, BatchMessage
    from consumers.runtime.spec import Delivery

    def item(queue: str, outcome: str, seconds: float) -> BatchMessage:
        d = Delivery("m", "k", {}, 1, b"{}")
        return BatchMessage(d, None, None, queue, outcome=outcome, seconds=seconds)  # type: ignore[arg-type]

    m = WorkerMetrics("notifications")
    m.count_batch([item("q1", DONE, 0.001), item("q2", DONE, 0.2), item("q1", DUPLICATE, 0)])
    m.count_batch([item("q1", FAILED, 0.003), item("q2", DONE, 0.002)])  # series reused
    series = parse_metrics(generate_latest(m.registry).decode())
    processed = {lb["queue"]: v for lb, v in series["cdc_worker_processed_total"]}
    assert processed == {"q1": 1.0, "q2": 2.0}
    counts = {lb["queue"]: v for lb, v in series["cdc_worker_handler_seconds_count"]}
    sums = {lb["queue"]: v for lb, v in series["cdc_worker_handler_seconds_sum"]}
    assert counts == {"q1": 2.0, "q2": 2.0}
    assert sums["q1"] == 0.004 and abs(sums["q2"] - 0.202) < 1e-9
