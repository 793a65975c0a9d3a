"""The status screen's pure part (cdc/core/status_report.py): metrics text to values, unknown
kept apart from zero, the consumer lag rule, the JSON keys and the text lines."""

from __future__ import annotations

from cdc.core.status_report import (
    Depths,
    Samples,
    Scrape,
    backlog,
    build,
    consumer_lag,
    render,
    seconds,
    size,
)

RELAY_METRICS = """\
# TYPE cdc_replication_lag_bytes gauge
cdc_replication_lag_bytes 2048.0
# TYPE cdc_replication_lag_seconds gauge
cdc_replication_lag_seconds 0.25
# TYPE cdc_events_parked_total counter
cdc_events_parked_total{kind="unroutable"} 2.0
cdc_events_parked_total{kind="malformed"} 0.0
# TYPE cdc_relay_state gauge
cdc_relay_state{state="starting"} 0.0
cdc_relay_state{state="streaming"} 1.0
# TYPE cdc_inflight_events gauge
cdc_inflight_events 3.0
"""
NEVER_CONNECTED = """\
# TYPE cdc_replication_lag_bytes gauge
cdc_replication_lag_bytes NaN
# TYPE cdc_replication_lag_seconds gauge
cdc_replication_lag_seconds NaN
# TYPE cdc_relay_state gauge
cdc_relay_state{state="reconnecting"} 1.0
"""
WORKER_METRICS = """\
# TYPE cdc_worker_state gauge
cdc_worker_state{state="consuming",worker="billing"} 1.0
# TYPE cdc_worker_event_age_seconds gauge
cdc_worker_event_age_seconds{queue="billing.a",worker="billing"} 1.5
cdc_worker_event_age_seconds{queue="billing.b",worker="billing"} 0.5
# TYPE cdc_worker_parked_messages gauge
cdc_worker_parked_messages{queue="billing-service.parked",worker="billing"} 4.0
# TYPE cdc_worker_processed_total counter
cdc_worker_processed_total{queue="billing.a",worker="billing"} 10.0
cdc_worker_processed_total{queue="billing.b",worker="billing"} 0.0
"""
SLOT = {
    "slot_name": "s", "exists": True, "plugin": "pgoutput", "active": True,
    "active_pid": 42, "restart_lsn": "0/10", "confirmed_flush_lsn": "0/20",
    "current_wal_lsn": "0/30", "lag_bytes": 16, "retained_bytes": 32, "wal_status": "reserved",
    "safe_wal_size": None, "invalidation_reason": None, "health": "ok",
    "health_reason": None, "checkpoint": None,
}
URL = "http://127.0.0.1:9190/metrics"


def test_samples_read_values_and_nan_is_unknown():
    s = Samples.parse(RELAY_METRICS)
    assert s.value("cdc_replication_lag_bytes") == 2048
    assert s.value("cdc_events_parked_total", kind="unroutable") == 2
    assert s.state("cdc_relay_state") == "streaming"
    nan = Samples.parse(NEVER_CONNECTED)
    assert nan.value("cdc_replication_lag_bytes") is None
    assert nan.value("absent_metric") is None
    assert Samples.parse("this is { not prometheus").by_name == {}


def test_relay_state_and_lags_from_metrics_and_healthz():
    health = {"state": "blocked", "flushed_lsn": "0/20", "in_flight": 7}
    doc = build(SLOT, Scrape(URL, RELAY_METRICS, health), [], "p", Depths({"p": 5}, asked=True))
    assert set(SLOT) < set(doc) and doc["slot_name"] == "s"
    relay = doc["relay"]
    assert (relay["state"], relay["in_flight"], relay["flushed_lsn"]) == ("blocked", 7, "0/20")
    assert doc["lags"] == {
        "slot_bytes": 16, "broker_confirmed_bytes": 2048, "broker_confirmed_seconds": 0.25,
        "consumer_seconds": None, "consumer_messages": None,
    }
    assert doc["parked"]["relay_total"] == {"unroutable": 2, "malformed": 0}
    assert (doc["parked"]["messages"], doc["parked"]["source"]) == (5, "broker")
    # without /healthz the state gauge stands in
    gauges = build(SLOT, Scrape(URL, RELAY_METRICS), [], "p", Depths())["relay"]
    assert (gauges["state"], gauges["in_flight"]) == ("streaming", 3)


