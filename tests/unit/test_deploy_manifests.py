"""The Kubernetes manifests and systemd units use only the documented contract.

- Every manifest is valid against the Kubernetes 1.30 schema (CRDs: structure only).
- A container runs ``cdc <command>`` or ``python -m consumers <worker>``; every ``CDC_*``
  variable it sets is a field of that process's settings model, the required ones are set,
  and every Secret key it reads exists in ``secret.example.yaml``.
- Probes ask ``/healthz`` on the metrics port the process listens on, the scrape annotation
  names that port, and the grace period outlasts the shutdown drain.
- The systemd units run the same commands, their environment files exist as examples that
  name only known variables, and ``TimeoutStopSec`` outlasts the drain.
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from cdc.config import RelaySettings
from consumers.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
WORKLOADS = {"Deployment", "StatefulSet", "Job"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    paths = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [(p.name, d) for p in paths for d in documents(p)]


def settings_model(command: list[str]) -> type[BaseSettings]:
    """The settings model of the process ``command`` starts (skips a worker not merged yet)."""
    if command[0].endswith("cdc"):
        assert command[1] in {"setup", "relay", "status"}, command
        return RelaySettings
    assert command[-3:-1] == ["-m", "consumers"], command
    try:
        loader = importlib.import_module("consumers.loader")
        model: type[BaseSettings] = loader.load(command[-1]).settings
    except (ImportError, ConfigError) as exc:
        pytest.skip(f"worker {command[-1]!r} is not on this branch yet ({exc})")
    return model


def variables(model: type[BaseSettings]) -> set[str]:
    prefix = model.model_config.get("env_prefix", "")
    return {f"{prefix}{name}".upper() for name in model.model_fields}


def required(model: type[BaseSettings]) -> set[str]:
    prefix = model.model_config.get("env_prefix", "")
    return {f"{prefix}{n}".upper() for n, f in model.model_fields.items() if f.is_required()}


def settings(
    model: type[BaseSettings], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Any:
    """``model`` built from exactly ``env``, as the process would build it: values that
    the model rejects fail here."""
    for name in [n for n in os.environ if n.startswith("CDC_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return model()


def container_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables; those read from a Secret get a well-formed stand-in."""
    stand_in = {"amqp-url": "amqp://u:p@broker:5672/"}
    return {
        e["name"]: e["value"]
        if "value" in e
        else stand_in.get(e["valueFrom"]["secretKeyRef"]["key"], "postgresql://u:p@db/app")
        for e in container.get("env", [])
    }


