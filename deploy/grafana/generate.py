"""Writes ``outbox-cdc.json``, the Grafana dashboard, from the panel list below.

Run ``python deploy/grafana/generate.py`` after editing:
``tests/unit/test_deploy_monitoring.py`` fails when the committed JSON differs from what this
produces. The dashboard has one Prometheus datasource variable, so it imports into any
Grafana (10+) as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
SLOT = 'cdc_slot=~"$cdc_slot"'
WORKER = 'worker=~"$worker"'
NOT_STANDBY = 'unless on (job, instance) (cdc_relay_state{state="standby"} == 1)'
PG_SLOT = 'slot_name=~"$cdc_slot"'
# The worker queues are a dashboard variable (`queues`, a regex): set it to match your
# CDC_WORKER_QUEUE_PREFIX. Parking queues are never part of the backlog.
WORKER_QUEUES = 'queue=~"$queues", queue!~".+\\\\.parked"'
DEFAULT_QUEUES = "(billing-service|notification-service)\\.[a-z0-9-]+"
#: Stat colours: green below the first step (or the colour of a first step whose value is
#: None), then each (colour, from value).
Steps = list[tuple[str, float | None]]


def target(expr: str, legend: str) -> dict[str, Any]:
    """One PromQL query of a panel."""
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "range": True}


def panel(
    kind: str,
    title: str,
    unit: str,
    targets: list[dict[str, Any]],
    w: int,
    h: int,
    description: str = "",
    steps: Steps | None = None,
) -> dict[str, Any]:
    """A panel without position; :func:`layout` places it. ``steps`` colour a stat (green
    below the first); a stat without them is blue (information, no judgement)."""
    steps = list(steps or [])
    if not steps or steps[0][1] is not None:
        steps.insert(0, ("green" if steps else "blue", None))
    thresholds = {"mode": "absolute", "steps": [{"color": c, "value": v} for c, v in steps]}
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": thresholds, "noValue": "no data"},
            "overrides": [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}}
        if kind == "timeseries"
        else {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "value"},
        "targets": targets,
        "gridPos": {"w": w, "h": h},
    }


def quantiles(metric: str, by: str, selector: str) -> list[dict[str, Any]]:
    """p50/p95/p99 of a histogram, one series per ``by`` group."""
    return [
        target(
            f"histogram_quantile({q}, sum by ({by}le) "
            f"(rate({metric}_bucket{{{selector}}}[$__rate_interval])))",
            f"p{round(q * 100)}" + (" {{worker}}" if by else ""),
        )
        for q in (0.5, 0.95, 0.99)
    ]


GIB = 1024**3
# The top row. A relay-wide flag (a slot found lost, the broker blocking publishes) belongs
# here as a stat with steps [("green", None), ("red", 1)]; a backfill's progress as a
# "percentunit" stat of rows done / rows total. Only metrics the relay defines may appear
# (tests/unit/test_deploy_monitoring.py checks every name against its registry).
GLANCE = [
    panel(
        "stat",
        "Slot lag (PostgreSQL)",
        "bytes",
        [target(f"max(pg_logical_slot_lag_bytes{{{PG_SLOT}}})", "")],
        4,
        4,
        "WAL behind the slot's confirmed position, as PostgreSQL reports it (any relay up or not).",
        [("orange", 256 * 1024**2), ("red", GIB)],
    ),
    panel(
        "stat",
        "Broker-confirmed lag",
        "bytes",
        [target(f"max(cdc_replication_lag_bytes{{{SLOT}}} {NOT_STANDBY})", "")],
        4,
        4,
        "Server WAL end minus the LSN the relay confirmed after the broker's confirms.",
        [("orange", 256 * 1024**2), ("red", GIB)],
    ),
    panel(
        "stat",
        "Broker-confirmed lag",
        "s",
        [target(f"max(cdc_replication_lag_seconds{{{SLOT}}} {NOT_STANDBY})", "")],
        4,
        4,
        "Age of the oldest committed transaction not yet confirmed by the broker.",
        [("orange", 60), ("red", 600)],
    ),
    panel(
        "stat",
        "Consumer backlog",
        "bytes",
        [target(f"sum(rabbitmq_queue_messages_bytes{{{WORKER_QUEUES}}})", "")],
        4,
        4,
        "Bytes waiting in the worker queues, not yet acked (variable `queues`).",
        [("orange", 64 * 1024**2), ("red", GIB)],
    ),
    panel(
        "stat",
        "Consumer event age",
        "s",
        [target(f"max(cdc_worker_event_age_seconds{{{WORKER}}})", "")],
        4,
        4,
        "Commit to ack of the last event each worker acked: the consumer-acked lag in seconds.",
        [("orange", 60), ("red", 300)],
    ),
    panel(
        "stat",
        "Consumer time to drain",
        "s",
        [target("max(queue:cdc_worker_backlog_drain_seconds:estimate)", "")],
        4,
        4,
        "Backlog divided by the processing rate; infinite while nothing consumes a backlog.",
        [("orange", 120), ("red", 600)],
    ),
    panel(
        "stat",
        "Slot readers",
        "none",
        [target(f"sum(pg_logical_slot_active{{{PG_SLOT}}})", "")],
        4,
        4,
        "Walsenders reading the slot: 1 when a relay streams, 0 when none does.",
        [("red", None), ("green", 1), ("orange", 2)],
    ),
    panel(
        "stat",
        "Relay parked events",
        "none",
        [target('sum(rabbitmq_queue_messages{queue=~".+\\\\.parked", queue!~"$queues"})', "")],
        4,
        4,
        "Messages waiting in parking queues outside the worker queues (the relay's, "
        "CDC_PARKING_QUEUE).",
        [("orange", 1)],
    ),
    panel(
        "stat",
        "Worker parked messages",
        "none",
        [target(f"sum(cdc_worker_parked_messages{{{WORKER}}})", "")],
        4,
        4,
        "Messages waiting in the workers' parking queues: `python -m consumers dlq list`.",
        [("orange", 1)],
    ),
    panel(
        "stat",
        "Published",
        "ops",
        [target(f"sum(rate(cdc_events_published_total{{{SLOT}}}[$__rate_interval]))", "")],
        4,
        4,
        "Events per second the broker confirmed.",
    ),
    panel(
        "stat",
        "Processed",
        "ops",
        [target(f"sum(rate(cdc_worker_processed_total{{{WORKER}}}[$__rate_interval]))", "")],
        4,
        4,
        "Messages per second whose effect committed.",
    ),
    panel(
        "stat",
        "Parked per hour",
        "none",
        [
            target(
                f"sum(increase(cdc_events_parked_total{{{SLOT}}}[1h]))"
                f" + sum(increase(cdc_worker_parked_total{{{WORKER}}}[1h]))",
                "",
            )
        ],
        4,
        4,
        "Events the relay and the workers parked in the last hour.",
        [("orange", 1)],
    ),
]

RELAY = [
    panel(
        "stat",
        "Relays streaming",
        "none",
        [target(f'sum(cdc_relay_state{{state="streaming", {SLOT}}})', "")],
        5,
        4,
        "Exactly 1 per slot when healthy; 0 means nobody publishes.",
        [("red", None), ("green", 1), ("orange", 2)],
    ),
    panel(
        "stat",
        "Relays on standby",
        "none",
        [target(f'sum(cdc_relay_state{{state="standby", {SLOT}}})', "")],
        5,
        4,
        "Hot standbys waiting for the slot (healthy, not leader).",
    ),
    panel(
        "stat",
        "In flight",
        "none",
        [target(f"sum(cdc_inflight_events{{{SLOT}}} {NOT_STANDBY})", "")],
        5,
        4,
        "Published, not yet confirmed; at CDC_MAX_IN_FLIGHT the relay waits for the broker.",
    ),
    panel(
        "stat",
        "Relay memory",
        "bytes",
        [
            target(
                "max(process_resident_memory_bytes and on (job, instance) "
                f'(cdc_relay_state{{state="streaming", {SLOT}}} == 1))',
                "",
            )
        ],
        5,
        4,
        "Resident memory of the largest relay process.",
        [("orange", 384 * 1024**2), ("red", 480 * 1024**2)],
    ),
    panel(
        "stat",
        "Slot lost (30 m)",
        "none",
        [target(f"max(max_over_time(cdc_slot_lost{{{SLOT}}}[30m]))", "")],
        4,
        4,
        "1: a relay found its slot lost and exits 5 until `cdc recover` runs (CdcSlotLost).",
        [("green", None), ("red", 1)],
    ),
    panel(
        "timeseries",
        "Relay state",
        "none",
        [target(f"sum by (state) (cdc_relay_state{{{SLOT}}})", "{{state}}")],
        12,
        8,
        "How many relays are in each state.",
    ),
    panel(
        "timeseries",
        "Replication lag (bytes)",
        "bytes",
        [target(f"cdc_replication_lag_bytes{{{SLOT}}} {NOT_STANDBY}", "{{instance}}")],
        12,
        8,
        "Server WAL end minus the LSN confirmed to PostgreSQL.",
    ),
    panel(
        "timeseries",
        "Replication lag (seconds)",
        "s",
        [target(f"cdc_replication_lag_seconds{{{SLOT}}} {NOT_STANDBY}", "{{instance}}")],
        12,
        8,
        "Oldest committed, not yet broker-confirmed transaction.",
    ),
    panel(
        "timeseries",
        "WAL written vs slot advance",
        "Bps",
        [
            target(f"max(deriv((cdc_server_wal_end_lsn{{{SLOT}}} > 0)[5m:30s]))", "WAL written"),
            target(f"max(deriv((cdc_flushed_lsn{{{SLOT}}} > 0)[5m:30s]))", "slot advance"),
        ],
        12,
        8,
        "The two lines coincide while the slot keeps up.",
    ),
    panel(
        "timeseries",
        "Throughput",
        "ops",
        [
            target(
                f"sum(rate(cdc_events_published_total{{{SLOT}}}[$__rate_interval]))", "published"
            ),
            target(
                f"sum by (kind) (rate(cdc_events_parked_total{{{SLOT}}}[$__rate_interval]))",
                "parked {{kind}}",
            ),
            target(
                f"sum by (reason) (rate(cdc_republished_total{{{SLOT}}}[$__rate_interval]))",
                "republished {{reason}}",
            ),
            target(
                f"sum by (reason) (rate(cdc_rows_ignored_total{{{SLOT}}}[$__rate_interval]))",
                "ignored {{reason}}",
            ),
        ],
        12,
        8,
    ),
    panel(
        "timeseries",
        "Commit to broker confirm latency",
        "s",
        quantiles("cdc_confirm_latency_seconds", "", SLOT),
        12,
        8,
    ),
    panel(
        "timeseries",
        "In-flight events",
        "none",
        [target(f"cdc_inflight_events{{{SLOT}}} {NOT_STANDBY}", "{{instance}}")],
        12,
        8,
        "Published, not yet confirmed (bounded by CDC_MAX_IN_FLIGHT).",
    ),
    panel(
        "timeseries",
        "Reconnects",
        "none",
        [
            target(
                f"sum by (side) (increase(cdc_reconnects_total{{{SLOT}}}[$__rate_interval]))",
                "{{side}}",
            )
        ],
        12,
        8,
    ),
]

CONSUMERS = [
    panel(
        "timeseries",
        "Event age at ack (consumer-acked lag)",
        "s",
        [
            target(
                f"max by (worker, queue) (cdc_worker_event_age_seconds{{{WORKER}}})",
                "{{worker}} {{queue}}",
            )
        ],
        24,
        8,
        "Commit (the relay's commit_time header) to ack, of the last event acked per queue.",
    ),
    panel(
        "timeseries",
        "Worker state",
        "none",
        [target(f"sum by (worker, state) (cdc_worker_state{{{WORKER}}})", "{{worker}} {{state}}")],
        12,
        8,
    ),
    panel(
        "timeseries",
        "Processed",
        "ops",
        [
            target(
                f"sum by (queue) (rate(cdc_worker_processed_total{{{WORKER}}}[$__rate_interval]))",
                "{{queue}}",
            )
        ],
        12,
        8,
    ),
    panel(
        "timeseries",
        "Duplicates skipped",
        "ops",
        [
            target(
                f"sum by (queue) (rate(cdc_worker_duplicates_total{{{WORKER}}}[$__rate_interval]))",
                "{{queue}}",
            )
        ],
        8,
        8,
    ),
    panel(
        "timeseries",
        "Retries",
        "ops",
        [
            target(
                f"sum by (queue) (rate(cdc_worker_retried_total{{{WORKER}}}[$__rate_interval]))",
                "{{queue}}",
            )
        ],
        8,
        8,
    ),
    panel(
        "timeseries",
        "Parked",
        "ops",
        [
            target(
                "sum by (queue, reason) "
                f"(rate(cdc_worker_parked_total{{{WORKER}}}[$__rate_interval]))",
                "{{queue}} {{reason}}",
            )
        ],
        8,
        8,
    ),
    panel(
        "timeseries",
        "Handler time",
        "s",
        quantiles("cdc_worker_handler_seconds", "worker, ", WORKER),
        12,
        8,
    ),
    panel(
        "timeseries",
        "Parked messages waiting",
        "none",
        [target(f"max by (queue) (cdc_worker_parked_messages{{{WORKER}}})", "{{queue}}")],
        12,
        8,
        "Depth of each worker's parking queue: `python -m consumers dlq list`.",
    ),
    panel(
        "timeseries",
        "Messages per transaction (p50)",
        "none",
        [
            target(
                "histogram_quantile(0.5, sum by (worker, le) "
                f"(rate(cdc_worker_batch_messages_bucket{{{WORKER}}}[$__rate_interval])))",
                "{{worker}}",
            )
        ],
        12,
        8,
    ),
    panel(
        "timeseries",
        "Worker reconnects",
        "none",
        [
            target(
                "sum by (worker, side) "
                f"(increase(cdc_worker_reconnects_total{{{WORKER}}}[$__rate_interval]))",
                "{{worker}} {{side}}",
            )
        ],
        12,
        8,
    ),
]

LAG_LEVELS = [
    panel(
        "timeseries",
        "Slot: WAL behind confirmed_flush_lsn",
        "bytes",
        [
            target(f"max by (slot_name) (pg_logical_slot_lag_bytes{{{PG_SLOT}}})", "{{slot_name}}"),
            target(
                f"max by (slot_name) (pg_logical_slot_retained_bytes{{{PG_SLOT}}})",
                "{{slot_name}} retained",
            ),
        ],
        8,
        8,
        "PostgreSQL's own figures (postgres_exporter with postgres-exporter-queries.yaml), "
        "reported whether or not a relay reads the slot.",
    ),
    panel(
        "timeseries",
        "Consumers: backlog",
        "none",
        [target(f"sum by (queue) (rabbitmq_queue_messages{{{WORKER_QUEUES}}})", "{{queue}}")],
        8,
        8,
        "Messages not yet acked by a worker (RabbitMQ per-object metrics).",
    ),
    panel(
        "timeseries",
        "Consumers: time to drain",
        "s",
        [
            target(
                f"sum by (queue) (rabbitmq_queue_messages{{{WORKER_QUEUES}}}) / on (queue) "
                "sum by (queue) (rate(cdc_worker_processed_total[5m]))",
                "{{queue}}",
            )
        ],
        8,
        8,
        "Backlog divided by the processing rate.",
    ),
]


def layout(rows: list[tuple[str, list[dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Place rows and panels left to right, top to bottom, with unique ids."""
    panels: list[dict[str, Any]] = []
    y = 0
    for title, members in rows:
        panels.append(
            {
                "type": "row",
                "title": title,
                "collapsed": False,
                "panels": [],
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
            }
        )
        y, x, row_h = y + 1, 0, 0
        for member in members:
            pos = member["gridPos"]
            if x + pos["w"] > 24:
                y, x, row_h = y + row_h, 0, 0
            panels.append({**member, "gridPos": {**pos, "x": x, "y": y}})
            x, row_h = x + pos["w"], max(row_h, pos["h"])
        y += row_h
    for number, item in enumerate(panels, start=1):
        item["id"] = number
    return panels


