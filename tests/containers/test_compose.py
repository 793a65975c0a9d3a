"""deploy/compose.yaml brought up whole (Grafana's profile left out), used, and torn down.

Events inserted into the stack's outbox travel through the sidecar relay to RabbitMQ; the
billing workers (2 replicas) meter a device session into ``usage_records`` and, the demo
balance running low, write ``billing.balance_low`` back into the outbox; the notifications
workers (2 replicas) turn that and a ``user.created`` into in-app notifications. Prometheus
scrapes the relay (its lag, through the project's recording rules) and all four workers.

The compose command is ``CDC_TEST_COMPOSE`` (e.g. ``docker compose``), else ``docker compose``
when it works, else ``podman-compose``; images come from ``POSTGRES_IMAGE``,
``RABBITMQ_IMAGE``, ``PROMETHEUS_IMAGE`` and the session's build of deploy/Dockerfile.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from harness import services
from harness.common import free_port, wait_for
from harness.session import REPO, SERVICES, SESSION

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(900),
    pytest.mark.skipif(
        SERVICES.mode != "containers", reason="needs a container engine (test services: local)"
    ),
]

COMPOSE_FILE = REPO / "deploy" / "compose.yaml"


def compose_command() -> list[str]:
    configured = os.environ.get("CDC_TEST_COMPOSE")
    if configured:
        return shlex.split(configured)
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    local = Path(sys.executable).with_name("podman-compose")
    if local.exists():
        return [str(local)]
    if shutil.which("podman-compose"):
        return ["podman-compose"]
    pytest.fail("no compose command: install docker compose or podman-compose")


class Stack:
    """One compose project of deploy/compose.yaml on free host ports."""

    def __init__(self) -> None:
        run = services.RUN_ID if services.RUN_ID != "true" else SESSION
        self.project = f"outbox-cdc-test-{run}"
        self.ports = {
            name: free_port()
            for name in ("POSTGRES_PORT", "RABBITMQ_PORT", "RABBITMQ_UI_PORT", "PROMETHEUS_PORT")
        }
        self.env = {**os.environ, "OUTBOX_CDC_IMAGE": services.app_image()}
        self.env.update({k: str(v) for k, v in self.ports.items()})
        self.db_url = f"postgresql://postgres:postgres@127.0.0.1:{self.ports['POSTGRES_PORT']}/postgres"

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        cmd = [*compose_command(), "-f", str(COMPOSE_FILE), "-p", self.project, *args]
        return subprocess.run(
            cmd, env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )

    def logs(self, service: str) -> str:
        res = self.compose("logs", "--tail", "40", service, timeout=60)
        return res.stdout[-4000:] + res.stderr[-1000:]

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.db_url, autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def try_sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
        try:
            return self.sql(query, params)
        except psycopg.Error:
            return None

    def prometheus(self, query: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.ports['PROMETHEUS_PORT']}/api/v1/query?" + (
            urllib.parse.urlencode({"query": query})
        )
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return list(json.loads(resp.read())["data"]["result"])
        except OSError:
            return []


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        yield s
    finally:
        down = s.compose("down", "-v", "-t", "5", timeout=300)
        if down.returncode != 0:
            print("compose down:", down.stdout[-2000:], down.stderr[-2000:])


def _insert(stack: Stack, event_type: str, payload: dict[str, Any]) -> str:
    mid = str(uuid.uuid4())
    stack.sql(
        "INSERT INTO public.event_outbox (id, aggregate_type, aggregate_id, event_type, payload)"
        " VALUES (%s, 'device', %s, %s, %s::jsonb)",
        (mid, payload.get("deviceId", "u"), event_type, json.dumps(payload)),
    )
    return mid


def test_compose_stack_relays_meters_notifies_and_reports_lag(stack):
    up = stack.compose("up", "-d", timeout=900)
    assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
    wait_for(
        lambda: stack.try_sql(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'cdc_outbox' AND active"
        ),
        180,
        lambda: "the relay to stream from cdc_outbox\n" + stack.logs("setup") + stack.logs("relay"),
    )
    wait_for(
        lambda: stack.try_sql("SELECT 1 FROM public.usage_records LIMIT 0") is not None
        and stack.try_sql("SELECT 1 FROM public.notifications LIMIT 0") is not None,
        120,
        lambda: "the workers to create their tables\n"
        + stack.logs("billing")
        + stack.logs("notifications"),
    )

    # billing and notifications, 2 replicas each, found by DNS, scraped, consuming (their
    # queues are bound: an event published before that would be parked as unroutable)
    consuming = "cdc_worker_state{job='outbox-cdc-workers', state='consuming'} == 1"
    wait_for(
        lambda: len(stack.prometheus(consuming)) == 4,
        120,
        lambda: f"4 workers consuming: {stack.prometheus('cdc_worker_state == 1')}",
    )

    user = f"u-{uuid.uuid4().hex[:6]}"
    _insert(stack, "user.created", {"userId": user, "email": f"{user}@example.test"})
    _insert(stack, "device.started",
            {"deviceId": "d-1", "userId": user, "startedAt": "2026-01-01T10:00:00+00:00"})
    _insert(stack, "device.stopped",
            {"deviceId": "d-1", "userId": user, "stoppedAt": "2026-01-01T11:00:00+00:00"})

    wait_for(
        lambda: stack.try_sql("SELECT 1 FROM public.usage_records WHERE user_id = %s", (user,)),
        120,
        lambda: "a billing record\n" + stack.logs("billing") + stack.logs("relay"),
    )
    def kinds() -> set[str]:
        rows = stack.try_sql(
            "SELECT event_type FROM public.notifications WHERE user_id = %s", (user,)
        )
        return {r[0] for r in rows or []}

    # user.created, and the billing.balance_low that billing wrote back into the outbox
    # (device events notify too).
    wanted = {"user.created", "billing.balance_low"}
    wait_for(
        lambda: wanted <= kinds(),
        120,
        lambda: f"notifications {wanted} (have {kinds()})\n"
        + stack.logs("notifications")
        + stack.logs("billing"),
    )

    wait_for(
        lambda: stack.prometheus("cdc_slot:replication_lag_bytes:max{cdc_slot='cdc_outbox'}"),
        120,
        lambda: "Prometheus to report the relay's lag\n" + stack.logs("prometheus"),
    )