def containers() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, pod spec, container) for every workload container."""
    return [
        (f"{f}:{d['metadata']['name']}/{c['name']}", d["spec"]["template"]["spec"], c)
        for f, d in manifests()
        if d["kind"] in WORKLOADS
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("outbox-cdc")
    ]


def container_ids() -> list[str]:
    return [where for where, _, _ in containers()]


def test_manifests_are_valid_kubernetes() -> None:
    kinds = set()
    for name, doc in manifests():
        kinds.add(doc["kind"])
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["kind"] == "PodMonitor" and doc["spec"]["podMetricsEndpoints"], name
            continue
        kubernetes_validate.validate(doc, "1.30", strict=True)
    assert {"StatefulSet", "Deployment", "Job", "Secret", "PodMonitor"} <= kinds


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]


@pytest.mark.parametrize("index", range(len(container_ids())), ids=container_ids())
def test_container_uses_only_known_settings(index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    where, _, container = containers()[index]
    model = settings_model(container["command"])
    env = {e["name"] for e in container.get("env", [])}
    assert env <= variables(model), f"{where}: unknown {sorted(env - variables(model))}"
    assert required(model) <= env, f"{where}: missing {sorted(required(model) - env)}"
    settings(model, container_env(container), monkeypatch)  # the values are valid too
    secrets = {
        d["metadata"]["name"]: set(d["stringData"]) for d in documents(K8S / "secret.example.yaml")
    }
    for e in container.get("env", []):
        if ref := e.get("valueFrom", {}).get("secretKeyRef"):
            assert ref["key"] in secrets.get(ref["name"], set()), f"{where}: {ref}"


@pytest.mark.parametrize("index", range(len(container_ids())), ids=container_ids())
def test_probes_scrape_and_grace_period_match_the_process(
    index: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    where, pod, container = containers()[index]
    command = container["command"]
    model = settings_model(command)
    s = settings(model, container_env(container), monkeypatch)
    relay = model is RelaySettings
    drain = s.shutdown_timeout if relay else s.worker_shutdown_timeout
    prestops = [
        float(c["lifecycle"]["preStop"]["exec"]["command"][1])
        for c in pod["containers"]
        if c.get("lifecycle", {}).get("preStop")
    ]
    grace = pod.get("terminationGracePeriodSeconds", 30)
    assert grace > max([drain, *prestops]) + 5, f"{where}: grace {grace}s vs drain {drain}s"
    if command[-1] == "setup":
        return  # a one-shot Job: no port, no probes
    port = s.metrics_port if relay else s.worker_metrics_port
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/healthz", where
        assert ports.get(get["port"], get["port"]) == port, f"{where}: {probe} port"


def test_scrape_annotations_and_podmonitors_name_the_metrics_ports() -> None:
    port_names = set()
    for _, doc in manifests():
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        template = doc["spec"]["template"]
        notes = template["metadata"]["annotations"]
        ours = [c for c in template["spec"]["containers"] if c["image"].startswith("outbox-cdc")]
        ports = {p["containerPort"]: p["name"] for c in ours for p in c["ports"]}
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) in ports, doc["metadata"]["name"]
        assert notes["prometheus.io/path"] == "/metrics"
        port_names |= set(ports.values())
    monitors = [d for f, d in manifests() if d["kind"] == "PodMonitor"]
    for monitor in monitors:
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


def test_workers_run_two_replicas_with_a_disruption_budget() -> None:
    docs = [d for _, d in manifests()]
    workers = {
        d["metadata"]["name"]: d
        for d in docs
        if d["kind"] == "Deployment" and "outbox-cdc/worker" in d["metadata"]["labels"]
    }
    assert set(workers) == {"outbox-cdc-billing", "outbox-cdc-notifications"}
    budgets = {d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"}
    for name, deployment in workers.items():
        assert deployment["spec"]["replicas"] == 2
        assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
        assert name in budgets


def unit(path: Path) -> dict[str, list[str]]:
    """``Key`` -> every value it has in the unit file (EnvironmentFile repeats)."""
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key, []).append(value)
    return found


def seconds(value: str) -> float:
    return float(re.fullmatch(r"(\d+)s?", value).group(1))  # type: ignore[union-attr]


def env_file(path: str, instance: str) -> dict[str, str]:
    """The example of ``/etc/outbox-cdc/<name>.env`` as a dict."""
    name = Path(path.lstrip("-").replace("%i", instance)).name
    example = SYSTEMD / f"{name}.example"
    assert example.is_file(), f"no example for {path}"
    pairs = [
        line.split("=", 1)
        for line in example.read_text().splitlines()
        if line and not line.startswith("#")
    ]
    return dict(pairs)


UNITS = [
    ("outbox-cdc-setup.service", "", ["cdc", "setup"]),
    ("outbox-cdc-relay.service", "", ["cdc", "relay"]),
    ("consumers@.service", "billing", ["python", "-m", "consumers", "billing"]),
    ("consumers@.service", "notifications", ["python", "-m", "consumers", "notifications"]),
]


@pytest.mark.parametrize(("name", "instance", "command"), UNITS)
def test_systemd_unit_runs_the_documented_command(
    name: str, instance: str, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = unit(SYSTEMD / name)
    argv = keys["ExecStart"][0].replace("%i", instance).split()
    assert [Path(argv[0]).name, *argv[1:]] == command
    model = settings_model(argv)
    env: dict[str, str] = {}
    for path in keys["EnvironmentFile"]:
        env |= env_file(path, instance)
    assert set(env) <= variables(model), f"{name}: unknown {sorted(set(env) - variables(model))}"
    assert required(model) <= set(env)
    s = settings(model, env, monkeypatch)
    if command[-1] == "setup":
        return
    drain = s.shutdown_timeout if model is RelaySettings else s.worker_shutdown_timeout
    assert seconds(keys["TimeoutStopSec"][0]) > drain + 5
    assert keys["KillSignal"] == ["SIGTERM"]
