"""The Prometheus rules, the Grafana dashboard and the runbook agree with the code.

Every metric a rule or a panel reads must be one the relay or the workers define (read from
their registries, not from a list kept here), a recording rule, or one of the few external
exporters' metrics named in :data:`EXTERNAL`. Label matchers must use labels the metric
has. Every alert links a runbook section of ``docs/operations.md`` that exists.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.promql import Selector, label_values_query, selectors
from prometheus_client import CollectorRegistry

from cdc.shell import metrics as relay_metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-cdc.json"
RUNBOOK = ROOT / "docs" / "operations.md"

#: Labels Prometheus adds at scrape time (scrape.yml, monitoring.yaml).
TARGET_LABELS = {"job", "instance", "cdc_slot", "namespace", "pod"}

#: Metrics of other exporters that the rules read, with their labels.
EXTERNAL: dict[str, set[str]] = {
    # RabbitMQ's rabbitmq_prometheus plugin, /metrics/per-object (3.10: queue_coarse_metrics
    # and queue_metrics families).
    "rabbitmq_queue_messages": {"vhost", "queue"},
    "rabbitmq_queue_messages_bytes": {"vhost", "queue"},
    # postgres_exporter with deploy/prometheus/postgres-exporter-queries.yaml (checked
    # against that file by test_postgres_exporter_queries_define_the_slot_metrics).
    "pg_logical_slot_active": {"slot_name", "database", "server"},
    "pg_logical_slot_lag_bytes": {"slot_name", "database", "server"},
    "pg_logical_slot_retained_bytes": {"slot_name", "database", "server"},
    "pg_logical_slot_safe_wal_size_bytes": {"slot_name", "database", "server"},
    "pg_logical_slot_wal_status": {"slot_name", "database", "server", "wal_status"},
}

WORKER_PREFIX = "cdc_worker_"


def catalog(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Every series name a registry can expose (``_total``, ``_bucket``... included) and
    its labels. Reads the registry's name index because a labelled metric without children
    exposes no sample yet."""
    names: dict[str, set[str]] = {}
    for name, collector in registry._names_to_collectors.items():
        labels = set(getattr(collector, "_labelnames", ()))
        names[name] = labels | ({"le"} if name.endswith("_bucket") else set())
    # Collectors that describe nothing up front (process_*, python_info) are read from
    # what they collect.
    for family in registry.collect():
        for sample in family.samples:
            names.setdefault(sample.name, set(sample.labels))
    return names


def worker_metrics_module() -> Any:
    try:
        return importlib.import_module("consumers.runtime.metrics")
    except ModuleNotFoundError as exc:
        pytest.skip(
            f"consumers.runtime.metrics is not on this branch ({exc}); "
            "the worker metric names are checked once it is"
        )


def load_rules() -> list[tuple[str, dict[str, Any]]]:
    """(file name, rule) for every rule of every rules file."""
    out = []
    for path in sorted(RULES.glob("*.yml")):
        doc = yaml.safe_load(path.read_text())
        if "groups" not in doc:
            continue  # scrape.yml
        for group in doc["groups"]:
            assert group["name"] and group["rules"], f"{path.name}: empty group"
            out.extend((path.name, rule) for rule in group["rules"])
    return out


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in board["panels"] for t in p.get("targets", [])]


def all_selectors() -> list[tuple[str, Selector]]:
    """(where, selector) for every rule and panel expression."""
    found = [
        (f"{f}:{r.get('alert') or r.get('record')}", s)
        for f, r in load_rules()
        for s in selectors(r["expr"])
    ]
    found += [("dashboard", s) for q in dashboard_queries() for s in selectors(q)]
    board = json.loads(DASHBOARD.read_text())
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            metric, label = label_values_query(var["definition"]) or ("", "")
            assert metric, f"variable {var['name']}: not a label_values() query"
            where = f"dashboard variable {var['name']}"
            found.append((where, Selector(metric, ((label, "=~", ""),))))
    return found


def recorded() -> set[str]:
    return {r["record"] for _, r in load_rules() if "record" in r}


