"""The alert rules and the dashboard on live data: a real Prometheus scrapes a running relay,
both workers, postgres_exporter (with ``deploy/prometheus/postgres-exporter-queries.yaml``)
and RabbitMQ's ``rabbitmq_prometheus`` plugin.

1. While events flow, every series selector of every recording rule, alert and dashboard
   panel returns series, every panel query returns a result, and every recording rule
   records one.
2. A consumer that stops (SIGKILL, its queue keeps filling) fires the consumer-lag alert.
3. The relay killed while writers go on fires the relay-down and slot-lag alerts.

Only ``for:`` is shortened (to 10 s, in a copy of ``alerts.yml``); expressions and thresholds
are the shipped ones. The workers run in a vhost of their own so they use the real queue
names the rules select. The ``rabbitmq_prometheus`` plugin is enabled on the shared broker if
it is not already, and stays enabled.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from harness.common import free_port, wait_for
from harness.monitoring import Prometheus
from harness.postgres import pg_connect
from harness.processes import Daemon, Relay, tool
from harness.promql import selectors
from harness.rabbitmq import ensure_rabbitmq_prometheus
from harness.relay import Env
from harness.rows import insert_rows
from harness.workers import Domain

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "outbox-cdc.json"
SHORT_FOR = "10s"
#: Labels whose values exist only in trouble: a selector matching such a value may be
#: empty on healthy data, so it is checked without that matcher.
TROUBLE_LABELS = {"wal_status"}


def short_alerts(dest: Path) -> list[Path]:
    """The shipped rule files, with every alert's ``for:`` shortened to :data:`SHORT_FOR`."""
    alerts = yaml.safe_load((RULES / "alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
    (dest / "alerts.yml").write_text(yaml.safe_dump(alerts, sort_keys=False))
    (dest / "recording.yml").write_text((RULES / "recording.yml").read_text())
    return [dest / "alerts.yml", dest / "recording.yml"]


def panels() -> list[tuple[str, str]]:
    """(panel title, query) for every query of the dashboard, variables filled as on a
    first visit (all slots, all workers, the default worker queues)."""
    board = json.loads(DASHBOARD.read_text())
    queues = next(v["query"] for v in board["templating"]["list"] if v["name"] == "queues")
    fills = {
        "$__rate_interval": "1m",
        "$cdc_slot": ".*",
        "$worker": ".*",
        "$queues": queues.replace("\\", "\\\\"),
    }
    out = []
    for p in board["panels"]:
        for t in p.get("targets", []):
            expr = t["expr"]
            for name, value in fills.items():
                expr = expr.replace(name, value)
            out.append((p["title"], expr))
    return out


def rules() -> list[dict[str, Any]]:
    return [
        rule
        for name in ("recording.yml", "alerts.yml")
        for group in yaml.safe_load((RULES / name).read_text())["groups"]
        for rule in group["rules"]
    ]


def selector_text(name: str, matchers: tuple[tuple[str, str, str], ...]) -> str:
    kept = [(k, op, v) for k, op, v in matchers if k not in TROUBLE_LABELS]
    inner = ", ".join(f"{k}{op}{json.dumps(v)}" for k, op, v in kept)
    return f"{name}{{{inner}}}" if inner else name


def missing(prom: Prometheus) -> list[str]:
    """What does not return series yet: selectors of rules and panels, panel queries,
    recorded series."""
    gaps: list[str] = []
    seen: set[str] = set()
    exprs = [r["expr"] for r in rules()] + [q for _, q in panels()]
    for expr in exprs:
        for sel in selectors(expr):
            text = selector_text(sel.name, sel.matchers)
            if text not in seen:
                seen.add(text)
                if not prom.query(text):
                    gaps.append(f"selector {text}")
    for title, query in panels():
        if not prom.query(query):
            gaps.append(f"panel {title!r}: {query}")
    for rule in rules():
        if "record" in rule and not prom.query(rule["record"]):
            gaps.append(f"recording rule {rule['record']}")
        else:
            prom.query(rule["expr"])  # a query error fails here
    return gaps


class Writers:
    """One thread inserting outbox rows, a few per tick, until stopped: billing sessions,
    notifications of several families, and an event type nobody is bound for (parked)."""

    def __init__(self, env: Env, per_second: float = 8.0) -> None:
        self.env, self.interval = env, 1.0 / per_second
        self.count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.errors: list[BaseException] = []

    def rows(self, n: int) -> list[dict[str, Any]]:
        now = dt.datetime.now(dt.UTC)
        device, user = f"dev-{n % 7}", f"u{n % 3}"
        kinds = [
            ("device.started", {"deviceId": device, "userId": user, "startedAt": now}),
            ("device.stopped", {"deviceId": device, "stoppedAt": now}),
            ("user.updated", {"userId": user, "plan": "basic", "updatedAt": now}),
            ("app.installed", {"userId": user, "appId": "a1"}),
        ]
        if n % 10 == 0:
            kinds.append(("nobody.listens", {"n": n}))
        if n % 20 == 0:
            kinds.append(("system.maintenance", {"window": "tonight"}))
        return [
            {
                "id": str(uuid.uuid4()),
                "aggregate_type": "device",
                "aggregate_id": device,
                "event_type": key,
                "payload": {
                    k: (v.isoformat() if isinstance(v, dt.datetime) else v)
                    for k, v in payload.items()
                },
            }
            for key, payload in kinds
        ]

    def _run(self) -> None:
        n = 0
        with pg_connect(self.env.db_url) as conn:
            while not self._stop.wait(self.interval):
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        insert_rows(cur, self.env.table, self.rows(n))
                    n += 1
                    self.count += 1
                except Exception as exc:  # kept for the assertion, the thread ends
                    self.errors.append(exc)
                    return

    def __enter__(self) -> Writers:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture
def stack(
    env: Env, pg_schema: str, rabbit_vhost: tuple[str, str], tmp_path: Path
) -> Iterator[dict[str, Any]]:
    """Relay, billing and notifications workers (real queue names, own vhost),
    postgres_exporter and Prometheus scraping all of them every second."""
    binaries = {name: tool(name) for name in ("prometheus", "prometheus-postgres-exporter")}
    if not all(binaries.values()):
        pytest.skip(
            f"not installed: {sorted(k for k, v in binaries.items() if not v)} "
            "(make install runs scripts/fetch-prometheus.sh)"
        )
    rabbit_metrics_port = urlsplit(ensure_rabbitmq_prometheus()).port or 15692
    vhost, amqp_url = rabbit_vhost
    started: list[Relay | Daemon | Prometheus] = []
    try:
        exporter_port = free_port()
        exporter = Daemon(
            [
                str(binaries["prometheus-postgres-exporter"]),
                f"--web.listen-address=127.0.0.1:{exporter_port}",
                f"--extend.query-path={RULES / 'postgres-exporter-queries.yaml'}",
                "--disable-default-metrics",
                "--disable-settings-metrics",
                "--no-collector.database",
                "--no-collector.bgwriter",
            ],
            tmp_path / "postgres-exporter.log",
            {"DATA_SOURCE_NAME": env.db_url + "?sslmode=disable"},
        ).start()
        started.append(exporter)
        relay_settings = {
            "amqp_url": amqp_url,
            "exchange": "cloudphone.events",
            "parking_queue": "cdc.outbox.parked",
        }
        env.setup(**relay_settings)
        relay = env.relay(metrics=True, **relay_settings)
        relay.wait_streaming(60)
        domain = Domain(env, pg_schema)
        workers = {}
        for worker in ("billing", "notifications"):
            variables = domain.worker_env(
                amqp_url=amqp_url,
                exchange="cloudphone.events",
                worker_queue_prefix="",
                worker_metrics_port=free_port(),
                worker_parked_poll_interval=1,
            )
            proc = Relay(
                variables,
                tmp_path / f"{worker}.log",
                lambda: True,
                name=worker,
                argv=["-m", "consumers", worker],
            ).start()
            started.append(proc)
            proc.wait_state("consuming", timeout=90)
            workers[worker] = proc
        workdir = tmp_path / "prometheus"
        workdir.mkdir()

        def static(job: str, ports: list[int], **labels: str) -> dict[str, Any]:
            target = {"targets": [f"127.0.0.1:{p}" for p in ports]}
            return {"job_name": job, "static_configs": [{**target, "labels": labels}]}

        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in short_alerts(workdir)],
            "scrape_configs": [
                static("outbox-cdc-relay", [relay.metrics_port or 0], cdc_slot=env.slot),
                static("outbox-cdc-workers", [w.metrics_port or 0 for w in workers.values()]),
                static("postgres-exporter", [exporter_port]),
                {
                    **static("rabbitmq-per-object", [rabbit_metrics_port]),
                    "metrics_path": "/metrics/per-object",
                    "scrape_interval": "2s",
                    # The shared broker serves every vhost: keep this test's queues (and
                    # the series that have no vhost label).
                    "metric_relabel_configs": [
                        {"source_labels": ["vhost"], "regex": f"|{vhost}", "action": "keep"}
                    ],
                },
            ],
        }
        prom = Prometheus(str(binaries["prometheus"]), workdir, config).start()
        started.append(prom)
        yield {"prom": prom, "relay": relay, "workers": workers, "exporter": exporter}
    finally:
        for thing in reversed(started):
            thing.stop()
        print(*(t.tail(8) for t in started if isinstance(t, Relay | Daemon)), sep="\n")


