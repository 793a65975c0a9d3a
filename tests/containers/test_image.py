"""The built image (deploy/Dockerfile) run as users run it, against the session's servers.

- the relay: ``cdc setup`` as a one-shot container, then ``cdc relay``; events inserted into
  the outbox arrive on the exchange, the HEALTHCHECK command passes, ``/healthz`` says
  ``streaming``, and SIGTERM stops it with exit code 0;
- a worker: ``python -m consumers notifications`` from the same image consumes a published
  event into its tables.

Both run as the image's non-root user. The image is ``CDC_TEST_IMAGE`` or built for the
session by scripts/build-image.sh; the containers share the host's network.
"""

from __future__ import annotations

import json
import re
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from harness import services
from harness.common import free_port, wait_for
from harness.session import REPO, SERVICES
from psycopg import sql

from consumers.notifications.store import schema_ddl

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(600),
    pytest.mark.skipif(
        SERVICES.mode != "containers", reason="needs a container engine (test services: local)"
    ),
]

HEALTHCHECK = ["python", "/opt/outbox-cdc/healthcheck.py"]


@pytest.fixture(scope="module")
def image() -> str:
    return services.app_image()


@pytest.fixture
def run() -> Iterator[Any]:
    with services.image_containers() as run:
        yield run


def _logs(container: Any) -> str:
    return str(container.logs(tail=60).decode(errors="replace"))


def _healthz(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return dict(json.loads(resp.read()))
    except OSError:
        return {}


def _sigterm(container: Any, timeout: int = 60) -> int:
    container.kill(signal="SIGTERM")
    return int(container.wait(timeout=timeout)["StatusCode"])


def test_image_runs_as_non_root_with_a_healthcheck(image, run):
    container = run(image, ["id", "-u"], {})
    assert container.wait(timeout=60)["StatusCode"] == 0
    assert container.logs().strip() == b"10001"
    # The container's view of the image config: podman's image inspection omits Healthcheck.
    config = container.attrs["Config"]
    assert config["User"] == "10001"
    assert config["Healthcheck"]["Test"] == ["CMD", *HEALTHCHECK]
    assert container.client.api.inspect_image(image)["Config"]["Cmd"] == ["cdc", "relay"]


def _locked_versions() -> dict[str, str]:
    """``name: version`` of deploy/requirements.lock for Linux (not the win32-only pins; not
    the build backend, which the image uninstalls)."""
    pins = {}
    for line in (REPO / "deploy" / "requirements.lock").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^ ;\\]+)(.*)$", line)
        if m and "win32'" not in m.group(3).replace("!= 'win32'", ""):
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    pins.pop("setuptools", None)
    return pins


def test_image_installs_exactly_the_locked_versions(image, run):
    listing = (
        "import importlib.metadata as m, json; print(json.dumps("
        "{d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()}))"
    )
    container = run(image, ["python", "-c", listing], {})
    assert container.wait(timeout=60)["StatusCode"] == 0, _logs(container)
    installed = json.loads(container.logs(stderr=False))
    assert installed.pop("outbox-cdc") == "0.1.0"
    assert installed == _locked_versions()


def test_relay_image_sets_up_relays_and_stops_cleanly(env, image, run):
    port = free_port()
    variables = env.relay_env(metrics_port=port)
    setup = run(image, ["cdc", "setup"], variables)
    assert setup.wait(timeout=120)["StatusCode"] == 0, _logs(setup)

    relay = run(image, ["cdc", "relay"], variables)
    wait_for(
        lambda: _healthz(port).get("state") == "streaming",
        90,
        lambda: f"the relay container to stream\n{_logs(relay)}",
    )
    code, out = relay.exec_run(["id", "-u"])
    assert (code, out.strip()) == (0, b"10001")
    code, out = relay.exec_run(HEALTHCHECK)
    assert code == 0, out

    rows = env.insert([env.event("image.smoke", {"i": i}) for i in range(50)])
    msgs = env.drain(50, quiet=0.5, timeout=60)
    assert sorted(m.message_id for m in msgs) == sorted(str(r["id"]) for r in rows)
    assert _sigterm(relay) == 0, _logs(relay)
    env.wait_for(lambda: not env.slot_active(), 15, "the slot to be released")


def test_worker_image_consumes_into_its_tables(env, domain, image, run):
    for stmt in schema_ddl(domain.schema):
        env.sql(stmt.encode())
    port = free_port()
    variables = domain.worker_env(worker_metrics_port=port)
    domain.register("notifications", variables)
    worker = run(image, ["python", "-m", "consumers", "notifications"], variables)
    wait_for(
        lambda: _healthz(port).get("state") == "consuming",
        90,
        lambda: f"the worker container to consume\n{_logs(worker)}",
    )
    code, out = worker.exec_run(HEALTHCHECK)
    assert code == 0, out

    mid = str(uuid.uuid4())
    domain.publish([("user.created", mid, {"userId": "bob", "email": "bob@example.test"})])
    domain.wait_inbox("notifications", 1, timeout=60)
    notes = env.sql(
        sql.SQL("SELECT message_id, user_id, event_type FROM {}").format(
            domain.table("notifications")
        )
    )
    assert [tuple(map(str, r)) for r in notes] == [(mid, "bob", "user.created")]
    assert _sigterm(worker) == 0, _logs(worker)