def test_unknown_is_never_zero():
    for relay in (Scrape(URL, error="connection refused"), Scrape(URL, NEVER_CONNECTED), None):
        doc = build(SLOT | {"exists": False, "lag_bytes": None}, relay, [], "p", Depths())
        assert set(doc["lags"].values()) == {None}, doc["lags"]
        text = "\n".join(render(doc, "head"))
        assert "0 B" not in text and "0.00 s" not in text, text
        assert "broker-confirmed unknown, unknown" in text
        assert "p: unknown (CDC_AMQP_URL not set)" in text
    down = build(SLOT, Scrape(URL, error="connection refused"), [], "p", Depths())
    assert "relay     unknown (no answer at http://127.0.0.1:9190/metrics: connection refused)" in (
        render(down, "head")
    )
    assert build(SLOT, None, [], "p", Depths(), "CDC_METRICS_PORT is 0")["relay"]["error"]


def test_consumer_lag_is_the_oldest_queue_and_unknown_if_a_worker_is_silent():
    ok = build(SLOT, None, [Scrape("http://w/metrics", WORKER_METRICS)], "p", Depths())
    (w,) = ok["workers"]
    assert (w["worker"], w["state"]) == ("billing", "consuming")
    assert w["event_age_seconds"] == {"billing.a": 1.5, "billing.b": 0.5}
    assert ok["lags"]["consumer_seconds"] == 1.5
    assert ok["parked"]["workers"] == {"billing-service.parked": 4}
    silent = Scrape("http://w2/metrics", error="timed out")
    both = build(SLOT, None, [Scrape("http://w/metrics", WORKER_METRICS), silent], "p", Depths())
    assert both["lags"]["consumer_seconds"] is None
    assert consumer_lag([]) is None
    fresh = build(SLOT, None, [Scrape("http://w/metrics", "")], "p", Depths())
    assert fresh["lags"]["consumer_seconds"] is None  # no event acked yet: unknown


def test_screen_has_every_part_in_few_lines():
    doc = build(
        SLOT, Scrape(URL, RELAY_METRICS, {"state": "streaming", "in_flight": 0}),
        [Scrape("http://w/metrics", WORKER_METRICS)], "cdc.outbox.parked",
        Depths({"cdc.outbox.parked": 0, "billing.a": 3, "billing.b": 4}, asked=True),
    )
    lines = render(doc, "cdc status")
    text = "\n".join(lines)
    for part in (
        "slot      s (pgoutput) active, pid 42",
        "health: ok",
        "relay     streaming, 0 in flight",
        "worker    billing: consuming, event age 1.50 s over 2 queue(s)",
        "lag       slot             16 B",
        "broker-confirmed 2.0 KiB, 0.25 s",
        "consumers        1.50 s (commit to ack, oldest queue), 7 messages waiting",
        "parked    cdc.outbox.parked: 0 waiting (broker); relay parked since start: "
        "unroutable 2, malformed 0",
        "billing-service.parked: 4 waiting (worker)",
    ):
        assert part in text, f"{part!r} not in\n{text}"
    assert len(lines) <= 24


def test_units():
    assert [size(n) for n in (None, 0, 1023, 1536, 5 * 1024**3)] == [
        "unknown", "0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
    assert [seconds(s) for s in (None, 0.0, 59.994, 125, 7260)] == [
        "unknown", "0.00 s", "59.99 s", "2m05s", "2h01m"]


def test_consumer_backlog_counts_every_worker_queue_or_is_unknown():
    (w,) = build(SLOT, None, [Scrape("http://w/metrics", WORKER_METRICS)], "p", Depths())[
        "workers"
    ]
    assert w["queues"] == ["billing.a", "billing.b"]
    assert backlog([w], Depths({"billing.a": 3, "billing.b": 4}, asked=True)) == 7
    assert backlog([w], Depths({"billing.a": 3}, asked=True)) is None  # one queue missing
    assert backlog([w], Depths()) is None  # no broker URL
    assert backlog([], Depths({"x": 1}, asked=True)) is None
    down = build(SLOT, None, [], "p", Depths(asked=True, error="broker: connection refused"))
    assert down["parked"]["messages"] is None
    assert down["parked"]["error"] == "broker: connection refused"
    assert "p: unknown (broker: connection refused)" in "\n".join(render(down, "h"))


def test_failover_lines_when_the_document_has_them():
    doc = build(SLOT, None, [], "p", Depths()) | {
        "failover": {
            "supported": True, "slot_failover": True, "synchronized_standby_slots": ["sb1"],
            "standbys": [
                {"standby": "sb1", "state": "streaming", "ready": True, "reasons": []},
                {"standby": "sb2", "state": None, "ready": None, "reasons": ["not listed"]},
            ],
        }
    }
    lines = render(doc, "h")
    tail = lines[lines.index(
        "failover slot: True (supported: True; synchronized_standby_slots: sb1)"):]
    assert tail[1:] == [
        "  standby sb1 (streaming): ready",
        "  standby sb2 (not connected): unknown (use --standby-url)",
        "    - not listed",
    ]
    assert not any("failover" in line for line in render(build(SLOT, None, [], "p", Depths()), "h"))
