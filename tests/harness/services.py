"""Where the test session's PostgreSQL and RabbitMQ come from: containers or local servers.

``CDC_TEST_SERVICES`` decides:

- ``containers``: one PostgreSQL (``wal_level=logical``) and one RabbitMQ container per test
  session, started through testcontainers on the Docker API in ``DOCKER_HOST`` (or Docker's
  default socket) and removed when the session ends, whatever happened. Under pytest-xdist
  each worker process is a session with containers of its own, so a test that stops the
  broker or raises its memory alarm affects only its own worker's;
- ``local``: the servers on 127.0.0.1 (PostgreSQL 5432 as ``postgres``, trust; RabbitMQ 5672
  guest/guest), or ``CDC_TEST_PG_URL`` / ``CDC_TEST_AMQP_URL``. The tests never reconfigure
  or restart them: they must already run with ``wal_level=logical`` and
  ``max_prepared_transactions`` > 0. Some tests stop that broker's application or raise its
  memory alarm, so the session refuses pytest-xdist workers (``-n``) here;
- unset: ``containers`` when a Docker API answers, else ``local``. Setting
  ``CDC_TEST_PG_URL`` or ``CDC_TEST_AMQP_URL`` means ``local``.

Images come from ``CDC_TEST_PG_IMAGE`` (default ``postgres:15``) and
``CDC_TEST_RABBITMQ_IMAGE`` (default ``rabbitmq:3-management``), so the same tests run
unchanged on a machine with Docker and the official images, and on one whose local look-alikes
``scripts/container-engine.sh`` builds. ``rabbitmqctl`` runs inside the broker container
there, and on the host in local mode.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]

PG_IMAGE_DEFAULT = "postgres:15"
RABBITMQ_IMAGE_DEFAULT = "rabbitmq:3-management"
LOCAL_PG_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LOCAL_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
LOCAL_RABBIT_METRICS_URL = "http://127.0.0.1:15692/metrics/per-object"
#: Server flags of the PostgreSQL container: what the relay needs (logical decoding, prepared
#: transactions for the two-phase tests, room for many slots and walsenders at once) and
#: fsync off, since the container's data is thrown away with it.
PG_FLAGS = (
    "-c wal_level=logical -c max_prepared_transactions=64 -c max_replication_slots=32"
    " -c max_wal_senders=32 -c max_connections=200 -c fsync=off"
)
#: The run this session belongs to (scripts/test.sh sets it), in the label of every container
#: the tests start, so `scripts/container-engine.sh down` removes what a killed run left
#: behind, and only that run's.
RUN_ID = os.environ.get("CDC_TEST_RUN_ID", "true")
TEST_LABEL = {"outbox-cdc.test": RUN_ID}


class ServicesError(RuntimeError):
    """The test services could not be provided; the message says what to set or start."""


@dataclass
class Services:
    """The session's server URLs, and how to run ``rabbitmqctl`` against that broker."""

    mode: str
    admin_url: str
    amqp_url: str
    detail: str
    #: the broker's Prometheus endpoint (rabbitmq_prometheus), per-object metrics
    rabbit_metrics_url: str = LOCAL_RABBIT_METRICS_URL
    _containers: list[Any] = field(default_factory=list)
    _broker: Any = None

    def describe(self) -> str:
        return f"test services: {self.mode} ({self.detail})"

    def has_rabbitmqctl(self) -> bool:
        return self._broker is not None or shutil.which("rabbitmqctl") is not None

    def broker_tool(
        self, tool: str, *args: str, timeout: float = 120, check: bool = False
    ) -> tuple[int, str]:
        """Run the broker's ``rabbitmqctl`` or ``rabbitmq-plugins`` with ``args``: inside the
        broker container, or on the host. (exit code, stdout + stderr); ``check`` raises
        :class:`subprocess.CalledProcessError` on a non-zero exit."""
        if self._broker is not None:
            code, raw = self._broker.exec([tool, *args])
            code, out = int(code), raw.decode(errors="replace")
        else:
            res = subprocess.run(
                [tool, *args], capture_output=True, text=True, timeout=timeout, check=False
            )
            code, out = res.returncode, res.stdout + res.stderr
        if check and code != 0:
            raise subprocess.CalledProcessError(code, [tool, *args], out)
        return code, out

    def rabbitmqctl(self, *args: str, timeout: float = 120, check: bool = False) -> tuple[int, str]:
        """``rabbitmqctl ARGS`` on the session's broker (see :meth:`broker_tool`)."""
        return self.broker_tool("rabbitmqctl", *args, timeout=timeout, check=check)

    def close(self) -> None:
        """Remove the containers (and their anonymous volumes); safe to call twice."""
        while self._containers:
            container = self._containers.pop()
            try:
                container.stop(force=True, delete_volume=True)
            except Exception as exc:  # keep removing the others
                print(f"could not remove test container {container}: {exc}")