def variable(name: str, label: str, metric: str) -> dict[str, Any]:
    """A multi-value label filter; "All" also matches series without the label."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": f"label_values({metric}, {name})", "refId": name},
        "definition": f"label_values({metric}, {name})",
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "refresh": 2,
        "current": {"text": "All", "value": "$__all"},
    }


def dashboard() -> dict[str, Any]:
    """The whole dashboard document."""
    return {
        "title": "outbox-cdc",
        "uid": "outbox-cdc",
        "tags": ["outbox-cdc", "cdc", "rabbitmq", "postgresql"],
        "description": "Relay (slot to broker) and consumer workers (broker to effects).",
        "editable": True,
        "schemaVersion": 39,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "utc",
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("cdc_slot", "slot", "cdc_relay_state"),
                variable("worker", "worker", "cdc_worker_state"),
                {
                    "name": "queues",
                    "label": "worker queues (regex)",
                    "type": "textbox",
                    "query": DEFAULT_QUEUES,
                    "current": {"text": DEFAULT_QUEUES, "value": DEFAULT_QUEUES},
                    "description": "RabbitMQ queues the workers consume; include your "
                    "CDC_WORKER_QUEUE_PREFIX if you set one.",
                },
            ]
        },
        "panels": layout(
            [
                ("Lag at a glance: slot, broker-confirmed, consumer-acked", GLANCE),
                ("Relay", RELAY),
                ("Consumers", CONSUMERS),
                ("Lag at three levels: slot, broker-confirmed (above), consumer-acked", LAG_LEVELS),
            ]
        ),
    }


def render() -> str:
    """The dashboard as the committed file's text."""
    return json.dumps(dashboard(), indent=2, sort_keys=False) + "\n"


if __name__ == "__main__":
    Path(__file__).with_name("outbox-cdc.json").write_text(render())
