"""Writes ``outbox-cdc.json``, the Grafana dashboard, from the panel list below.

Run ``python deploy/grafana/generate.py`` after editing; ``tests/unit/test_deploy.py``
fails when the committed JSON differs from what this produces. The dashboard has one
Prometheus datasource variable, so it imports into any Grafana (10+) as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DS = {"type": "prometheus", "uid": "${datasource}"}
SLOT = 'cdc_slot=~"$cdc_slot"'
WORKER = 'worker=~"$worker"'
NOT_STANDBY = 'unless on (job, instance) (cdc_relay_state{state="standby"} == 1)'
WORKER_QUEUES = (
    'queue=~"(billing-service|notification-service)\\\\.[a-z0-9-]+", queue!~".+\\\\.parked"'
)


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
) -> dict[str, Any]:
    """A panel without position; :func:`layout` places it."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
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


RELAY = [
    panel(
        "stat",
        "Relays streaming",
        "none",
        [target(f'sum(cdc_relay_state{{state="streaming", {SLOT}}})', "")],
        5,
        4,
        "Exactly 1 per slot when healthy; 0 means nobody publishes.",
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
        "Broker-confirmed lag",
        "s",
        [target(f"max(cdc_replication_lag_seconds{{{SLOT}}} {NOT_STANDBY})", "")],
        5,
        4,
        "Age of the oldest committed transaction not yet confirmed by the broker.",
    ),
    panel(
        "stat",
        "Published",
        "ops",
        [target(f"sum(rate(cdc_events_published_total{{{SLOT}}}[$__rate_interval]))", "")],
        5,
        4,
    ),
    panel(
        "stat",
        "Slot lost (30 m)",
        "none",
        [target(f"max(max_over_time(cdc_slot_lost{{{SLOT}}}[30m]))", "")],
        4,
        4,
        "1: a relay found its slot lost and exits 5 until `cdc recover` runs (CdcSlotLost).",
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
        "Slot: WAL behind confirmed_flush_lsn (PostgreSQL)",
        "bytes",
        [
            target(
                'pg_replication_slot_slot_current_wal_lsn{slot_type="logical"} '
                "- on (instance, job, slot_name, slot_type) "
                'pg_replication_slot_slot_confirmed_flush_lsn{slot_type="logical"}',
                "{{slot_name}}",
            )
        ],
        8,
        8,
        "From postgres_exporter.",
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
            ]
        },
        "panels": layout(
            [
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