def docker_api_answers() -> bool:
    """True when a Docker-compatible API (Docker, or podman's service) is reachable."""
    try:
        import docker

        client = docker.from_env(timeout=5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def _start_containers() -> Services:
    from testcontainers.core.container import DockerContainer

    try:  # testcontainers >= 4.14 moved it; the old path warns
        from testcontainers.community.postgres import PostgresContainer
    except ImportError:
        from testcontainers.postgres import PostgresContainer

    pg_image = os.environ.get("CDC_TEST_PG_IMAGE", PG_IMAGE_DEFAULT)
    mq_image = os.environ.get("CDC_TEST_RABBITMQ_IMAGE", RABBITMQ_IMAGE_DEFAULT)
    pg = (
        PostgresContainer(pg_image, username="postgres", password="postgres", dbname="postgres")
        .with_env("POSTGRES_HOST_AUTH_METHOD", "trust")  # as the local server: no password
        .with_command(PG_FLAGS)
        .with_kwargs(labels=TEST_LABEL)
    )
    mq = (
        DockerContainer(mq_image)
        .with_env("RABBITMQ_DEFAULT_USER", "guest")
        .with_env("RABBITMQ_DEFAULT_PASS", "guest")
        .with_exposed_ports(5672, 15692)
        .with_kwargs(labels=TEST_LABEL)
    )
    services = Services(
        "containers", "", "", f"{pg_image}, {mq_image}", _containers=[pg, mq], _broker=mq
    )
    atexit.register(services.close)  # also when the session dies before its hooks run
    errors: list[BaseException] = []

    def start(container: Any) -> None:
        try:
            container.start()
        except BaseException as exc:
            errors.append(exc)

    # Both at once: the broker's boot (Erlang) is the slower of the two.
    threads = [threading.Thread(target=start, args=(c,)) for c in (pg, mq)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        services.close()
        raise ServicesError(
            f"could not start the test containers ({errors[0]!r}); run "
            "scripts/container-engine.sh up, or set CDC_TEST_SERVICES=local"
        ) from errors[0]
    host = pg.get_container_host_ip()
    services.admin_url = (
        f"postgresql://postgres@{host}:{pg.get_exposed_port(5432)}/postgres"
    )
    services.amqp_url = f"amqp://guest:guest@{host}:{mq.get_exposed_port(5672)}/"
    services.rabbit_metrics_url = (
        f"http://{host}:{mq.get_exposed_port(15692)}/metrics/per-object"
    )
    _wait_broker(mq)
    return services


def _wait_broker(mq: Any, timeout: float = 120) -> None:
    """Until the broker accepts AMQP logins (its port opens before the app is up)."""
    deadline = time.monotonic() + timeout
    while True:  # await_startup fails at once while the Erlang node itself is not up yet
        code, out = mq.exec(["rabbitmqctl", "await_startup", "--timeout", "30"])
        if code == 0:
            return
        if time.monotonic() > deadline:
            text = out.decode(errors="replace")
            raise ServicesError(f"the broker container did not start within {timeout} s: {text}")
        time.sleep(1)


def decide() -> tuple[str, str]:
    """``("containers" | "local", why)`` as the module docstring says, starting nothing."""
    wanted = os.environ.get("CDC_TEST_SERVICES", "").strip().lower()
    explicit_urls = "CDC_TEST_PG_URL" in os.environ or "CDC_TEST_AMQP_URL" in os.environ
    if wanted not in ("", "local", "containers"):
        raise ServicesError(f"CDC_TEST_SERVICES={wanted!r}: use 'containers' or 'local'")
    if wanted == "containers" or (not wanted and not explicit_urls and docker_api_answers()):
        return "containers", ""
    why = "CDC_TEST_SERVICES=local" if wanted else "no Docker API answers"
    if explicit_urls and not wanted:
        why = "CDC_TEST_PG_URL/CDC_TEST_AMQP_URL set"
    return "local", why


def choose() -> Services:
    """Decide (see the module docstring) and provide the session's services."""
    mode, why = decide()
    if mode == "containers":
        return _start_containers()
    return Services(
        "local",
        os.environ.get("CDC_TEST_PG_URL", LOCAL_PG_URL),
        os.environ.get("CDC_TEST_AMQP_URL", LOCAL_AMQP_URL),
        why,
    )


# --------------------------------------------------------------------------------------------
# the project's own image (deploy/Dockerfile)


@functools.cache
def app_image() -> str:
    """The project's image: ``CDC_TEST_IMAGE``, or built once now by scripts/build-image.sh."""
    image = os.environ.get("CDC_TEST_IMAGE")
    if image:
        return image
    res = subprocess.run(
        ["bash", str(REPO / "scripts" / "build-image.sh")],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    if res.returncode != 0:
        raise ServicesError(f"building deploy/Dockerfile failed:\n{res.stderr[-3000:]}")
    print(res.stderr.strip())
    return res.stdout.strip().splitlines()[-1]


@contextmanager
def image_containers() -> Iterator[Any]:
    """A ``run(image, command, environment)`` starting containers on the host's network (they
    reach the session's servers at the same addresses as the tests); all removed at exit."""
    from testcontainers.core.container import DockerContainer

    started: list[Any] = []

    def run(image: str, command: list[str], environment: dict[str, str]) -> Any:
        container = DockerContainer(image).with_command(command)
        container.with_kwargs(network_mode="host", labels=TEST_LABEL)
        for key, value in environment.items():
            container.with_env(key, value)
        started.append(container)
        return container.start().get_wrapped_container()

    try:
        yield run
    finally:
        for container in started:
            try:
                container.stop(force=True, delete_volume=True)
            except Exception as exc:
                print(f"could not remove container of {container.image}: {exc}")
