"""Fixtures that start or clean real services (PostgreSQL, RabbitMQ, the relay process).

The one place that creates and removes test resources. Everything a test creates carries a
name with the session tag, and is removed in teardown even when the test fails:

- ``pg_session_db`` (session): a throwaway database ``cdc_test_<tag>``, dropped at session end
  after terminating its backends/walsenders, rolling back its prepared transactions and
  dropping its slots;
- ``broker`` (session): a synchronous facade over aio-pika running in its own loop thread;
  at session end it deletes what the session declared and sweeps leftovers
  (``cdc_test.<tag>.*``, and stale ones of crashed sessions older than 6 h);
- ``env`` (function): unique table, slot, publication, exchange, parking queue and sink
  queue (durable classic, bound with ``#``), ``relay_env()`` with small timeouts, helpers to
  run ``python -m cdc``, start :class:`Relay` subprocesses, insert rows, drain the sink;
- ``tcp_proxy`` (function): a :class:`tcp_proxy.TcpProxy` to the broker, stopped at test end.

The servers come from :mod:`services`: containers started for the session when a Docker API
answers, else (or with ``CDC_TEST_SERVICES=local``) the local ones on 127.0.0.1, or
``CDC_TEST_PG_URL`` (an admin URL to the ``postgres`` database) and ``CDC_TEST_AMQP_URL``.
``pg_clusters`` starts throwaway servers of its own (PostgreSQL 15, or
``CDC_TEST_PG_VERSION``), with a physical standby when asked.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import struct
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
from harness import pgcluster, services
from harness.fakes import FakeServer, SmtpSink, WebhookReceiver, pg_message, self_signed
from harness.postgres import create_role, drop_database, drop_role, pg_connect, sweep_postgres
from harness.rabbitmq import (
    Broker,
    MemoryAlarm,
    RabbitApp,
    need_rabbitmqctl,
    rabbitmqctl,
    rabbitmqctl_names,
    wait_amqp_ready,
)
from harness.relay import Clusters, Env
from harness.session import (
    SESSION,
    STALE_AMQP_RE,
    close_services,
    db_url,
    is_ours_or_stale,
    session_services,
)
from harness.tcp_proxy import TcpProxy
from harness.workers import Domain, LedgerWorkerEnv
from psycopg import sql


def _xdist_controller(config: pytest.Config) -> bool:
    """True in the process that hands tests to pytest-xdist workers and runs none itself."""
    return not hasattr(config, "workerinput") and bool(getattr(config.option, "numprocesses", 0))


def pytest_configure(config: pytest.Config) -> None:
    # Local services are one broker for all: a worker stopping its application or raising
    # its memory alarm would break the tests other workers run at the same moment.
    if _xdist_controller(config) and services.decide()[0] == "local":
        raise pytest.UsageError(
            "the local test services are shared: run them without pytest-xdist (-n 0)"
        )


def pytest_sessionstart(session: pytest.Session) -> None:
    if _xdist_controller(session.config):
        return  # each worker starts (and describes) its own services
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(session_services().describe())


def pytest_unconfigure(config: pytest.Config) -> None:
    close_services()


@pytest.fixture
def pg_schema(pg_session_db: str) -> Iterator[str]:
    """A fresh schema ``cdc_test_<tag>`` in the session database, dropped (CASCADE) at the end."""
    name = f"cdc_test_{secrets.token_hex(4)}"
    with pg_connect(db_url(pg_session_db)) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with pg_connect(db_url(pg_session_db)) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def domain(env: Env, pg_schema: str) -> Iterator[Domain]:
    """Billing/notifications workers on ``env`` and ``pg_schema``; all removed at the end."""
    d = Domain(env, pg_schema)
    try:
        yield d
    finally:
        for w in d.workers:
            if w.log_path.exists():
                print(w.tail(60))
        errors = d.cleanup()
        if errors:
            print("teardown problems:", *errors, sep="\n  ")


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(fail_first=True)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    s = SmtpSink()
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def pg_session_db() -> Iterator[str]:
    """A throwaway database for the whole session, dropped (with its slots) at the end."""
    name = f"cdc_test_{SESSION}"
    with pg_connect(session_services().admin_url) as admin:
        sweep_postgres(admin, None)  # stale leftovers of crashed sessions
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with pg_connect(session_services().admin_url) as admin:
            swept = sweep_postgres(admin, name)
        leftovers = [s for s in swept if s != f"database {name}"]
        if leftovers:
            print(f"session sweep removed: {leftovers}")


@pytest.fixture(scope="session")
def broker() -> Iterator[Broker]:
    """The test-side AMQP client; sweeps this session's (and stale) queues/exchanges at end."""
    b = Broker()
    try:
        yield b
    finally:
        leftovers: list[str] = []
        with contextlib.suppress(Exception):
            wait_amqp_ready(timeout=60)
        for q in list(b.declared_queues):
            with contextlib.suppress(Exception):
                b.delete_queue(q)
        for e in list(b.declared_exchanges):
            with contextlib.suppress(Exception):
                b.delete_exchange(e)
        ours = f"cdc_test.{SESSION}."
        for q in rabbitmqctl_names("list_queues"):
            if is_ours_or_stale(q, ours, STALE_AMQP_RE):
                with contextlib.suppress(Exception):
                    b.delete_queue(q)
                    leftovers.append(q)
        for e in rabbitmqctl_names("list_exchanges"):
            if is_ours_or_stale(e, ours, STALE_AMQP_RE):
                with contextlib.suppress(Exception):
                    b.delete_exchange(e)
                    leftovers.append(e)
        if leftovers:
            print(f"session sweep removed: {leftovers}")
        b.close()


