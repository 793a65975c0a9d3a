"""The Kubernetes manifests and systemd units use only the documented contract.

- The kustomization renders (resources, generated ConfigMap, image tag) to manifests valid
  against the Kubernetes 1.30 schema; the optional files too, custom resources (KEDA,
  Prometheus Operator) against their CRDs' schemas (tests/fixtures/crd-schemas).
- Every pod passes the ``restricted`` Pod Security level (checked here rule by rule, as the
  admission controller does) and mounts no ServiceAccount token.
- Bootstrap cannot deadlock: the database pod holds PostgreSQL only and is Ready on
  pg_isready alone; the setup Job waits for it, then creates roles, slot and grants.
- Autoscalers target the worker Deployments and the queues those workers consume.
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
import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from pydantic_settings import BaseSettings

from cdc.config import RelaySettings
from consumers.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
SYSTEMD = ROOT / "deploy" / "systemd"
CRD_SCHEMAS = ROOT / "tests" / "fixtures" / "crd-schemas"
WORKLOADS = {"Deployment", "StatefulSet", "Job"}


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every document of every manifest file, optional ones included."""
    paths = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [(p.name, d) for p in paths for d in documents(p)]


def rendered() -> list[dict[str, Any]]:
    """What ``kubectl apply -k deploy/kubernetes`` applies, for the kustomization features it
    uses (kustomize itself may not be installed): its resources, the ConfigMaps of
    ``configMapGenerator`` (no name suffix) and the ``images`` tag."""
    k = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(k) <= {
        "apiVersion",
        "kind",
        "resources",
        "configMapGenerator",
        "generatorOptions",
        "images",
    }, "render() does not know a new feature"
    docs = [d for name in k["resources"] for d in documents(K8S / name)]
    assert k["generatorOptions"] == {"disableNameSuffixHash": True}
    for gen in k["configMapGenerator"]:
        data = {Path(f).name: (K8S / f).read_text() for f in gen["files"]}
        meta = {"name": gen["name"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data})
    tags = {i["name"]: i["newTag"] for i in k["images"]}
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            for c in all_containers(doc["spec"]["template"]["spec"]):
                if c["image"] in tags:
                    c["image"] = f"{c['image']}:{tags[c['image']]}"
    return docs


def all_containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


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
        for c in all_containers(d["spec"]["template"]["spec"])
        if c["image"].startswith("outbox-cdc")
    ]


def container_ids() -> list[str]:
    return [where for where, _, _ in containers()]


def validate(doc: dict[str, Any]) -> None:
    """Kubernetes' own schema, or the CRD's for a custom resource (unknown fields fail)."""
    group, _, version = doc["apiVersion"].rpartition("/")
    if "." not in group or group.endswith(".k8s.io"):
        kubernetes_validate.validate(doc, "1.30", strict=True)
        return
    path = CRD_SCHEMAS / group / f"{doc['kind'].lower()}_{version}.json"
    assert path.is_file(), f"no schema for {doc['apiVersion']} {doc['kind']}"
    jsonschema.validate(doc, json.loads(path.read_text()))


def test_rendered_kustomization_and_optional_files_are_valid() -> None:
    kinds = set()
    for doc in rendered():
        validate(doc)
        kinds.add(doc["kind"])
    assert {"StatefulSet", "Deployment", "Job", "ConfigMap", "Service"} <= kinds
    for _, doc in manifests():
        validate(doc)
        kinds.add(doc["kind"])
    assert {"Secret", "PodMonitor", "ScaledObject", "HorizontalPodAutoscaler"} <= kinds


def test_crd_validation_rejects_a_misspelt_field() -> None:
    docs = documents(K8S / "autoscaling-keda.yaml")
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    bad = {**scaled, "spec": {**scaled["spec"], "minReplicas": 2}}
    with pytest.raises(jsonschema.ValidationError, match="minReplicas"):
        validate(bad)


def test_kustomization_lists_existing_files() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomization["resources"]:
        assert (K8S / resource).is_file(), resource
    assert "secret.example.yaml" not in kustomization["resources"]