def wait_firing(prom: Prometheus, wanted: dict[str, dict[str, str]], timeout: float) -> float:
    """Until every alert of ``wanted`` (name -> labels it must carry) fires; the seconds it
    took."""
    t0 = time.monotonic()

    def fired() -> bool:
        now = prom.firing()
        return all(
            any(a["alertname"] == name and labels.items() <= a.items() for a in now)
            for name, labels in wanted.items()
        )

    wait_for(
        fired, timeout, lambda: f"alerts {sorted(wanted)} firing; now {prom.firing()}", interval=2
    )
    return time.monotonic() - t0


def ours(prom: Prometheus, env: Env) -> set[str]:
    """Names of the firing alerts about this test: other slots of the shared server (other
    sessions' relays) are left out."""
    return {a["alertname"] for a in prom.firing() if a.get("slot_name", env.slot) == env.slot}


@pytest.mark.timeout(900)
def test_rules_and_panels_on_live_data_and_alerts_fire(env: Env, stack: dict[str, Any]) -> None:
    prom: Prometheus = stack["prom"]
    with Writers(env) as writers:
        # 1. Everything the rules and the dashboard read is there. The 5-minute `deriv`
        # subqueries need two 30 s steps, hence the generous wait.
        gaps: list[str] = []

        def complete() -> bool:
            gaps[:] = missing(prom)
            return not gaps

        wait_for(complete, 240, lambda: "series for:\n  " + "\n  ".join(gaps), interval=5)
        assert not writers.errors, writers.errors
        # Other slots of the shared server are not this test's business.
        healthy = {
            a["alertname"] for a in prom.firing() if a.get("slot_name", env.slot) == env.slot
        }
        assert not healthy & {
            "CdcRelayAbsent",
            "CdcSlotLagGrowing",
            "CdcWorkerAbsent",
            "CdcConsumerBacklogGrowing",
            "CdcPostgresSlotMetricsAbsent",
            "CdcQueueMetricsAbsent",
        }, healthy
        lag = prom.query(f'cdc_replication_lag_bytes{{cdc_slot="{env.slot}"}}')
        assert lag and float(lag[0]["value"][1]) >= 0  # known once streaming

        # 2. A consumer stops while its queue keeps filling.
        stack["workers"]["notifications"].sigkill()
        backlog = [
            {
                "id": str(uuid.uuid4()),
                "aggregate_type": "system",
                "aggregate_id": "s",
                "event_type": "system.maintenance",
                "payload": {"n": i},
            }
            for i in range(1200)
        ]
        env.insert(backlog)
        consumer_s = wait_firing(
            prom,
            {
                "CdcConsumerBacklogGrowing": {"queue": "notification-service.system"},
                "CdcWorkerAbsent": {},
            },
            180,
        )
        after_consumer = ours(prom, env)

        # 3. The relay dies; the applications keep writing.
        stack["relay"].sigkill()
        relay_s = wait_firing(
            prom,
            {
                "CdcRelayAbsent": {},
                "CdcSlotLagGrowing": {"slot_name": env.slot},
                "CdcSlotInactive": {"slot_name": env.slot},
            },
            180,
        )
        after_relay = ours(prom, env)
    assert not writers.errors, writers.errors
    evaluated_rules = [r.get("record") or r["alert"] for r in rules()]
    print(f"\nlive monitoring: {writers.count} writer ticks")
    print(
        f"panels evaluated ({len(panels())} queries):",
        *sorted({t for t, _ in panels()}),
        sep="\n  ",
    )
    print(f"rules evaluated ({len(evaluated_rules)}):", *evaluated_rules, sep="\n  ")
    print(
        f"fired {consumer_s:.0f} s after the consumer stopped:", *sorted(after_consumer), sep="\n  "
    )
    print(
        f"fired {relay_s:.0f} s after the relay was killed:",
        *sorted(after_relay - after_consumer),
        sep="\n  ",
    )
    assert {"CdcRelayAbsent", "CdcSlotLagGrowing", "CdcConsumerBacklogGrowing"} <= after_relay