@pytest.fixture
def env(pg_session_db: str, broker: Broker, tmp_path: Path) -> Iterator[Env]:
    """A fresh set of names; the sink queue is declared and bound with '#'. Nothing is set up
    in PostgreSQL: call ``env.setup()`` (after creating a custom table if the test needs one)."""
    yield from _serve_env(Env(pg_session_db, broker, tmp_path))


@pytest.fixture
def private_env(
    private_pg: pgcluster.PgServer, broker: Broker, tmp_path: Path
) -> Iterator[Env]:
    """``env`` on a throwaway server of this test's own (``private_pg``), for settings that
    must not touch the shared one."""
    yield from _serve_env(Env("postgres", broker, tmp_path, url=private_pg.url()))


def _serve_env(e: Env) -> Iterator[Env]:
    try:
        e.declare_sink()
        yield e
    finally:
        for r in e.relays:
            if r.log_path.exists():
                print(r.tail(80))
        errors = e.cleanup()
        if errors:
            print("teardown problems:", *errors, sep="\n  ")


@pytest.fixture
def private_pg(request: pytest.FixtureRequest) -> Iterator[pgcluster.PgServer]:
    """A throwaway server (tests/harness/pgcluster.py, of the version under test) for this test;
    ``@pytest.mark.pg_settings(name=value, ...)`` adds server settings. Stopped and deleted
    at the end."""
    marker = request.node.get_closest_marker("pg_settings")
    pgcluster.sweep_stale()
    cluster = pgcluster.start_cluster(
        standby=False, settings=dict(marker.kwargs) if marker else None
    )
    try:
        yield cluster.primary
    finally:
        cluster.destroy()