# The restricted Pod Security Standard (Kubernetes 1.30), baseline rules included.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Why the ``restricted`` Pod Security level would refuse this pod spec (empty: admitted).
    Also flags a mounted ServiceAccount token, which these pods never need."""
    bad: list[str] = []
    psc = pod.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad.append(key)
    for vol in pod.get("volumes", []):
        kind = next(k for k in vol if k != "name")
        if kind not in RESTRICTED_VOLUMES:
            bad.append(f"volume {vol['name']}: {kind}")
    for sysctl in psc.get("sysctls", []):
        if sysctl["name"] not in SAFE_SYSCTLS:
            bad.append(f"sysctl {sysctl['name']}")
    if pod.get("automountServiceAccountToken") is not False:
        bad.append("ServiceAccount token mounted (automountServiceAccountToken not false)")
    for c in all_containers(pod):
        sc, where = c.get("securityContext", {}), f"container {c['name']}"
        if sc.get("privileged"):
            bad.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            bad.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: adds capabilities {caps['add']}")
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            bad.append(f"{where}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{where}: runAsUser 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{where}: hostPort")
        if sc.get("procMount", "Default") != "Default":
            bad.append(f"{where}: procMount")
        se = sc.get("seLinuxOptions", psc.get("seLinuxOptions", {}))
        if (
            se.get("user")
            or se.get("role")
            or se.get("type", "container_t")
            not in ("container_t", "container_init_t", "container_kvm_t", "container_engine_t")
        ):
            bad.append(f"{where}: seLinuxOptions")
    return bad


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """The rendered kustomization's pods, then those of the files applied on their own."""
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    docs = [("kustomize", d) for d in rendered()]
    docs += [(f, d) for f, d in manifests() if f not in listed]
    return [
        (f"{f}:{d['kind']}/{d['metadata']['name']}", d["spec"]["template"]["spec"])
        for f, d in docs
        if d["kind"] in WORKLOADS
    ]


@pytest.mark.parametrize("index", range(len(pod_specs())), ids=[w for w, _ in pod_specs()])
def test_pod_passes_the_restricted_pod_security_level(index: int) -> None:
    where, pod = pod_specs()[index]
    assert restricted_violations(pod) == [], where


def test_restricted_check_refuses_what_the_level_refuses() -> None:
    pod = {
        "hostNetwork": True,
        "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "privileged": True,
                    "runAsUser": 0,
                    "capabilities": {"add": ["SYS_ADMIN"]},
                },
                "ports": [{"containerPort": 80, "hostPort": 80}],
            }
        ],
    }
    assert restricted_violations(pod) == [
        "hostNetwork",
        "volume h: hostPath",
        "ServiceAccount token mounted (automountServiceAccountToken not false)",
        "container c: privileged",
        "container c: allowPrivilegeEscalation must be false",
        "container c: capabilities must drop ALL",
        "container c: adds capabilities ['SYS_ADMIN']",
        "container c: runAsNonRoot must be true",
        "container c: runAsUser 0",
        "container c: seccompProfile must be RuntimeDefault or Localhost",
        "container c: hostPort",
    ]