def check(
    selected: list[tuple[str, Selector]],
    known: dict[str, set[str]],
    states: dict[str, tuple[str, ...]],
) -> list[str]:
    """Problems of ``selected`` against ``known`` metrics (name -> labels)."""
    problems = []
    for where, sel in selected:
        if sel.name not in known:
            problems.append(f"{where}: {sel.name} is not defined")
            continue
        for label, op, value in sel.matchers:
            if label not in known[sel.name] | TARGET_LABELS:
                problems.append(f"{where}: {sel.name} has no label {label!r}")
            if label == "state" and op == "=" and value not in states.get(sel.name, (value,)):
                problems.append(f"{where}: {sel.name} has no state {value!r}")
    return problems


def fill(query: str) -> str:
    """A panel query with Grafana's variables set as on a first visit (all slots, all
    workers, the default worker queues)."""
    board = json.loads(DASHBOARD.read_text())
    queues = next(v["query"] for v in board["templating"]["list"] if v["name"] == "queues")
    for name, value in (
        ("$__rate_interval", "5m"),
        ("$cdc_slot", ".*"),
        ("$worker", ".*"),
        ("$queues", queues.replace("\\", "\\\\")),
    ):
        query = query.replace(name, value)
    return query


def test_postgres_exporter_queries_define_the_slot_metrics() -> None:
    queries = yaml.safe_load((RULES / "postgres-exporter-queries.yaml").read_text())
    defined = {}
    for prefix, spec in queries.items():
        columns = {k: v["usage"] for m in spec["metrics"] for k, v in m.items()}
        labels = {k for k, usage in columns.items() if usage == "LABEL"} | {"server"}
        for column, usage in columns.items():
            if usage == "GAUGE":
                defined[f"{prefix}_{column}"] = labels
    assert {k: v for k, v in EXTERNAL.items() if k.startswith("pg_")} == defined


def test_rules_and_dashboard_parse_and_have_queries() -> None:
    assert len(load_rules()) >= 20
    assert len(dashboard_queries()) >= 25


def test_relay_and_external_metric_names_exist() -> None:
    known = catalog(relay_metrics.Metrics().registry)
    known |= {name: set(TARGET_LABELS) | {"le", "queue", "worker"} for name in recorded()}
    known |= EXTERNAL
    mine = [(w, s) for w, s in all_selectors() if not s.name.startswith(WORKER_PREFIX)]
    assert any(s.name == "cdc_replication_lag_bytes" for _, s in mine)
    assert check(mine, known, {"cdc_relay_state": relay_metrics.STATES}) == []


def test_worker_metric_names_exist() -> None:
    module = worker_metrics_module()
    known = catalog(module.WorkerMetrics("names").registry)
    theirs = [(w, s) for w, s in all_selectors() if s.name.startswith(WORKER_PREFIX)]
    assert theirs, "the rules and the dashboard should cover the workers"
    assert check(theirs, known, {"cdc_worker_state": module.STATES}) == []


def test_checker_catches_renames_and_wrong_labels() -> None:
    known = catalog(relay_metrics.Metrics().registry)
    bad = selectors(
        'rate(cdc_events_publish_total[5m]) + cdc_relay_state{state="leader"}'
        ' + cdc_events_parked_total{reason="x"}'
    )
    problems = check([("t", s) for s in bad], known, {"cdc_relay_state": relay_metrics.STATES})
    assert problems == [
        "t: cdc_events_publish_total is not defined",
        "t: cdc_relay_state has no state 'leader'",
        "t: cdc_events_parked_total has no label 'reason'",
    ]


def test_recording_rules_are_named_level_metric_operation_and_unique() -> None:
    names = [r["record"] for _, r in load_rules() if "record" in r]
    assert len(names) == len(set(names))
    assert all(re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", n) for n in names), names


def runbook_anchors() -> set[str]:
    """GitHub's anchors of the runbook's headings."""
    anchors = set()
    for line in RUNBOOK.read_text().splitlines():
        if m := re.match(r"#{1,6}\s+(.*)", line):
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def test_every_alert_is_complete_and_links_an_existing_runbook_section() -> None:
    alerts = [r for _, r in load_rules() if "alert" in r]
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names))
    anchors = runbook_anchors()
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning", "info"}, alert["alert"]
        notes = alert["annotations"]
        assert notes["summary"] and notes["description"], alert["alert"]
        page, _, anchor = notes["runbook_url"].partition("#")
        assert page == "docs/operations.md" and anchor in anchors, alert["alert"]
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "0s")), alert["alert"]
        for label in re.findall(r"\$labels\.(\w+)", json.dumps(notes)):
            # a label the alert's series keeps: named in the expression, or one of its
            # metrics' own labels
            own = set().union(*(EXTERNAL.get(s.name, set()) for s in selectors(alert["expr"])))
            assert re.search(rf"\b{label}\b", alert["expr"]) or label in own | TARGET_LABELS, (
                f"{alert['alert']}: $labels.{label}"
            )