@pytest.fixture
def no_cdc_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No CDC_* variable of the machine running the tests leaks into a settings model."""
    for name in list(os.environ):
        if name.upper().startswith("CDC_"):
            monkeypatch.delenv(name)


@pytest.fixture
def relay_role(env: Env) -> Iterator[str]:
    """A role ``cdc_test_<S>_<t>_relay`` with LOGIN REPLICATION and nothing else; its grants
    and the role go at teardown."""
    role = create_role("LOGIN REPLICATION", env, "relay")
    try:
        yield role
    finally:
        drop_role(env, role)


@pytest.fixture
def worker_role(env: Env, pg_schema: str) -> Iterator[str]:
    """A role ``cdc_test_<S>_<t>_worker`` with LOGIN only, made owner of ``pg_schema`` (where
    the domain workers keep their tables); what it owns, its grants and the role go at
    teardown."""
    role = create_role("LOGIN", env, "worker")
    try:
        env.sql(
            sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(
                sql.Identifier(pg_schema), sql.Identifier(role)
            )
        )
        yield role
    finally:
        drop_role(env, role)


@pytest.fixture
def amqp_user_without_configure(env: Env) -> Iterator[str]:
    """A broker user ``cdc_test.<S>.<t>`` that may write and read on ``/`` but declare
    nothing (configure ``^$``); its URL. Deleted at teardown."""
    if not session_services().has_rabbitmqctl():
        pytest.fail("rabbitmqctl is needed to create a broker user")
    user, password = f"cdc_test.{SESSION}.{env.tag}", secrets.token_hex(8)

    def ctl(*args: str) -> None:
        session_services().rabbitmqctl(*args, timeout=60, check=True)

    ctl("add_user", user, password)
    try:
        ctl("set_permissions", "-p", "/", user, "^$", ".*", ".*")
        parts = urlsplit(session_services().amqp_url)
        yield urlunsplit(("amqp", f"{user}:{password}@{parts.netloc.rpartition('@')[2]}",
                          "/", "", ""))  # fmt: skip
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            ctl("delete_user", user)


@pytest.fixture
def untrusted_tls_server(tmp_path: Path) -> Iterator[FakeServer]:
    """A TLS server with a self-signed certificate: a client's verification must fail."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    context = self_signed(tmp_path)

    def handshake(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    server = FakeServer(handshake)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def pg_starting_up() -> Iterator[FakeServer]:
    """A fake PostgreSQL that answers every login with FATAL 57P03 "starting up"."""

    def refuse(conn: socket.socket) -> None:
        while True:
            head = conn.recv(8, socket.MSG_WAITALL)
            if len(head) < 8:
                return
            length, code = struct.unpack("!II", head)
            conn.recv(length - 8, socket.MSG_WAITALL)
            if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest: not offered
                conn.sendall(b"N")
                continue
            fields = b"SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0"
            conn.sendall(pg_message(b"E", fields))
            return

    server = FakeServer(refuse)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tcp_proxy() -> Iterator[Any]:
    """A TCP proxy to the broker (127.0.0.1:<free port> -> 5672), stopped at test end."""
    parts = urlsplit(session_services().amqp_url)
    proxy = TcpProxy(upstream_port=parts.port or 5672, upstream_host=parts.hostname or "127.0.0.1")
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def pg_proxy() -> Iterator[Any]:
    """A TCP proxy to PostgreSQL (127.0.0.1:<free port> -> 5432), stopped at test end.

    ``pg_proxy.db_url(dbname)`` is a libpq URL through it."""
    parts = urlsplit(session_services().admin_url)
    proxy = TcpProxy(upstream_port=parts.port or 5432, upstream_host=parts.hostname or "127.0.0.1")
    proxy.start()

    def url(dbname: str) -> str:
        user = parts.netloc.rpartition("@")[0] or "postgres"
        netloc = f"{user}@{proxy.listen_host}:{proxy.port}"
        return urlunsplit((parts.scheme, netloc, f"/{dbname}", parts.query, ""))

    proxy.db_url = url  # type: ignore[attr-defined]
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def memory_alarm() -> Iterator[MemoryAlarm]:
    """A :class:`MemoryAlarm`; the finalizer restores the watermark whatever happened."""
    need_rabbitmqctl("the memory alarm test")
    alarm = MemoryAlarm()
    try:
        yield alarm
    finally:
        if alarm.raised:
            alarm.restore()


@pytest.fixture
def rabbit_app() -> Iterator[RabbitApp]:
    """Stops/starts the broker application; the finalizer starts it again whatever happened."""
    need_rabbitmqctl("the broker outage test")
    app = RabbitApp()
    try:
        yield app
    finally:
        if app.stopped:
            with contextlib.suppress(Exception):
                app._ctl("start_app")
        wait_amqp_ready(timeout=120)


@pytest.fixture
def pg_clusters(broker: Broker, tmp_path: Path) -> Iterator[Clusters]:
    """Start throwaway clusters (``pg_clusters.start(18)``); stopped and deleted at the end."""
    c = Clusters(broker, tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def ledger(pg_session_db: str, broker: Broker, tmp_path: Path) -> Iterator[LedgerWorkerEnv]:
    """Names for one runtime test with the ledger worker; everything removed at the end."""
    lg = LedgerWorkerEnv(pg_session_db, broker, tmp_path)
    try:
        yield lg
    finally:
        for w in lg.workers:
            if w.log_path.exists():
                print(w.tail(60))
        errors = lg.cleanup()
        if errors:
            print("teardown problems:", *errors, sep="\n  ")


@pytest.fixture
def rabbit_vhost() -> Iterator[tuple[str, str]]:
    """``(name, AMQP URL)`` of a fresh vhost (guest has every permission), deleted with all
    its queues and exchanges at the end. Lets a test use the real queue names
    (``billing-service.device-started``...) without touching anyone else's."""
    if not session_services().has_rabbitmqctl():
        pytest.skip("rabbitmqctl is not on PATH: cannot create a vhost")
    for stale in rabbitmqctl_names("list_vhosts"):
        if is_ours_or_stale(stale, "\0", STALE_AMQP_RE):
            with contextlib.suppress(subprocess.SubprocessError):
                rabbitmqctl("delete_vhost", stale)
    name = f"cdc_test.{SESSION}.{secrets.token_hex(3)}"
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        base = urlsplit(session_services().amqp_url)
        path = "/" + urllib.parse.quote(name, safe="")
        yield name, urlunsplit((base.scheme, base.netloc, path, base.query, ""))
    finally:
        # Another test may have the broker's app stopped (rabbit_app): wait for it.
        with contextlib.suppress(RuntimeError):
            wait_amqp_ready(timeout=120)
        rabbitmqctl("delete_vhost", name)


@pytest.fixture
def bootstrap_names() -> Iterator[dict[str, str]]:
    """Names for a database and the relay/worker roles, all dropped at the end (roles are
    cluster-wide: they carry the session tag)."""
    names = {
        "db": f"cdc_test_{SESSION}_boot{secrets.token_hex(2)}",
        "relay_role": f"cdc_test_{SESSION}_relay",
        "worker_role": f"cdc_test_{SESSION}_worker",
        "monitor_role": f"cdc_test_{SESSION}_monitor",
    }
    try:
        yield names
    finally:
        with pg_connect(session_services().admin_url) as admin:
            drop_database(admin, names["db"])
            for role in (names["relay_role"], names["worker_role"], names["monitor_role"]):
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