def test_database_readiness_does_not_depend_on_the_relay_or_the_setup() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered()}
    db = docs[("StatefulSet", "postgres")]
    pod = db["spec"]["template"]["spec"]
    assert [c["name"] for c in all_containers(pod)] == ["postgres"]
    assert pod["containers"][0]["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    # Clients use a Service that follows readiness; the governing Service's DNS name exists
    # from the pod's start.
    assert not docs[("Service", "postgres")]["spec"].get("publishNotReadyAddresses")
    governing = docs[("Service", db["spec"]["serviceName"])]["spec"]
    assert governing["clusterIP"] == "None" and governing["publishNotReadyAddresses"]
    relay = docs[("Deployment", "outbox-cdc-relay")]["spec"]
    assert relay["replicas"] == 2  # one streams, one waits as hot standby


def test_setup_job_creates_database_roles_slot_and_grants_in_order() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in rendered()}
    pod = docs[("Job", "outbox-cdc-setup")]["spec"]["template"]["spec"]
    steps = all_containers(pod)
    assert [c["name"] for c in steps] == ["database", "setup", "grants"]
    assert steps[1]["command"] == ["cdc", "setup"]
    sql_files = docs[("ConfigMap", pod["volumes"][0]["configMap"]["name"])]["data"]
    for step, script in ((steps[0], "roles.sql"), (steps[2], "grants.sql")):
        text = " ".join(step["command"])
        assert f"/sql/{script}" in text and "ON_ERROR_STOP=1" in text, step["name"]
        assert script in sql_files
        # Every psql variable the script reads is set on the command line (\getenv ones
        # come from the environment).
        code = "\n".join(
            line for line in sql_files[script].splitlines() if not line.startswith("--")
        )
        used = set(re.findall(r"(?<![:\w]):['\"]?([A-Za-z_]\w*)", code))
        env = {e["name"] for e in step["env"]}
        getenv = dict(re.findall(r"\\getenv (\w+) (\w+)", sql_files[script]))
        assert set(getenv.values()) <= env, step["name"]
        given = set(re.findall(r"-v (\w+)=", text)) | set(getenv)
        assert used - {"ON_ERROR_STOP"} <= given, (step["name"], used - given)
    assert "until pg_isready" in " ".join(steps[0]["command"])


def test_autoscalers_target_the_workers_and_their_queues(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumers.loader import build_spec, load
    from consumers.runtime.runner import names_for

    monkeypatch.setenv("CDC_DATABASE_URL", "postgresql://u@db/app")
    monkeypatch.setenv("CDC_AMQP_URL", "amqp://u:p@broker:5672/")
    deployments = {d["metadata"]["name"]: d for _, d in manifests() if d["kind"] == "Deployment"}
    keda = documents(K8S / "autoscaling-keda.yaml")
    auth = {d["metadata"]["name"] for d in keda if d["kind"] == "TriggerAuthentication"}
    secrets = {
        d["metadata"]["name"]: set(d["stringData"]) for d in documents(K8S / "secret.example.yaml")
    }
    for d in keda:
        if d["kind"] == "TriggerAuthentication":
            for ref in d["spec"]["secretTargetRef"]:
                assert ref["key"] in secrets[ref["name"]]
            continue
        target = deployments[d["spec"]["scaleTargetRef"]["name"]]
        worker = target["metadata"]["labels"]["outbox-cdc/worker"]
        module = load(worker)
        settings = module.settings()
        queues = [q for q, _ in names_for(settings, build_spec(module, settings)).queues]
        triggers = d["spec"]["triggers"]
        assert [t["metadata"]["queueName"] for t in triggers] == queues, worker
        assert all(t["authenticationRef"]["name"] in auth for t in triggers)
        assert d["spec"]["minReplicaCount"] >= 2  # the PodDisruptionBudget keeps one
    for d in documents(K8S / "autoscaling-hpa.yaml"):
        assert d["spec"]["scaleTargetRef"]["name"] in deployments
        assert d["spec"]["minReplicas"] >= 2
        metric = d["spec"]["metrics"][0]["pods"]["metric"]["name"]
        assert metric == "cdc_worker_event_age_seconds"


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
        notes = template["metadata"].get("annotations", {})
        ports = {
            p["containerPort"]: p["name"]
            for c in template["spec"]["containers"]
            for p in c["ports"]
        }
        if doc["metadata"]["name"] == "postgres":
            assert not notes  # scraped through postgres_exporter
            continue
        assert notes["prometheus.io/scrape"] == "true"
        assert int(notes["prometheus.io/port"]) in ports, doc["metadata"]["name"]
        assert notes["prometheus.io/path"] == "/metrics"
        port_names |= set(ports.values())
    monitors = [d for f, d in manifests() if d["kind"] == "PodMonitor"]
    assert len(monitors) == 3
    for monitor in monitors:
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


def test_exporter_runs_the_shipped_slot_queries() -> None:
    docs = documents(K8S / "monitoring.yaml")
    [config] = [d for d in docs if d["kind"] == "ConfigMap"]
    shipped = (ROOT / "deploy" / "prometheus" / "postgres-exporter-queries.yaml").read_text()
    assert config["data"]["queries.yaml"] == shipped


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