def test_every_alert_section_of_the_runbook_names_an_alert() -> None:
    alerts = {r["alert"] for _, r in load_rules() if "alert" in r}
    text = RUNBOOK.read_text().split("## Alerts", 1)[1].split("\n## ", 1)[0]
    sections = set(re.findall(r"^### (\w+)$", text, re.MULTILINE))
    assert sections <= alerts
    linked = {
        r["annotations"]["runbook_url"].split("#")[1] for _, r in load_rules() if "alert" in r
    }
    assert {s.lower() for s in sections} == linked


def test_dashboard_is_the_generators_output_and_importable() -> None:
    generator = runpy.run_path(str(ROOT / "deploy" / "grafana" / "generate.py"))
    assert DASHBOARD.read_text() == generator["render"](), "run deploy/grafana/generate.py"
    board = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for p in panels:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(pos["x"] + dx, pos["y"] + dy) for dx in range(pos["w"]) for dy in range(pos["h"])}
        assert not cells & mine, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}"
            assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
    titles = {p["title"] for p in panels if p["type"] == "row"}
    assert {"Relay", "Consumers"} <= titles


def test_promtool_accepts_the_rules_and_their_unit_tests_pass(tmp_path: Path) -> None:
    # `make install` unpacks promtool into the venv (scripts/fetch-prometheus.sh).
    venv_bin = str(Path(sys.executable).parent)
    promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
    promtool = promtool or shutil.which("promtool", path=venv_bin)
    if not promtool:
        pytest.skip(
            "promtool is not installed (Debian package `prometheus`, or set PROMTOOL); "
            "the PromQL and the alert scenarios of rules.test.yml are then not evaluated"
        )
    # The dashboard's queries, with Grafana's variables filled in, as recording rules: so
    # promtool parses them too.
    filled = [fill(q) for q in dashboard_queries()]
    panels = tmp_path / "dashboard.rules.yml"
    rules = [{"record": f"dashboard:query:n{i}", "expr": q} for i, q in enumerate(filled)]
    panels.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    for args in (
        ["check", "rules", str(RULES / "alerts.yml"), str(RULES / "recording.yml"), str(panels)],
        ["test", "rules", str(RULES / "rules.test.yml")],
    ):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_lag_at_a_glance_row_has_every_level_with_thresholds() -> None:
    board = json.loads(DASHBOARD.read_text())
    panels = board["panels"]
    first_row = next(i for i, p in enumerate(panels) if p["type"] == "row")
    second_row = next(i for i, p in enumerate(panels) if p["type"] == "row" and i > first_row)
    glance = panels[first_row + 1 : second_row]
    assert panels[first_row]["title"].startswith("Lag at a glance")
    by_metric = {
        (s.name, p["fieldConfig"]["defaults"]["unit"])
        for p in glance
        for t in p["targets"]
        for s in selectors(t["expr"])
    }
    # slot (bytes), broker-confirmed (bytes and seconds), consumer-acked (bytes, seconds)
    assert {
        ("pg_logical_slot_lag_bytes", "bytes"),
        ("cdc_replication_lag_bytes", "bytes"),
        ("cdc_replication_lag_seconds", "s"),
        ("rabbitmq_queue_messages_bytes", "bytes"),
        ("cdc_worker_event_age_seconds", "s"),
    } <= by_metric
    for p in panels:
        if p["type"] == "stat":
            steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
            assert steps[0]["value"] is None, p["title"]
            if p["fieldConfig"]["defaults"]["unit"] in {"bytes", "s"}:
                assert len(steps) >= 3, f"{p['title']}: a lag needs warning and critical steps"
