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

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import aiormq
import pgcluster
import psycopg
import pytest
import services
import yaml
from psycopg import sql
from psycopg.rows import dict_row

REPO = Path(__file__).resolve().parent.parent
# --- test services (tests/services.py): containers per session, or the local servers -------
SERVICES = services.choose()
ADMIN_URL = SERVICES.admin_url
AMQP_URL = SERVICES.amqp_url


def pytest_sessionstart(session: pytest.Session) -> None:
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(SERVICES.describe())


def pytest_unconfigure(config: pytest.Config) -> None:
    SERVICES.close()


# --------------------------------------------------------------------------------------------
#: Session tag: 8 hex digits of the start time (for the stale sweep) + 4 random ones.
SESSION = f"{int(time.time()):08x}{secrets.token_hex(2)}"
STALE_AFTER_S = 6 * 3600
_STALE_DB_RE = re.compile(r"^cdc_test_([0-9a-f]{8})[0-9a-f]{4}$")
_STALE_SLOT_RE = re.compile(r"^cdc_test_([0-9a-f]{8})[0-9a-f]{4}_")
_STALE_AMQP_RE = re.compile(r"^cdc_test\.([0-9a-f]{8})[0-9a-f]{4}\.")
_LSN_RE = re.compile(r"^([0-9A-F]{1,8})/([0-9A-F]{1,8})$")
_SNAPSHOT_RE = re.compile(r"^\d+:\d+:(\d+(,\d+)*)?$")


# --------------------------------------------------------------------------------------------
# small helpers


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> int (tests keep their own copy; they do not trust cdc.lsn)."""
    m = _LSN_RE.match(text.strip().upper())
    if m is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    message: str | Callable[[], str] = "condition",
    interval: float = 0.1,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``message`` at the end."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {text}")
        time.sleep(interval)


def with_overrides(env: dict[str, str], overrides: dict[str, Any]) -> dict[str, str]:
    """``env`` with ``overrides`` applied: ``name=value`` sets ``CDC_NAME``, ``None`` removes it."""
    for key, value in overrides.items():
        name = key if key.startswith("CDC_") else f"CDC_{key.upper()}"
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def _with_login(url: str, user: str | None, password: str | None) -> tuple[Any, str]:
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    old_user, _, old_password = userinfo.partition(":")
    user = user if user is not None else old_user
    password = password if password is not None else old_password
    return parts, f"{user}:{password}@{hostport}" if password else f"{user}@{hostport}"


def db_url(dbname: str, password: str | None = None, user: str | None = None) -> str:
    """The admin URL pointed at ``dbname`` (optionally as another user, with a password)."""
    parts, netloc = _with_login(ADMIN_URL, user or urlsplit(ADMIN_URL).username or "postgres",
                                password)  # fmt: skip
    return urlunsplit((parts.scheme, netloc, f"/{dbname}", parts.query, parts.fragment))


def broker_url(password: str | None = None, vhost: str = "/", scheme: str = "amqp") -> str:
    """The session's broker URL with another password, vhost or scheme (same host and port)."""
    _, netloc = _with_login(AMQP_URL, None, password)
    return urlunsplit((scheme, netloc, vhost if vhost == "/" else f"/{vhost}", "", ""))


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format -> {name: [(labels, value), ...]} (enough for our assertions)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    line_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if m is None:
            continue
        labels = dict(label_re.findall(m.group(3) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(4))))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``; None if absent."""
    samples = parse_metrics(text).get(name)
    if samples is None:
        return None
    return sum(v for lab, v in samples if all(lab.get(k) == val for k, val in labels.items()))



class Teardown:
    """Runs cleanup steps one after another, collecting failures instead of stopping."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def step(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:
            self.errors.append(f"{what}: {exc!r}")


def _run_async_in_thread(coro_fn: Callable[[], Any], timeout: float = 60) -> Any:
    """Run a coroutine function on a fresh loop in a fresh thread (safe from any context)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro_fn())
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if "error" in result:
        raise result["error"]
    return result.get("value")


# --------------------------------------------------------------------------------------------
# RabbitMQ


def _plain(value: Any) -> Any:
    """AMQP table values -> plain Python (bytes decoded as UTF-8 where possible)."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class Msg:
    """One message taken from a queue, with what the contract talks about."""

    body: bytes
    message_id: str | None
    type: str | None
    content_type: str | None
    delivery_mode: int | None
    timestamp: dt.datetime | None
    headers: dict[str, Any]
    routing_key: str | None
    exchange: str | None

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def commit_lsn(self) -> int:
        return parse_lsn(str(self.headers["commit_lsn"]))


def _to_msg(m: aio_pika.abc.AbstractIncomingMessage) -> Msg:
    return Msg(
        body=bytes(m.body),
        message_id=m.message_id,
        type=m.type,
        content_type=m.content_type,
        delivery_mode=int(m.delivery_mode) if m.delivery_mode is not None else None,
        timestamp=m.timestamp,
        headers=_plain(dict(m.headers or {})),
        routing_key=m.routing_key,
        exchange=m.exchange,
    )


_CONNECTION_ERRORS = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
    TimeoutError,
    RuntimeError,  # aio-pika: "<Connection ...> closed"
)


class Broker:
    """Synchronous facade over one aio-pika connection living in a background loop thread.

    Every operation opens a channel, so a channel-level error (e.g. a passive declare of a
    missing queue) does not break later calls; a dead connection is reopened, retrying for
    up to ``OUTAGE_S`` while the broker is unreachable.
    """

    def __init__(self, url: str = AMQP_URL) -> None:
        self.url = url
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="amqp")
        self._thread.start()
        self._conn: aio_pika.abc.AbstractConnection | None = None
        self._conn_lock = asyncio.Lock()
        self.declared_queues: set[str] = set()
        self.declared_exchanges: set[str] = set()

    #: How long an operation keeps retrying while the broker is unreachable (another test
    #: session may be running ``rabbitmqctl stop_app`` on the shared broker).
    OUTAGE_S = 60.0

    async def _connection(self, deadline: float) -> aio_pika.abc.AbstractConnection:
        async with self._conn_lock:
            while True:
                if self._conn is not None and not self._conn.is_closed:
                    return self._conn
                try:
                    self._conn = await aio_pika.connect(self.url, timeout=5)
                    return self._conn
                except _CONNECTION_ERRORS:
                    self._conn = None
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

    async def _forget_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
        self._conn = None

    def _run(self, fn: Callable[[aio_pika.abc.AbstractChannel], Any], timeout: float = 60) -> Any:
        """Run ``fn(channel)`` on a fresh channel, retrying through a broker outage."""

        async def with_channel() -> Any:
            deadline = time.monotonic() + self.OUTAGE_S
            while True:
                try:
                    conn = await self._connection(deadline)
                    async with conn.channel() as channel:
                        return await fn(channel)
                except _CONNECTION_ERRORS:
                    await self._forget_connection()
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)

        return asyncio.run_coroutine_threadsafe(with_channel(), self._loop).result(
            timeout + self.OUTAGE_S
        )

    def close(self) -> None:
        async def close() -> None:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    await self._conn.close()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    # -- topology ---------------------------------------------------------------------------

    def declare_exchange(self, name: str) -> None:
        self.declared_exchanges.add(name)

        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await ch.declare_exchange(name, aio_pika.ExchangeType.TOPIC, durable=True)

        self._run(fn)

    def declare_queue(
        self, name: str, bind_to: str | None = None, keys: Iterable[str] = ()
    ) -> None:
        self.declared_queues.add(name)
        keys = list(keys)

        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            q = await ch.declare_queue(name, durable=True, arguments={"x-queue-type": "classic"})
            for key in keys:
                await q.bind(bind_to, routing_key=key)

        self._run(fn)

    def bind(self, queue: str, exchange: str, key: str) -> None:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await (await ch.get_underlay_channel()).queue_bind(queue, exchange, routing_key=key)

        self._run(fn)

    def unbind(self, queue: str, exchange: str, key: str) -> None:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await (await ch.get_underlay_channel()).queue_unbind(queue, exchange, routing_key=key)

        self._run(fn)

    def queue_count(self, name: str) -> int | None:
        """Ready messages in ``name`` (passive declare); None if the queue does not exist."""

        async def fn(ch: aio_pika.abc.AbstractChannel) -> int | None:
            try:
                ok = await (await ch.get_underlay_channel()).queue_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return None
            return int(ok.message_count)

        return self._run(fn, timeout=20)

    def exchange_exists(self, name: str) -> bool:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> bool:
            try:
                await (await ch.get_underlay_channel()).exchange_declare(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return False
            return True

        return bool(self._run(fn))

    def delete_queue(self, name: str) -> None:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await (await ch.get_underlay_channel()).queue_delete(name)

        with contextlib.suppress(aiormq.exceptions.ChannelNotFoundEntity):
            self._run(fn)
        self.declared_queues.discard(name)

    def delete_exchange(self, name: str) -> None:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            await (await ch.get_underlay_channel()).exchange_delete(name)

        with contextlib.suppress(aiormq.exceptions.ChannelNotFoundEntity):
            self._run(fn)
        self.declared_exchanges.discard(name)

    # -- consuming --------------------------------------------------------------------------

    def drain(
        self,
        queue: str,
        expected: int | None = None,
        quiet: float = 1.0,
        timeout: float = 60.0,
        stop: Callable[[list[Msg]], bool] | None = None,
    ) -> list[Msg]:
        """Consume ``queue`` (acking) and return the messages in arrival order.

        Stops when at least ``expected`` messages arrived (or ``stop(msgs)`` is true) and then
        nothing more came for ``quiet`` seconds, or when nothing came for ``quiet`` seconds
        with ``expected`` None, or at ``timeout`` (the caller asserts on what it got).
        """

        async def consume() -> list[Msg]:
            msgs: list[Msg] = []
            ids: set[str | None] = set()
            last = [time.monotonic()]
            deadline = time.monotonic() + timeout
            reconnected = False

            def enough() -> bool:
                return (expected is None or len(msgs) >= expected) and (stop is None or stop(msgs))

            async def on_message(m: aio_pika.abc.AbstractIncomingMessage) -> None:
                # After a reconnect, a message we took but whose ack was lost comes back
                # flagged redelivered: that is our artefact, not a duplicate from the relay.
                if not (reconnected and m.redelivered and m.message_id in ids):
                    msgs.append(_to_msg(m))
                    ids.add(m.message_id)
                last[0] = time.monotonic()
                await m.ack()

            while True:
                try:
                    conn = await self._connection(deadline + self.OUTAGE_S)
                    async with conn.channel() as ch:
                        await ch.set_qos(prefetch_count=2000)
                        q = await ch.declare_queue(queue, passive=True)
                        tag = await q.consume(on_message)
                        try:
                            while time.monotonic() < deadline:
                                await asyncio.sleep(0.05)
                                if ch.is_closed:
                                    raise ConnectionError("channel closed under the drain")
                                if enough() and time.monotonic() - last[0] >= quiet:
                                    break
                        finally:
                            with contextlib.suppress(Exception):
                                await q.cancel(tag)
                    return msgs
                except _CONNECTION_ERRORS:
                    # keep what was taken (and acked) so far; go on after the broker is back
                    reconnected = True
                    await self._forget_connection()
                    if time.monotonic() > deadline + self.OUTAGE_S:
                        return msgs
                    await asyncio.sleep(0.5)

        return list(
            asyncio.run_coroutine_threadsafe(consume(), self._loop).result(
                timeout + 2 * self.OUTAGE_S + 30
            )
        )


def wait_amqp_ready(url: str = AMQP_URL, timeout: float = 90.0) -> None:
    """Block until the broker accepts an AMQP connection again."""

    async def probe() -> bool:
        try:
            conn = await aio_pika.connect(url, timeout=3)
        except Exception:
            return False
        await conn.close()
        return True

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _run_async_in_thread(probe, timeout=10):
            return
        time.sleep(0.5)
    raise RuntimeError(f"broker at {url} did not come back within {timeout}s")


def _rabbitmqctl_names(kind: str) -> list[str]:
    if not SERVICES.has_rabbitmqctl():
        return []
    try:
        code, out = SERVICES.rabbitmqctl(kind, "--quiet", "--no-table-headers", "name", timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()] if code == 0 else []


def unacked_messages(queues: Iterable[str]) -> int:
    """Messages of ``queues`` delivered and not yet acked, as the broker counts them
    (``rabbitmqctl list_queues``; the AMQP passive declare only reports ready ones)."""
    code, out = SERVICES.rabbitmqctl(
        "list_queues", "--quiet", "--no-table-headers", "name", "messages_unacknowledged",
        timeout=60,
    )
    if code != 0:
        raise RuntimeError(f"rabbitmqctl list_queues exited {code}: {out}")
    wanted = set(queues)
    total = 0
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] in wanted:
            total += int(parts[1])
    return total


def _is_ours_or_stale(name: str, ours_prefix: str, pattern: re.Pattern[str]) -> bool:
    if name.startswith(ours_prefix):
        return True
    m = pattern.match(name)
    return bool(m) and time.time() - int(m.group(1), 16) > STALE_AFTER_S


# --------------------------------------------------------------------------------------------
# PostgreSQL


def pg_connect(url: str, **kw: Any) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True, connect_timeout=10, **kw)


def _drop_slot(conn: psycopg.Connection[Any], slot: str, timeout: float = 15.0) -> None:
    """Terminate the walsender holding ``slot`` (if any), then drop the slot (if it exists)."""
    deadline = time.monotonic() + timeout
    while True:
        row = conn.execute(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
        if row is None:
            return
        if row[0] is not None:
            conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
            time.sleep(0.05)
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return
        except psycopg.errors.UndefinedObject:
            return
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _delete_checkpoint(conn: psycopg.Connection[Any], slot: str) -> None:
    """Remove ``slot``'s row of the relay's checkpoint table, if that table exists."""
    if conn.execute("SELECT to_regclass('cdc.relay_checkpoint')").fetchone()[0]:
        conn.execute("DELETE FROM cdc.relay_checkpoint WHERE slot_name = %s", (slot,))


def _rollback_prepared(conn: psycopg.Connection[Any], database: str, prefix: str = "") -> None:
    rows = conn.execute(
        "SELECT gid FROM pg_prepared_xacts WHERE database = %s AND gid LIKE %s",
        (database, prefix + "%"),
    ).fetchall()
    for (gid,) in rows:
        with contextlib.suppress(psycopg.Error):
            conn.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))


def _drop_database(admin: psycopg.Connection[Any], name: str) -> None:
    admin.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = %s AND pid <> pg_backend_pid()",
        (name,),
    )
    # Prepared transactions of that database must be resolved from inside it.
    with contextlib.suppress(psycopg.Error), pg_connect(db_url(name)) as conn:
        _rollback_prepared(conn, name)
    for (slot,) in admin.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE database = %s", (name,)
    ).fetchall():
        with contextlib.suppress(psycopg.Error):
            _drop_slot(admin, slot)
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _sweep_postgres(admin: psycopg.Connection[Any], current_db: str | None) -> list[str]:
    """Drop this session's leftover slots/databases and stale ones of crashed sessions."""
    swept: list[str] = []
    for (slot,) in admin.execute(
        "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'cdc\\_test\\_%'"
    ).fetchall():
        if _is_ours_or_stale(slot, f"cdc_test_{SESSION}_", _STALE_SLOT_RE):
            with contextlib.suppress(psycopg.Error):
                _drop_slot(admin, slot)
                swept.append(f"slot {slot}")
    for (name,) in admin.execute(
        "SELECT datname FROM pg_database WHERE datname LIKE 'cdc\\_test\\_%'"
    ).fetchall():
        m = _STALE_DB_RE.match(name)
        if name == current_db or (m and time.time() - int(m.group(1), 16) > STALE_AFTER_S):
            with contextlib.suppress(psycopg.Error):
                _drop_database(admin, name)
                swept.append(f"database {name}")
    for (role,) in admin.execute(
        "SELECT rolname FROM pg_roles WHERE rolname LIKE 'cdc\\_test\\_%'"
    ).fetchall():
        if _is_ours_or_stale(role, f"cdc_test_{SESSION}_", _STALE_SLOT_RE):
            with contextlib.suppress(psycopg.Error):
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
                swept.append(f"role {role}")
    return swept


# --------------------------------------------------------------------------------------------
# the relay subprocess


class Relay:
    """One ``python -m cdc relay`` subprocess; stdout+stderr go to ``log_path``."""

    def __init__(
        self,
        env_vars: dict[str, str],
        log_path: Path,
        slot_active: Callable[[], bool],
        name: str = "relay",
        argv: list[str] | None = None,
    ) -> None:
        self.argv = argv or ["-m", "cdc", "relay"]
        self.env_vars = env_vars
        self.log_path = log_path
        self.name = name
        self._slot_active = slot_active
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        port_var = "CDC_METRICS_PORT" if self.argv[1] == "cdc" else "CDC_WORKER_METRICS_PORT"
        port = int(env_vars.get(port_var, "0"))
        self.metrics_port = port or None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Relay:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env.update(self.env_vars)
        env["PYTHONUNBUFFERED"] = "1"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/wait
        self._log_file.write(f"\n===== start {self.name} {time.time():.3f} =====\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            [sys.executable, *self.argv],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigkill(self) -> None:
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def sigterm(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit and return the exit code (kill -9 and fail on timeout)."""
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"{self.name} did not exit within {timeout}s of SIGTERM\n{self.tail()}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout}s\n{self.tail()}")

    def stop(self) -> None:
        if self.alive():
            self.sigkill()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- observation ------------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return f"--- {self.name} log ({self.log_path}) ---\n" + "\n".join(
            self.log().splitlines()[-lines:]
        )

    def _get(self, path: str) -> tuple[int, str] | None:
        if self.metrics_port is None:
            raise AssertionError(f"{self.name} has no metrics port (CDC_METRICS_PORT=0)")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2
            ) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")
        except (OSError, urllib.error.URLError):
            return None

    def healthz(self) -> dict[str, Any] | None:
        got = self._get("/healthz")
        if got is None:
            return None
        try:
            return dict(json.loads(got[1]))
        except ValueError:
            return {"state": None, "raw": got[1], "status": got[0]}

    def state(self) -> str | None:
        h = self.healthz()
        return None if h is None else h.get("state")

    def metric(self, name: str, **labels: str) -> float | None:
        """Sum of ``name``'s samples matching ``labels`` from /metrics (None if absent)."""
        return metric_sum(self.metrics(), name, **labels)

    def metrics(self) -> str:
        got = self._get("/metrics")
        assert got is not None and got[0] == 200, f"/metrics not reachable: {got}"
        return got[1]

    def _check_alive(self) -> None:
        if not self.alive():
            pytest.fail(f"{self.name} exited early with code {self.proc.returncode}\n{self.tail()}")  # type: ignore[union-attr]

    def wait_state(self, state: str, timeout: float = 30.0) -> float:
        """Wait for /healthz to report ``state``; returns the seconds it took."""
        t0 = time.monotonic()

        def ok() -> bool:
            self._check_alive()
            return self.state() == state

        wait_for(
            ok,
            timeout,
            lambda: f"{self.name} state {state!r} (now {self.healthz()})\n{self.tail()}",
            interval=0.05,
        )
        return time.monotonic() - t0

    def wait_streaming(self, timeout: float = 30.0) -> float:
        """Wait until the relay streams: /healthz if it has a port, else the slot is active."""
        if self.metrics_port is not None:
            return self.wait_state("streaming", timeout)
        t0 = time.monotonic()

        def ok() -> bool:
            self._check_alive()
            return self._slot_active()

        wait_for(ok, timeout, lambda: f"{self.name} to take the slot\n{self.tail()}", interval=0.05)
        return time.monotonic() - t0


# --------------------------------------------------------------------------------------------
# domain workers (billing, notifications): a throwaway schema for their tables


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


class Domain:
    """The billing/notifications workers of one test, on ``env`` (database, exchange, outbox
    table, relays) with their tables and the inbox in ``schema``.

    Queues carry ``CDC_WORKER_QUEUE_PREFIX=<env.exchange>.`` (the session tag); ``cleanup()``
    stops the workers and deletes every queue and exchange their topology declared.
    """

    RETRY_DELAYS = "0.3,0.6,1"

    def __init__(self, env: Env, schema: str) -> None:
        self.env = env
        self.schema = schema
        self.prefix = f"{env.exchange}."
        self.inbox = f"{schema}.inbox"
        self.workers: list[Relay] = []
        self._names: list[Any] = []

    def worker_env(self, **overrides: Any) -> dict[str, str]:
        """CDC_* variables of a worker; ``overrides`` by field name (``smtp_port=25``)."""
        out = {
            "CDC_DATABASE_URL": self.env.db_url,
            "CDC_AMQP_URL": AMQP_URL,
            "CDC_EXCHANGE": self.env.exchange,
            "CDC_OUTBOX_TABLE": self.env.table,
            "CDC_WORKER_QUEUE_PREFIX": self.prefix,
            "CDC_WORKER_QUEUE_TYPE": "classic",
            "CDC_WORKER_INBOX_TABLE": self.inbox,
            "CDC_WORKER_RETRY_DELAYS": self.RETRY_DELAYS,
            "CDC_WORKER_MAX_ATTEMPTS": "6",
            "CDC_WORKER_METRICS_HOST": "127.0.0.1",
            "CDC_WORKER_RECONNECT_MIN_DELAY": "0.1",
            "CDC_WORKER_RECONNECT_MAX_DELAY": "1",
            "CDC_WORKER_LOG_FORMAT": "json",
            "CDC_BILLING_SCHEMA": self.schema,
            "CDC_NOTIFICATIONS_SCHEMA": self.schema,
        }
        for key, value in overrides.items():
            out[key if key.startswith("CDC_") else f"CDC_{key.upper()}"] = str(value)
        return out

    def register(self, worker: str, variables: dict[str, str]) -> None:
        """Note the queues and exchanges ``worker`` declares with ``variables``, so that
        ``cleanup()`` deletes them (also for a worker run elsewhere, e.g. in a container)."""
        from consumers.config import ConsumerSettings
        from consumers.loader import build_spec, load
        from consumers.runtime.runner import names_for

        module = load(worker)
        # Only the runtime's fields decide the names (the worker's own keep their defaults).
        base = {k[4:].lower(): v for k, v in variables.items() if k.startswith("CDC_")}
        settings = module.settings(
            **{k: v for k, v in base.items() if k in ConsumerSettings.model_fields}
        )
        self._names.append(names_for(settings, build_spec(module, settings)))

    def start(self, worker: str, **overrides: Any) -> Relay:
        """``python -m consumers <worker>`` started and consuming (killed at teardown)."""
        variables = self.worker_env(worker_metrics_port=free_port(), **overrides)
        self.register(worker, variables)
        n = len(self.workers)
        proc = Relay(
            variables,
            self.env.tmp_path / f"{worker}-{n}.log",
            lambda: True,
            name=f"{worker}-{n}",
            argv=["-m", "consumers", worker],
        )
        self.workers.append(proc)
        proc.start()
        proc.wait_state("consuming", timeout=60)
        return proc

    def publish(
        self, messages: list[tuple[str, str, Any]], headers: dict[str, Any] | None = None
    ) -> None:
        """Publish ``(routing_key, message_id, payload)`` in this order, each confirmed,
        with a ``created_at`` header as the relay sets it (and ``headers``, straight to the
        exchange: what a publisher other than the relay could send)."""

        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            ex = await ch.get_exchange(self.env.exchange, ensure=False)
            for key, mid, payload in messages:
                await ex.publish(
                    aio_pika.Message(
                        json.dumps(payload).encode(),
                        message_id=mid,
                        type=key,
                        content_type="application/json",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                        headers={
                            **(headers or {}),
                            "created_at": dt.datetime.now(dt.UTC).isoformat(),
                        },
                    ),
                    key,
                    mandatory=True,
                    timeout=30,
                )

        self.env.broker._run(fn)

    def table(self, name: str) -> sql.Composed:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(name))

    def inbox_count(self, consumer: str) -> int:
        try:
            rows = self.env.sql(
                sql.SQL("SELECT count(*) FROM {} WHERE consumer = %s").format(
                    self.table("inbox")
                ),
                (consumer,),
            )
        except psycopg.errors.UndefinedTable:
            return 0
        return int(rows[0][0])

    def wait_inbox(self, consumer: str, n: int, timeout: float = 60.0) -> None:
        """Until ``n`` distinct messages of ``consumer`` are committed."""
        wait_for(
            lambda: self.inbox_count(consumer) >= n,
            timeout,
            lambda: f"{n} inbox rows of {consumer} (have {self.inbox_count(consumer)})\n"
            + self.tails(),
        )

    def parked(self) -> dict[str, int | None]:
        return {n.parking_queue: self.env.broker.queue_count(n.parking_queue) for n in self._names}

    def tails(self) -> str:
        return "\n".join(w.tail(40) for w in self.workers)

    def cleanup(self) -> list[str]:
        t = Teardown()
        broker = self.env.broker
        for w in self.workers:
            t.step(f"stop {w.name}", w.stop)
        for names in self._names:
            queues = [q for q, _ in names.queues]
            queues += [rq.name for rq in names.retry_queues] + [names.parking_queue]
            for q in queues:
                t.step(f"delete queue {q}", lambda q=q: broker.delete_queue(q))
            ex = names.retry_exchange
            t.step(f"delete exchange {ex}", lambda ex=ex: broker.delete_exchange(ex))
        return t.errors


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


@dataclass
class HookRequest:
    """One POST the webhook receiver got, and whether its signature verified."""

    body: bytes
    headers: dict[str, str]
    signature_ok: bool
    status: int
    at: float = 0.0  # time.monotonic() when it was answered


class WebhookReceiver:
    """A real HTTP/1.1 server (keep-alive) on 127.0.0.1 that verifies the HMAC-SHA256
    signature of each POST itself (not with the code under test) and answers 401 to a bad
    one. ``fail_first`` answers 500 to the first request of each idempotency key;
    ``delay`` seconds pass before each answer (longer than the client's timeout: an
    endpoint that times out); ``max_in_flight`` is the most requests it held at once;
    ``accepted()`` is what a receiver that dedups by idempotency key would keep."""

    SECRET = "whsec-" + secrets.token_hex(8)

    def __init__(self, fail_first: bool = False, delay: float = 0.0) -> None:
        import http.server

        receiver = self
        self.fail_first = fail_first
        self.delay = delay
        self.requests: list[HookRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.in_flight += 1
                    receiver.max_in_flight = max(receiver.max_in_flight, receiver.in_flight)
                try:
                    if receiver.delay and receiver._closing.wait(receiver.delay):
                        return
                finally:
                    with receiver._lock:
                        receiver.in_flight -= 1
                mac = hmac.new(receiver.SECRET.encode(), body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(
                    f"sha256={mac}", self.headers.get("X-CDC-Signature", "")
                )
                key = self.headers.get("Idempotency-Key", "")
                with receiver._lock:
                    seen = any(r.headers.get("Idempotency-Key") == key for r in receiver.requests)
                    status = 401 if not ok else 500 if receiver.fail_first and not seen else 200
                    receiver.requests.append(
                        HookRequest(body, dict(self.headers), ok, status, time.monotonic())
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def accepted(self) -> dict[str, HookRequest]:
        """Idempotency key -> the first 2xx request with that key."""
        out: dict[str, HookRequest] = {}
        with self._lock:
            for r in self.requests:
                if r.status == 200:
                    out.setdefault(r.headers["Idempotency-Key"], r)
        return out

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver(fail_first=True)
    try:
        yield r
    finally:
        r.close()


class SmtpSink:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 keeping every message it accepts.
    ``fail_first`` answers 451 (try again later) to the first message of each idempotency
    key; ``refused`` counts those."""

    def __init__(self, fail_first: bool = False) -> None:
        from email import message_from_bytes
        from email.message import Message

        from aiosmtpd.controller import Controller

        sink = self
        self.messages: list[Message] = []
        self.refused = 0
        seen: set[str] = set()

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                message = message_from_bytes(envelope.content)
                key = str(message["X-Idempotency-Key"])
                if fail_first and key not in seen:
                    seen.add(key)
                    sink.refused += 1
                    return "451 4.3.0 try again later"
                sink.messages.append(message)
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    s = SmtpSink()
    try:
        yield s
    finally:
        s.close()


# --------------------------------------------------------------------------------------------
# rows, transactions, writers


def new_event(
    event_type: str = "test.created",
    payload: Any = None,
    *,
    aggregate_type: str = "device",
    aggregate_id: str | None = None,
    headers: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """One outbox row as a dict (``payload``/``headers`` are Python values, sent as jsonb)."""
    row: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id if aggregate_id is not None else f"agg-{secrets.token_hex(3)}",
        "event_type": event_type,
        "payload": {"n": secrets.token_hex(4)} if payload is None else payload,
    }
    if headers is not None:
        row["headers"] = headers
    row.update(extra)
    return row


_JSON_COLUMNS = {"payload", "headers"}


class RawJson(str):
    """JSON text to send as is to a jsonb column (other values are ``json.dumps``-ed)."""


def insert_rows(cur: psycopg.Cursor[Any], table: str, rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` (dicts; same keys per batch) into ``table`` inside the current txn."""
    if not rows:
        return
    schema, name = table.split(".")
    # Keep the order of rows across groups: insert consecutive runs of the same shape.
    runs: list[tuple[tuple[str, ...], list[dict[str, Any]]]] = []
    for r in rows:
        cols = tuple(r)
        if runs and runs[-1][0] == cols:
            runs[-1][1].append(r)
        else:
            runs.append((cols, [r]))
    for cols, batch in runs:
        placeholders = sql.SQL(", ").join(
            sql.SQL("%s::jsonb") if c in _JSON_COLUMNS else sql.SQL("%s") for c in cols
        )
        query = sql.SQL("INSERT INTO {}.{} ({}) VALUES ({})").format(
            sql.Identifier(schema),
            sql.Identifier(name),
            sql.SQL(", ").join(map(sql.Identifier, cols)),
            placeholders,
        )
        params = [
            tuple(
                (json.dumps(r[c], ensure_ascii=False) if r[c] is not None else None)
                if c in _JSON_COLUMNS and not isinstance(r[c], RawJson)
                else r[c]
                for c in cols
            )
            for r in batch
        ]
        cur.executemany(query, params)


@dataclass
class TxnRecord:
    txn: str
    kind: str
    writer: int
    kept: list[str] = field(default_factory=list)  # ids that must arrive, in insert order
    dropped: list[str] = field(default_factory=list)  # ids that must never arrive


class Workload:
    """Writer threads inserting outbox rows in transactions of various kinds.

    Kinds: ``commit``, ``rollback``, ``savepoint`` (a middle part rolled back to a savepoint,
    the rest committed), ``2pc_commit`` and ``2pc_rollback`` (PREPARE TRANSACTION then
    COMMIT/ROLLBACK PREPARED). Each payload carries ``txn``, ``seq`` (insert order within the
    transaction) and ``w`` (writer). A writer stops after ``events_per_writer`` committed
    events, when ``stop()`` is called, or on error (kept in ``errors``).
    """

    def __init__(
        self,
        env: Env,
        *,
        writers: int = 4,
        events_per_writer: int = 1000,
        max_txn: int = 100,
        kinds: dict[str, float] | None = None,
        rate_per_writer: float | None = None,
        seed: int | None = None,
        event_type: Callable[[random.Random], str] | None = None,
        extra_columns: Callable[[], dict[str, Any]] | None = None,
        pad: tuple[int, int] = (10, 120),
    ) -> None:
        self.env = env
        self.writers = writers
        self.events_per_writer = events_per_writer
        self.max_txn = max_txn
        self.kinds = kinds or {"commit": 1.0}
        self.rate = rate_per_writer
        self.seed = random.randrange(1 << 30) if seed is None else seed
        self.event_type = event_type or (
            lambda rng: rng.choice(["device.started", "user.updated", "app.installed"])
        )
        self.extra_columns = extra_columns
        self.pad = pad
        self.txns: list[TxnRecord] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- results ----------------------------------------------------------------------------

    @property
    def committed_ids(self) -> set[str]:
        with self._lock:
            return {i for t in self.txns for i in t.kept}

    @property
    def dropped_ids(self) -> set[str]:
        with self._lock:
            return {i for t in self.txns for i in t.dropped}

    @property
    def committed_count(self) -> int:
        with self._lock:
            return sum(len(t.kept) for t in self.txns)

    def kinds_seen(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for t in self.txns:
                out[t.kind] = out.get(t.kind, 0) + 1
            return out

    def check_commit_order(self, msgs: list[Msg]) -> int:
        """Assert stream order = commit order, one transaction at a time, rows in insert order.

        ``commit_lsn`` never decreases along the stream; the messages of one commit LSN form
        one contiguous run that is exactly the kept rows of one transaction, in ``seq`` order;
        and every transaction forms exactly one run. Returns the number of transactions.
        """
        with self._lock:
            kept = {t.txn: t.kept for t in self.txns if t.kept}
        runs: list[tuple[int, list[Msg]]] = []
        for m in msgs:
            lsn = m.commit_lsn
            if runs and lsn < runs[-1][0]:
                raise AssertionError(
                    f"commit_lsn went backwards: {format_lsn(lsn)} after "
                    f"{format_lsn(runs[-1][0])} (message {m.message_id})"
                )
            if runs and runs[-1][0] == lsn:
                runs[-1][1].append(m)
            else:
                runs.append((lsn, [m]))
        seen: dict[str, int] = {}
        for lsn, run in runs:
            txns = {m.json["txn"] for m in run}
            assert len(txns) == 1, f"commit_lsn {format_lsn(lsn)} shared by transactions {txns}"
            txn = txns.pop()
            assert txn not in seen, (
                f"transaction {txn} split/interleaved: commit_lsn {format_lsn(seen[txn])} "
                f"and {format_lsn(lsn)}"
            )
            seen[txn] = lsn
            seqs = [m.json["seq"] for m in run]
            assert seqs == sorted(seqs), f"order inside {txn} not kept: {seqs}"
            assert [m.message_id for m in run] == kept[txn], (
                f"transaction {txn}: arrived {len(run)} rows, committed {len(kept[txn])}"
            )
        assert set(seen) == set(kept), f"transactions missing: {sorted(set(kept) - set(seen))}"
        return len(runs)

    # -- control ----------------------------------------------------------------------------

    def start(self) -> Workload:
        for w in range(self.writers):
            t = threading.Thread(target=self._writer, args=(w,), daemon=True, name=f"writer-{w}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self._stop.set()
        if self.errors:
            raise AssertionError(f"writer failed: {self.errors[0]!r}") from self.errors[0]
        assert not alive, f"writers still running after {timeout}s: {alive}"

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    # -- one writer -------------------------------------------------------------------------

    def _size(self, rng: random.Random) -> int:
        if rng.random() < 0.5:
            return rng.randint(1, min(20, self.max_txn))
        return rng.randint(1, self.max_txn)

    def _rows(
        self, rng: random.Random, txn: str, w: int, kind: str, n: int
    ) -> list[dict[str, Any]]:
        rows = []
        for seq in range(n):
            payload = {
                "txn": txn,
                "seq": seq,
                "w": w,
                "kind": kind,
                "pad": secrets.token_hex(rng.randint(*self.pad) // 2),
            }
            extra = self.extra_columns() if self.extra_columns else {}
            rows.append(new_event(self.event_type(rng), payload, aggregate_id=f"{txn}", **extra))
        return rows

    def _writer(self, w: int) -> None:
        rng = random.Random(self.seed * 100 + w)
        kinds, weights = zip(*self.kinds.items(), strict=True)
        committed = 0
        n = 0
        t0 = time.monotonic()
        try:
            with pg_connect(self.env.db_url) as conn, conn.cursor() as cur:
                # the first transactions cycle through every kind, then random ones
                while committed < self.events_per_writer and not self._stop.is_set():
                    kind = kinds[n] if n < len(kinds) else rng.choices(kinds, weights)[0]
                    txn = f"{self.env.tag}-w{w}-{n}"
                    n += 1
                    size = min(self._size(rng), max(1, self.events_per_writer - committed))
                    rows = self._rows(rng, txn, w, kind, size)
                    rec = TxnRecord(txn, kind, w)
                    self._run_txn(cur, kind, txn, rows, rec, rng)
                    with self._lock:
                        self.txns.append(rec)
                    committed += len(rec.kept)
                    if self.rate:
                        ahead = committed / self.rate - (time.monotonic() - t0)
                        if ahead > 0:
                            self._stop.wait(ahead)
        except BaseException as exc:
            self.errors.append(exc)

    def _run_txn(
        self,
        cur: psycopg.Cursor[Any],
        kind: str,
        txn: str,
        rows: list[dict[str, Any]],
        rec: TxnRecord,
        rng: random.Random,
    ) -> None:
        table = self.env.table
        ids = [r["id"] for r in rows]
        cur.execute("BEGIN")
        if kind == "savepoint" and len(rows) >= 2:
            a = rng.randint(0, len(rows) - 1)
            b = rng.randint(a + 1, len(rows))
            insert_rows(cur, table, rows[:a])
            cur.execute("SAVEPOINT sp")
            insert_rows(cur, table, rows[a:b])
            cur.execute("ROLLBACK TO SAVEPOINT sp")
            insert_rows(cur, table, rows[b:])
            cur.execute("COMMIT")
            rec.kept, rec.dropped = ids[:a] + ids[b:], ids[a:b]
            return
        insert_rows(cur, table, rows)
        if kind in ("commit", "savepoint"):
            cur.execute("COMMIT")
            rec.kept = ids
        elif kind == "rollback":
            cur.execute("ROLLBACK")
            rec.dropped = ids
        elif kind in ("2pc_commit", "2pc_rollback"):
            gid = f"{self.env.gid_prefix}{txn}"
            cur.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
            if kind == "2pc_commit":
                cur.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
                rec.kept = ids
            else:
                cur.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
                rec.dropped = ids
        else:
            raise ValueError(kind)


# --------------------------------------------------------------------------------------------
# the per-test environment


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    aggregate_type: str | None
    aggregate_id: str | None
    event_type: str | None
    payload_text: str | None
    headers: dict[str, Any] | None
    created_at: dt.datetime


def _iso(text: Any) -> dt.datetime:
    assert isinstance(text, str), f"expected ISO 8601 text, got {text!r}"
    return dt.datetime.fromisoformat(text)


class SqlAccess:
    """A lazily opened connection to ``db_url`` and a one-call query helper for fixtures."""

    db_url: str
    _conn: psycopg.Connection[Any] | None

    @property
    def conn(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = pg_connect(self.db_url)
        return self._conn

    def sql(self, query: Any, params: Any = None) -> list[tuple[Any, ...]]:
        cur = self.conn.execute(query, params)
        return cur.fetchall() if cur.description else []


class Env(SqlAccess):
    """Unique names for one test and helpers over them; ``cleanup()`` removes everything."""

    def __init__(
        self, dbname: str, broker: Broker, tmp_path: Path, url: str | None = None
    ) -> None:
        self.tag = secrets.token_hex(3)
        self.dbname = dbname
        self.db_url = url or db_url(dbname)
        self.broker = broker
        self.tmp_path = tmp_path
        self.table = f"public.outbox_{self.tag}"
        self.slot = f"cdc_test_{SESSION}_{self.tag}"
        self.publication = f"cdc_test_pub_{self.tag}"
        self.exchange = f"cdc_test.{SESSION}.{self.tag}"
        self.parking_queue = f"{self.exchange}.parked"
        self.sink_queue = f"{self.exchange}.sink"
        self.gid_prefix = f"cdc_test_{SESSION}_{self.tag}_"
        self.extra_tables: list[str] = []
        self.extra_queues: list[str] = []
        self.relays: list[Relay] = []
        self._conn: psycopg.Connection[Any] | None = None
        self.t0 = dt.datetime.now(dt.UTC)

    # -- topology ---------------------------------------------------------------------------

    def declare_sink(self, keys: Iterable[str] = ("#",)) -> None:
        """The exchange (as the relay declares it) and the durable classic sink queue."""
        self.broker.declare_exchange(self.exchange)
        self.broker.declare_queue(self.sink_queue, self.exchange, keys)

    def declare_queue(self, suffix: str, keys: Iterable[str]) -> str:
        name = f"{self.exchange}.{suffix}"
        self.extra_queues.append(name)
        self.broker.declare_queue(name, self.exchange, keys)
        return name

    # -- SQL --------------------------------------------------------------------------------

    def connect(self) -> psycopg.Connection[Any]:
        return pg_connect(self.db_url)

    def table_ident(self) -> sql.Composed:
        schema, name = self.table.split(".")
        return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))

    def current_wal_lsn(self) -> int:
        return parse_lsn(self.sql("SELECT pg_current_wal_lsn()::text")[0][0])

    def slot_info(self) -> dict[str, Any] | None:
        rows = self.sql(
            "SELECT slot_name, plugin, active, active_pid, restart_lsn::text,"
            " confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        )
        if not rows:
            return None
        keys = ("slot_name", "plugin", "active", "active_pid", "restart_lsn", "confirmed_flush_lsn")
        return dict(zip(keys, rows[0], strict=True))

    def confirmed_flush_lsn(self) -> int:
        info = self.slot_info()
        assert info is not None, f"slot {self.slot} does not exist"
        return parse_lsn(info["confirmed_flush_lsn"])

    def prove_checkpoint(self, timeout: float = 30.0, quiet: bool = True) -> str:
        """Do once, now, what the relay's periodic checkpoint does; return the snapshot.

        Snapshot first, then the WAL insert position (every transaction the snapshot sees
        has its commit below it); once the slot's confirmed_flush_lsn has passed that
        position, the snapshot is proven: every stream row below its xmin was confirmed.
        ``quiet=False`` takes the snapshot at once, with whatever transactions are open.
        """
        # Wait until no transaction older than the outbox's newest row is open (other tests
        # on the shared server may hold one), so the checkpoint covers every row so far.
        newest = sql.SQL("SELECT coalesce(max(xmin::text::bigint), 0) FROM {}").format(
            self.table_ident()
        )
        xmin = "SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint"
        if quiet:
            wait_for(
                lambda: self.sql(xmin)[0][0] > self.sql(newest)[0][0],
                timeout,
                "the transactions open on the server to end",
            )
        snapshot = str(self.sql("SELECT pg_current_snapshot()::text")[0][0])
        lsn = parse_lsn(self.sql("SELECT pg_current_wal_insert_lsn()::text")[0][0])
        wait_for(
            lambda: self.confirmed_flush_lsn() >= lsn,
            timeout,
            lambda: f"slot to confirm {format_lsn(lsn)}\n{self.relay_tails()}",
        )
        self.sql(
            "UPDATE cdc.relay_checkpoint SET proven_snapshot = %s::pg_snapshot, proven_at = now()"
            " WHERE slot_name = %s",
            (snapshot, self.slot),
        )
        return snapshot

    def create_seed_table(self) -> None:
        """The outbox table exactly as ``cdc/sql/001_outbox_table.sql`` makes it."""
        ddl = (REPO / "cdc" / "sql" / "001_outbox_table.sql").read_text()
        self.sql(sql.SQL(ddl).format(table=self.table_ident()))  # type: ignore[arg-type]

    def seed_poller_rows(self, pending: int, failed: int, published: int) -> dict[str, set[str]]:
        """Rows as the seed's polling relay leaves them (statuses ``pending``, ``failed``
        after 5 tries, ``published`` with ``published_at``), created an hour ago, in one
        statement; returns their ids by status."""
        self.sql(
            sql.SQL(
                "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload, status,"
                " retry_count, published_at, created_at)"
                " SELECT 'device', 'dev-' || g, 'device.started',"
                " jsonb_build_object('seed', g, 'deviceId', 'dev-' || g),"
                " CASE WHEN g <= %(p)s THEN 'pending' WHEN g <= %(p)s + %(f)s THEN 'failed'"
                " ELSE 'published' END,"
                " CASE WHEN g > %(p)s AND g <= %(p)s + %(f)s THEN 5 ELSE 0 END,"
                " CASE WHEN g > %(p)s + %(f)s THEN now() - interval '50 minutes' END,"
                " now() - interval '1 hour' + g * interval '1 ms'"
                " FROM generate_series(1, %(n)s) g"
            ).format(self.table_ident()),
            {"p": pending, "f": failed, "n": pending + failed + published},
        )
        by_status: dict[str, set[str]] = {"pending": set(), "failed": set(), "published": set()}
        query = sql.SQL("SELECT id::text, status FROM {}").format(self.table_ident())
        for rid, status in self.sql(query):
            by_status[status].add(rid)
        return by_status

    def slot_active(self) -> bool:
        info = self.slot_info()
        return bool(info and info["active"])

    def insert(self, rows: list[dict[str, Any]], table: str | None = None) -> list[dict[str, Any]]:
        """Insert ``rows`` in one committed transaction; returns them."""
        with self.conn.transaction(), self.conn.cursor() as cur:
            insert_rows(cur, table or self.table, rows)
        return rows

    # plain helpers, reachable from tests without importing conftest
    event = staticmethod(new_event)
    raw_json = RawJson
    parse_lsn = staticmethod(parse_lsn)
    format_lsn = staticmethod(format_lsn)
    wait_for = staticmethod(wait_for)
    free_port = staticmethod(free_port)

    def workload(self, **kw: Any) -> Workload:
        return Workload(self, **kw)

    def prepare(self, rows: list[dict[str, Any]], name: str) -> str:
        """Insert ``rows`` and PREPARE TRANSACTION; returns the gid (rolled back at teardown)."""
        gid = f"{self.gid_prefix}{name}"
        with self.connect() as conn, conn.cursor() as cur:
            cur.execute("BEGIN")
            insert_rows(cur, self.table, rows)
            cur.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
        return gid

    def finish_prepared(self, gid: str, commit: bool) -> None:
        verb = "COMMIT PREPARED {}" if commit else "ROLLBACK PREPARED {}"
        self.sql(sql.SQL(verb).format(sql.Literal(gid)))

    def columns(self) -> dict[str, str]:
        schema, name = self.table.split(".")
        return dict(
            self.sql(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
                (schema, name),
            )
        )

    def ensure_headers_column(self) -> None:
        if "headers" not in self.columns():
            self.sql(sql.SQL("ALTER TABLE {} ADD COLUMN headers jsonb").format(self.table_ident()))

    def fetch_rows(self) -> dict[str, Row]:
        """The committed rows of the outbox (the ground truth), keyed by id."""
        has_headers = "headers" in self.columns()
        query = sql.SQL(
            "SELECT id::text, aggregate_type, aggregate_id, event_type, payload::text, {},"
            " created_at FROM {}"
        ).format(sql.SQL("headers" if has_headers else "NULL::jsonb"), self.table_ident())
        return {r[0]: Row(*r) for r in self.sql(query)}

    def create_legacy_table(self) -> None:
        """``event_outbox`` exactly as the seed report shows it (no ``headers`` column)."""
        self.sql(
            sql.SQL(
                """
                CREATE TABLE {} (
                    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
                    aggregate_type varchar(100) NOT NULL,
                    aggregate_id   varchar(255),
                    event_type     varchar(255) NOT NULL,
                    payload        jsonb NOT NULL,
                    status         varchar(50) NOT NULL DEFAULT 'pending',
                    retry_count    integer NOT NULL DEFAULT 0,
                    error_message  text,
                    last_error_at  timestamptz,
                    published_at   timestamptz,
                    created_at     timestamptz NOT NULL DEFAULT now()
                )
                """
            ).format(self.table_ident())
        )

    # -- the cdc CLI ------------------------------------------------------------------------

    def relay_env(self, **overrides: Any) -> dict[str, str]:
        """CDC_* variables for this test; ``overrides`` by field name (``max_in_flight=10``)."""
        env = {
            "CDC_DATABASE_URL": self.db_url,
            "CDC_AMQP_URL": AMQP_URL,
            "CDC_SLOT_NAME": self.slot,
            "CDC_PUBLICATION_NAME": self.publication,
            "CDC_OUTBOX_TABLE": self.table,
            "CDC_EXCHANGE": self.exchange,
            "CDC_PARKING_QUEUE": self.parking_queue,
            "CDC_METRICS_PORT": "0",
            "CDC_METRICS_HOST": "127.0.0.1",
            "CDC_RECONNECT_MIN_DELAY": "0.1",
            "CDC_RECONNECT_MAX_DELAY": "1",
            "CDC_STANDBY_POLL_INTERVAL": "0.5",
            "CDC_STATUS_INTERVAL": "1",
            "CDC_LOG_FORMAT": "json",
            "CDC_LOG_LEVEL": "INFO",
        }
        return with_overrides(env, overrides)

    def settings(self, **overrides: Any) -> Any:
        """The relay's settings model for this test (``relay_env`` with ``overrides``)."""
        from cdc.config import RelaySettings

        fields = {
            k.removeprefix("CDC_").lower(): v for k, v in self.relay_env(**overrides).items()
        }
        return RelaySettings(**fields)

    def checkpoint(self) -> dict[str, Any] | None:
        """This test's row of ``cdc.relay_checkpoint`` (None if absent or no table yet)."""
        if not self.sql("SELECT to_regclass('cdc.relay_checkpoint') IS NOT NULL")[0][0]:
            return None
        with self.conn.cursor(row_factory=dict_row) as cur:
            cur.execute(
                "SELECT *, proven_snapshot::text AS proven_text,"
                " base_snapshot::text AS base_text, confirmed_lsn::text AS confirmed_text"
                " FROM cdc.relay_checkpoint WHERE slot_name = %s",
                (self.slot,),
            )
            return cur.fetchone()

    def cdc(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m cdc ARGS`` with ``env`` (default: ``relay_env()``)."""
        full = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        full.update(self.relay_env() if env is None else env)
        return subprocess.run(
            [sys.executable, "-m", "cdc", *args],
            cwd=REPO,
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    def setup(self, **overrides: Any) -> subprocess.CompletedProcess[str]:
        """``cdc setup``; fails the test unless it exits 0."""
        res = self.cdc("setup", env=self.relay_env(**overrides))
        if res.returncode != 0:
            pytest.fail(f"cdc setup exited {res.returncode}\n{res.stdout}\n{res.stderr}")
        return res

    def relay(self, metrics: bool = False, **overrides: Any) -> Relay:
        """A started relay subprocess (killed at teardown if still running)."""
        if metrics:
            overrides.setdefault("metrics_port", free_port())
        n = len(self.relays)
        r = Relay(
            self.relay_env(**overrides),
            self.tmp_path / f"relay-{n}.log",
            self.slot_active,
            name=f"relay-{n}",
        )
        self.relays.append(r)
        return r.start()

    # -- the sink ---------------------------------------------------------------------------

    def drain(self, expected: int | None = None, queue: str | None = None, **kw: Any) -> list[Msg]:
        return self.broker.drain(queue or self.sink_queue, expected, **kw)

    def sink_count(self) -> int:
        n = self.broker.queue_count(self.sink_queue)
        assert n is not None, f"sink queue {self.sink_queue} vanished"
        return n

    def wait_sink_count(self, n: int, timeout: float = 60.0, queue: str | None = None) -> int:
        q = queue or self.sink_queue

        def got() -> int | None:
            c = self.broker.queue_count(q)
            return c if c is not None and c >= n else None

        return int(
            wait_for(
                got,
                timeout,
                lambda: (
                    f"{n} messages in {q} (has {self.broker.queue_count(q)})\n{self.relay_tails()}"
                ),
                interval=0.1,
            )
        )

    def relay_tails(self) -> str:
        return "\n".join(r.tail(30) for r in self.relays)

    # -- the contract -----------------------------------------------------------------------

    def check_message(self, msg: Msg, row: Row) -> None:
        """Assert one message is exactly what docs/contract.md says for ``row``."""
        where = f"message for row {row.id}"
        assert msg.exchange == self.exchange, where
        assert msg.routing_key == row.event_type, where
        assert msg.message_id == row.id, where
        assert msg.type == row.event_type, where
        assert msg.content_type == "application/json", where
        assert msg.delivery_mode == 2, where
        # body: the payload exactly as PostgreSQL prints it
        assert row.payload_text is not None
        assert msg.body == row.payload_text.encode("utf-8"), where
        assert json.loads(msg.body) == json.loads(row.payload_text), where
        # timestamp = created_at in whole seconds
        assert msg.timestamp is not None, f"{where}: no timestamp"
        ts = msg.timestamp if msg.timestamp.tzinfo else msg.timestamp.replace(tzinfo=dt.UTC)
        created = row.created_at.timestamp()
        assert int(ts.timestamp()) in (int(created), round(created)), (where, ts, row.created_at)
        h = msg.headers
        assert h.get("aggregate_type") == row.aggregate_type, (where, h)
        if row.aggregate_id is None:
            assert h.get("aggregate_id") in (None, ""), (where, h)
        else:
            assert h.get("aggregate_id") == row.aggregate_id, (where, h)
        if "x-cdc-source" in h:
            # Read from a snapshot (backfill or recovery): no commit position, the snapshot.
            assert h["x-cdc-source"] in ("backfill", "recovery"), (where, h)
            assert _SNAPSHOT_RE.match(str(h.get("x-cdc-snapshot"))), (where, h)
            assert "commit_lsn" not in h and "commit_time" not in h, (where, h)
        else:
            assert _LSN_RE.match(str(h.get("commit_lsn"))), (where, h)
            commit_time = _iso(h.get("commit_time"))
            assert commit_time.utcoffset() == dt.timedelta(0), (where, h["commit_time"])
            now = dt.datetime.now(dt.UTC)
            soon = now + dt.timedelta(minutes=1)
            assert self.t0 - dt.timedelta(minutes=1) <= commit_time <= soon, where
        created_h = _iso(h.get("created_at"))
        if created_h.tzinfo is not None:
            assert created_h == row.created_at, (where, h["created_at"], row.created_at)
        else:
            assert created_h in (
                row.created_at.astimezone(dt.UTC).replace(tzinfo=None),
                row.created_at.astimezone().replace(tzinfo=None),
            ), (where, h["created_at"], row.created_at)
        if isinstance(row.headers, dict):
            relay_keys = {
                "aggregate_type",
                "aggregate_id",
                "commit_lsn",
                "commit_time",
                "created_at",
            }
            for key, value in row.headers.items():
                assert key in h, f"{where}: row header {key!r} missing from {h}"
                if key not in relay_keys and isinstance(value, str):
                    assert h[key] == value, (where, key, h[key], value)

    def check_exactly_once(
        self, msgs: list[Msg], rows: dict[str, Row], allow_duplicates: bool = False
    ) -> dict[str, int]:
        """Every row arrived (once, unless duplicates allowed), nothing else arrived, and
        every message matches the contract. Returns {id: copies} for duplicated ids."""
        copies: dict[str, int] = {}
        for m in msgs:
            assert m.message_id in rows, f"unexpected message {m.message_id}: {m.body[:200]!r}"
            copies[m.message_id] = copies.get(m.message_id, 0) + 1
        missing = set(rows) - set(copies)
        assert not missing, f"{len(missing)} of {len(rows)} events lost, e.g. {sorted(missing)[:5]}"
        dups = {k: v for k, v in copies.items() if v > 1}
        if not allow_duplicates:
            assert not dups, f"{len(dups)} duplicated events, e.g. {list(dups.items())[:5]}"
        for m in msgs:
            self.check_message(m, rows[m.message_id])  # type: ignore[index]
        return dups

    def check_all_delivered(
        self, quiet: float = 1.5, timeout: float = 60.0
    ) -> tuple[dict[str, Row], int]:
        """Every committed row reached the sink as the contract says (duplicates allowed);
        returns the rows and the number of extra copies."""
        rows = self.fetch_rows()
        self.wait_sink_count(len(rows), timeout=timeout)
        msgs = self.drain(len(rows), quiet=quiet, timeout=timeout)
        dups = self.check_exactly_once(msgs, rows, allow_duplicates=True)
        return rows, sum(n - 1 for n in dups.values())

    # -- teardown ---------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        t = Teardown()
        step, errors = t.step, t.errors

        for r in self.relays:
            step(f"stop {r.name}", r.stop)
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        try:
            with pg_connect(self.db_url) as conn:
                step(
                    "rollback prepared",
                    lambda: _rollback_prepared(conn, self.dbname, self.gid_prefix),
                )
                step("drop slot", lambda: _drop_slot(conn, self.slot))
                step("delete checkpoint row", lambda: _delete_checkpoint(conn, self.slot))
                step(
                    "drop publication",
                    lambda: conn.execute(
                        sql.SQL("DROP PUBLICATION IF EXISTS {}").format(
                            sql.Identifier(self.publication)
                        )
                    ),
                )
                for table in [self.table, *self.extra_tables]:
                    schema, name = table.split(".")
                    step(
                        f"drop {table}",
                        lambda s=schema, n=name: conn.execute(
                            sql.SQL("DROP TABLE IF EXISTS {}.{} CASCADE").format(
                                sql.Identifier(s), sql.Identifier(n)
                            )
                        ),
                    )
        except Exception as exc:
            errors.append(f"postgres: {exc!r}")
        for q in [self.sink_queue, self.parking_queue, *self.extra_queues]:
            step(f"delete queue {q}", lambda q=q: self.broker.delete_queue(q))
        step(f"delete exchange {self.exchange}", lambda: self.broker.delete_exchange(self.exchange))
        return errors


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def pg_session_db() -> Iterator[str]:
    """A throwaway database for the whole session, dropped (with its slots) at the end."""
    name = f"cdc_test_{SESSION}"
    with pg_connect(ADMIN_URL) as admin:
        _sweep_postgres(admin, None)  # stale leftovers of crashed sessions
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name
    finally:
        with pg_connect(ADMIN_URL) as admin:
            swept = _sweep_postgres(admin, name)
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
        for q in _rabbitmqctl_names("list_queues"):
            if _is_ours_or_stale(q, ours, _STALE_AMQP_RE):
                with contextlib.suppress(Exception):
                    b.delete_queue(q)
                    leftovers.append(q)
        for e in _rabbitmqctl_names("list_exchanges"):
            if _is_ours_or_stale(e, ours, _STALE_AMQP_RE):
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
    """A throwaway server (tests/pgcluster.py, of the version under test) for this test;
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


def _role(attributes: str, env: Env, kind: str) -> str:
    """Create ``cdc_test_<S>_<t>_<kind>`` with ``attributes`` (trust auth: no password)."""
    role = f"cdc_test_{SESSION}_{env.tag}_{kind}"
    with pg_connect(ADMIN_URL) as admin:
        admin.execute(sql.SQL("CREATE ROLE {} " + attributes).format(sql.Identifier(role)))
    return role


def _drop_role(env: Env, role: str) -> None:
    """End the role's sessions, drop what it owns and its grants in the test database, drop it."""
    ident = sql.Identifier(role)
    with pg_connect(ADMIN_URL) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
        )
        with pg_connect(env.db_url) as conn:  # its grants and objects live in the test database
            conn.execute(sql.SQL("DROP OWNED BY {}").format(ident))
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))


@pytest.fixture
def relay_role(env: Env) -> Iterator[str]:
    """A role ``cdc_test_<S>_<t>_relay`` with LOGIN REPLICATION and nothing else; its grants
    and the role go at teardown."""
    role = _role("LOGIN REPLICATION", env, "relay")
    try:
        yield role
    finally:
        _drop_role(env, role)


@pytest.fixture
def worker_role(env: Env, pg_schema: str) -> Iterator[str]:
    """A role ``cdc_test_<S>_<t>_worker`` with LOGIN only, made owner of ``pg_schema`` (where
    the domain workers keep their tables); what it owns, its grants and the role go at
    teardown."""
    role = _role("LOGIN", env, "worker")
    try:
        env.sql(
            sql.SQL("ALTER SCHEMA {} OWNER TO {}").format(
                sql.Identifier(pg_schema), sql.Identifier(role)
            )
        )
        yield role
    finally:
        _drop_role(env, role)


@pytest.fixture
def amqp_user_without_configure(env: Env) -> Iterator[str]:
    """A broker user ``cdc_test.<S>.<t>`` that may write and read on ``/`` but declare
    nothing (configure ``^$``); its URL. Deleted at teardown."""
    if not SERVICES.has_rabbitmqctl():
        pytest.fail("rabbitmqctl is needed to create a broker user")
    user, password = f"cdc_test.{SESSION}.{env.tag}", secrets.token_hex(8)

    def ctl(*args: str) -> None:
        SERVICES.rabbitmqctl(*args, timeout=60, check=True)

    ctl("add_user", user, password)
    try:
        ctl("set_permissions", "-p", "/", user, "^$", ".*", ".*")
        parts = urlsplit(AMQP_URL)
        yield urlunsplit(("amqp", f"{user}:{password}@{parts.netloc.rpartition('@')[2]}",
                          "/", "", ""))  # fmt: skip
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            ctl("delete_user", user)


class FakeServer:
    """A local TCP server whose every connection runs ``handle(socket)`` in a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._handle = handle
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(10)
            self._handle(conn)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


def _self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a throwaway self-signed certificate (no client trusts it)."""
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
def untrusted_tls_server(tmp_path: Path) -> Iterator[FakeServer]:
    """A TLS server with a self-signed certificate: a client's verification must fail."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificate")
    context = _self_signed(tmp_path)

    def handshake(conn: socket.socket) -> None:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.recv(1)

    server = FakeServer(handshake)
    try:
        yield server
    finally:
        server.close()


def _pg_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


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
            conn.sendall(_pg_message(b"E", fields))
            return

    server = FakeServer(refuse)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def tcp_proxy() -> Iterator[Any]:
    """A TCP proxy to the broker (127.0.0.1:<free port> -> 5672), stopped at test end."""
    from tcp_proxy import TcpProxy

    parts = urlsplit(AMQP_URL)
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
    from tcp_proxy import TcpProxy

    parts = urlsplit(ADMIN_URL)
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


def _need_rabbitmqctl(what: str) -> None:
    if not SERVICES.has_rabbitmqctl():
        pytest.fail(f"rabbitmqctl is needed for {what}")


class MemoryAlarm:
    """Raise RabbitMQ's memory alarm on the session's broker; always restored to the value read
    before (``rabbitmqctl environment``)."""

    _RE = re.compile(r"\{vm_memory_high_watermark,\s*(\{absolute,\s*([^}]+)\}|[0-9.eE+-]+)\}")

    def __init__(self) -> None:
        self.raised = False
        _, out = SERVICES.rabbitmqctl("environment", timeout=60, check=True)
        m = self._RE.search(out)
        if m is None:
            pytest.fail("cannot read vm_memory_high_watermark from `rabbitmqctl environment`")
        absolute = m.group(2)
        self.original = (
            ["absolute", absolute.strip().strip('"')] if absolute else [m.group(1).strip()]
        )

    @staticmethod
    def _set(*args: str) -> None:
        SERVICES.rabbitmqctl("set_vm_memory_high_watermark", *args, timeout=60, check=True)

    def raise_(self) -> None:
        self.raised = True
        self._set("0.0000001")

    def restore(self) -> None:
        self._set(*self.original)
        self.raised = False


@pytest.fixture
def memory_alarm() -> Iterator[MemoryAlarm]:
    """A :class:`MemoryAlarm`; the finalizer restores the watermark whatever happened."""
    _need_rabbitmqctl("the memory alarm test")
    alarm = MemoryAlarm()
    try:
        yield alarm
    finally:
        if alarm.raised:
            alarm.restore()


class RabbitApp:
    """``rabbitmqctl stop_app`` / ``start_app`` on the session's broker; always restored."""

    def __init__(self) -> None:
        self.stopped = False

    @staticmethod
    def _ctl(*args: str) -> None:
        code, out = SERVICES.rabbitmqctl(*args, timeout=120)
        if code != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} exited {code}: {out}")

    def stop(self) -> None:
        self.stopped = True
        self._ctl("stop_app")

    def start(self) -> None:
        self._ctl("start_app")
        wait_amqp_ready(timeout=90)
        self.stopped = False


@pytest.fixture
def rabbit_app() -> Iterator[RabbitApp]:
    """Stops/starts the broker application; the finalizer starts it again whatever happened."""
    _need_rabbitmqctl("the broker outage test")
    app = RabbitApp()
    try:
        yield app
    finally:
        if app.stopped:
            with contextlib.suppress(Exception):
                app._ctl("start_app")
        wait_amqp_ready(timeout=120)


# --------------------------------------------------------------------------------------------
# throwaway PostgreSQL clusters (tests/pgcluster.py): a primary and a physical standby


class Clusters:
    """Clusters started by one test and :class:`Env` objects on them; ``close()`` removes all.

    A cluster's servers run as the ``postgres`` unix user in ``/tmp/cdc_pgcluster_<pid>_*``;
    leftovers of crashed runs (owner process gone) are swept when the fixture starts.
    """

    def __init__(self, broker: Broker, tmp_path: Path) -> None:
        self.broker = broker
        self.tmp_path = tmp_path
        self.clusters: list[pgcluster.PgCluster] = []
        self.envs: list[Env] = []
        swept = pgcluster.sweep_stale()
        if swept:
            print(f"removed clusters of crashed runs: {swept}")

    def start(
        self, version: int | None = None, standby: bool = True, proxy: bool = False,
        **settings: Any,
    ) -> pgcluster.PgCluster:
        """A running primary of ``version`` (default: the version under test) with extra
        server ``settings``, and a streaming physical standby of it (through
        ``cluster.proxy`` with ``proxy=True``)."""
        cluster = pgcluster.start_cluster(version, standby, settings, proxy)
        self.clusters.append(cluster)
        return cluster

    def env(self, cluster: pgcluster.PgCluster, dbname: str = "cdc_cluster") -> Env:
        """An :class:`Env` in a new database of ``cluster``; the relay's URL names both hosts
        with ``target_session_attrs=read-write`` when there is a standby."""
        cluster.primary.sql(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        url = cluster.multi_host_url(dbname) if cluster.standby else cluster.primary.url(dbname)
        e = Env(dbname, self.broker, self.tmp_path / f"c{len(self.clusters)}", url=url)
        e.tmp_path.mkdir(exist_ok=True)
        e.declare_sink()
        self.envs.append(e)
        return e

    def close(self) -> None:
        """Relays, names and clusters of this test; problems are printed, not raised."""
        errors: list[str] = []
        for e in self.envs:
            for r in e.relays:
                if r.log_path.exists():
                    print(r.tail(80))
            errors += e.cleanup()
        for cluster in self.clusters:
            print(cluster.logs())
            try:
                cluster.destroy()
            except Exception as exc:
                errors.append(f"destroy {cluster.base}: {exc!r}")
        if errors:
            print("teardown problems:", *errors, sep="\n  ")


@pytest.fixture
def pg_clusters(broker: Broker, tmp_path: Path) -> Iterator[Clusters]:
    """Start throwaway clusters (``pg_clusters.start(18)``); stopped and deleted at the end."""
    c = Clusters(broker, tmp_path)
    try:
        yield c
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# consumer workers (python -m consumers): the test ledger worker and its broker/database names


class Ledger(SqlAccess):
    """Names and helpers for one test of the worker runtime with ``tests.workers.ledger``.

    Everything carries the session tag: exchange ``cdc_test.<S>.<t>.events``, queues and the
    retry exchange ``cdc_test.<S>.<t>.ledger*``, tables ``ledger_<t>``, ``ledger_<t>_blocked``
    and ``inbox_<t>``. ``cleanup()`` removes them all and stops the workers.
    """

    RETRY_DELAYS = (0.2, 0.4, 0.8)
    wait_for = staticmethod(wait_for)

    def __init__(self, dbname: str, broker: Broker, tmp_path: Path) -> None:
        self.tag = secrets.token_hex(3)
        self.db_url = db_url(dbname)
        self.broker = broker
        self.tmp_path = tmp_path
        self.ns = f"cdc_test.{SESSION}.{self.tag}"
        self.exchange = f"{self.ns}.events"
        self.queue = f"{self.ns}.ledger.entries"
        self.service = f"{self.ns}.ledger-service"
        self.retry_exchange = f"{self.service}.retry"
        self.retry_queues = [f"{self.retry_exchange}.{d:g}s" for d in self.RETRY_DELAYS]
        self.parking_queue = f"{self.service}.parked"
        self.consumer = f"{self.ns}-ledger"
        self.table = f"public.ledger_{self.tag}"
        self.inbox = f"public.inbox_{self.tag}"
        self.attempt_log = tmp_path / f"attempts-{self.tag}.log"
        self.workers: list[Relay] = []
        self.extra_queues: list[str] = []
        self._conn: psycopg.Connection[Any] | None = None

    def other_service_queue(self, keys: Iterable[str] = ("#",)) -> str:
        """A queue of another service on the same exchange (removed at teardown)."""
        name = f"{self.ns}.other-service"
        self.extra_queues.append(name)
        self.broker.declare_queue(name, self.exchange, keys)
        return name

    def more_queues(self, n: int) -> list[str]:
        """Every queue of a worker started with ``ledger_queues=n`` (extra ones removed at
        teardown)."""
        extra = [f"{self.ns}.ledger.entries-{i}" for i in range(2, n + 1)]
        self.extra_queues += extra
        return [self.queue, *extra]

    # -- processes ---------------------------------------------------------------------------

    def worker_env(self, **overrides: Any) -> dict[str, str]:
        env = {
            "CDC_DATABASE_URL": self.db_url,
            "CDC_AMQP_URL": AMQP_URL,
            "CDC_EXCHANGE": self.exchange,
            "CDC_LEDGER_NAMESPACE": self.ns,
            "CDC_LEDGER_TABLE": self.table,
            "CDC_LEDGER_ATTEMPT_LOG": str(self.attempt_log),
            "CDC_WORKER_INBOX_TABLE": self.inbox,
            "CDC_WORKER_RETRY_DELAYS": ",".join(f"{d:g}" for d in self.RETRY_DELAYS),
            "CDC_WORKER_METRICS_PORT": "0",
            "CDC_WORKER_METRICS_HOST": "127.0.0.1",
            "CDC_WORKER_RECONNECT_MIN_DELAY": "0.1",
            "CDC_WORKER_RECONNECT_MAX_DELAY": "1",
            "CDC_WORKER_PARKED_POLL_INTERVAL": "0.2",
            "CDC_WORKER_LOG_FORMAT": "json",
        }
        return with_overrides(env, overrides)

    def start(self, metrics: bool = True, wait: bool = True, **overrides: Any) -> Relay:
        """A started ``python -m consumers tests.workers.ledger`` (killed at teardown)."""
        if metrics:
            overrides.setdefault("worker_metrics_port", free_port())
        n = len(self.workers)
        w = Relay(
            self.worker_env(**overrides),
            self.tmp_path / f"worker-{n}.log",
            lambda: True,
            name=f"worker-{n}",
            argv=["-m", "consumers", "tests.workers.ledger"],
        )
        self.workers.append(w)
        w.start()
        if wait:
            self.wait_consuming(w)
        return w

    def wait_consuming(self, w: Relay, timeout: float = 30.0) -> None:
        """Until the worker consumes: /healthz if it has a port, else the broker's view."""
        if w.metrics_port is not None:
            w.wait_state("consuming", timeout)
            return

        def consuming() -> bool:
            w._check_alive()
            return self.consumers() > len([x for x in self.workers if x.alive()]) - 1

        wait_for(consuming, timeout, lambda: f"{w.name} to consume\n{w.tail()}", interval=0.1)

    def consumers(self) -> int:
        async def fn(ch: aio_pika.abc.AbstractChannel) -> int:
            try:
                ok = await (await ch.get_underlay_channel()).queue_declare(self.queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return 0
            return int(ok.consumer_count)

        return int(self.broker._run(fn, timeout=20))

    def consumers_cli(
        self, *args: str, timeout: float = 60.0, **overrides: Any
    ) -> subprocess.CompletedProcess[str]:
        """``python -m consumers ARGS`` with this test's environment."""
        full = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        full.update(self.worker_env(**overrides))
        return subprocess.run(
            [sys.executable, "-m", "consumers", *args],
            cwd=REPO,
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            check=False,
        )

    # -- events ------------------------------------------------------------------------------

    @staticmethod
    def entry(key: str = "k", amount: int = 1, **extra: Any) -> dict[str, Any]:
        return {"key": key, "amount": amount, **extra}

    def publish(
        self,
        bodies: list[Any],
        routing_key: str = "ledger.entry",
        message_ids: list[str | None] | None = None,
    ) -> list[str | None]:
        """Publish (persistent, confirmed) to the events exchange; returns the message ids."""
        ids = message_ids or [str(uuid.uuid4()) for _ in bodies]

        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            ex = await ch.get_exchange(self.exchange, ensure=False)
            for chunk in range(0, len(bodies), 500):
                await asyncio.gather(
                    *(
                        ex.publish(
                            aio_pika.Message(
                                body if isinstance(body, bytes) else json.dumps(body).encode(),
                                message_id=mid,
                                content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                timestamp=dt.datetime.now(dt.UTC),
                            ),
                            routing_key,
                            mandatory=True,
                            timeout=30,
                        )
                        for body, mid in zip(
                            bodies[chunk : chunk + 500], ids[chunk : chunk + 500], strict=True
                        )
                    )
                )

        self.broker._run(fn)
        return ids

    def publish_without_id(self, body: Any, routing_key: str = "ledger.entry") -> None:
        """Publish one message that has no ``message_id`` property at all (aio-pika and
        aiormq fill one in otherwise; ``ABSENT_ID`` keeps it out of the frame)."""
        from pamqp.commands import Basic

        from consumers.runtime.republish import ABSENT_ID

        async def fn(ch: aio_pika.abc.AbstractChannel) -> None:
            raw = await ch.get_underlay_channel()  # in confirm mode (aio-pika's default)
            props = Basic.Properties(
                message_id=ABSENT_ID, content_type="application/json", delivery_mode=2
            )
            await raw.basic_publish(
                json.dumps(body).encode(),
                exchange=self.exchange,
                routing_key=routing_key,
                properties=props,
                mandatory=True,
                timeout=30,
            )

        self.broker._run(fn)

    # -- ground truth ------------------------------------------------------------------------

    def _ident(self, table: str) -> sql.Composed:
        schema, name = table.split(".")
        return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))

    def rows(self) -> list[tuple[str, str, int, int, int]]:
        """(message_id, key, amount, attempt, pid) of every ledger row (empty if no table)."""
        try:
            return [
                tuple(r)  # type: ignore[misc]
                for r in self.sql(
                    sql.SQL("SELECT message_id, key, amount, attempt, pid FROM {} ORDER BY id")
                    .format(self._ident(self.table))
                )
            ]
        except psycopg.errors.UndefinedTable:
            return []

    def row_count(self) -> int:
        return len(self.rows())

    def inbox_ids(self) -> list[str]:
        return [
            r[0]
            for r in self.sql(
                sql.SQL("SELECT message_id FROM {} WHERE consumer = %s").format(
                    self._ident(self.inbox)
                ),
                (self.consumer,),
            )
        ]

    def block(self, key: str) -> None:
        self.sql(
            sql.SQL("INSERT INTO {} (key) VALUES (%s) ON CONFLICT DO NOTHING").format(
                self._ident(self.table + "_blocked")
            ),
            (key,),
        )

    def unblock(self, key: str) -> None:
        self.sql(
            sql.SQL("DELETE FROM {} WHERE key = %s").format(self._ident(self.table + "_blocked")),
            (key,),
        )

    def attempts(self) -> dict[str, list[tuple[int, float]]]:
        """message_id -> [(attempt, wall time)] from the worker's attempt log."""
        out: dict[str, list[tuple[int, float]]] = {}
        if not self.attempt_log.exists():
            return out
        for line in self.attempt_log.read_text().splitlines():
            mid, attempt, at = line.split()
            out.setdefault(mid, []).append((int(attempt), float(at)))
        return out

    def wait_rows(self, n: int, timeout: float = 60.0) -> int:
        return int(
            wait_for(
                lambda: (c := self.row_count()) >= n and c,
                timeout,
                lambda: f"{n} ledger rows (have {self.row_count()})\n{self.tails()}",
                interval=0.1,
            )
        )

    def wait_parked(self, n: int, timeout: float = 30.0) -> int:
        def got() -> int | None:
            c = self.broker.queue_count(self.parking_queue)
            return c if c is not None and c >= n else None

        return int(
            wait_for(
                got,
                timeout,
                lambda: f"{n} parked (have {self.broker.queue_count(self.parking_queue)})\n"
                + self.tails(),
                interval=0.1,
            )
        )

    def tails(self) -> str:
        return "\n".join(w.tail(30) for w in self.workers)

    # -- teardown ----------------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        t = Teardown()
        step, errors = t.step, t.errors

        for w in self.workers:
            step(f"stop {w.name}", w.stop)
        with contextlib.suppress(Exception):
            if self._conn is not None:
                self._conn.close()
        try:
            with pg_connect(self.db_url) as conn:
                for table in (self.table, f"{self.table}_blocked", self.inbox):
                    step(
                        f"drop {table}",
                        lambda t=table: conn.execute(
                            sql.SQL("DROP TABLE IF EXISTS {}").format(self._ident(t))
                        ),
                    )
        except Exception as exc:
            errors.append(f"postgres: {exc!r}")
        for q in [self.queue, *self.retry_queues, self.parking_queue, *self.extra_queues]:
            step(f"delete queue {q}", lambda q=q: self.broker.delete_queue(q))
        for e in (self.retry_exchange, self.exchange):
            step(f"delete exchange {e}", lambda e=e: self.broker.delete_exchange(e))
        return errors


@pytest.fixture
def ledger(pg_session_db: str, broker: Broker, tmp_path: Path) -> Iterator[Ledger]:
    """Names for one runtime test with the ledger worker; everything removed at the end."""
    lg = Ledger(pg_session_db, broker, tmp_path)
    try:
        yield lg
    finally:
        for w in lg.workers:
            if w.log_path.exists():
                print(w.tail(60))
        errors = lg.cleanup()
        if errors:
            print("teardown problems:", *errors, sep="\n  ")


# --------------------------------------------------------------------------------------------
# live monitoring: a RabbitMQ vhost of our own, Prometheus and postgres_exporter processes

def tool(name: str) -> str | None:
    """An executable on PATH or in the venv (``make install`` unpacks Debian's Prometheus
    tools there: scripts/fetch-prometheus.sh)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return bool(resp.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def ensure_rabbitmq_prometheus() -> str:
    """The shared broker's per-object metrics URL. Enables the ``rabbitmq_prometheus`` plugin
    if it is not enabled yet, and leaves it enabled (it only adds a metrics listener)."""
    url = SERVICES.rabbit_metrics_url
    if not _http_ok(url):
        _, listed = SERVICES.broker_tool("rabbitmq-plugins", "list", "-e", "-m")
        if "rabbitmq_prometheus" not in listed.split():
            SERVICES.broker_tool(
                "rabbitmq-plugins", "enable", "rabbitmq_prometheus", timeout=180, check=True
            )
        wait_for(lambda: _http_ok(url), 90, lambda: f"{url} to answer", interval=1)
    return url


def _rabbitmqctl(*args: str) -> None:
    SERVICES.rabbitmqctl(*args, timeout=120, check=True)


@pytest.fixture
def rabbit_vhost() -> Iterator[tuple[str, str]]:
    """``(name, AMQP URL)`` of a fresh vhost (guest has every permission), deleted with all
    its queues and exchanges at the end. Lets a test use the real queue names
    (``billing-service.device-started``...) without touching anyone else's."""
    if not SERVICES.has_rabbitmqctl():
        pytest.skip("rabbitmqctl is not on PATH: cannot create a vhost")
    for stale in _rabbitmqctl_names("list_vhosts"):
        if _is_ours_or_stale(stale, "\0", _STALE_AMQP_RE):
            with contextlib.suppress(subprocess.SubprocessError):
                _rabbitmqctl("delete_vhost", stale)
    name = f"cdc_test.{SESSION}.{secrets.token_hex(3)}"
    _rabbitmqctl("add_vhost", name)
    try:
        _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        base = urlsplit(AMQP_URL)
        path = "/" + urllib.parse.quote(name, safe="")
        yield name, urlunsplit((base.scheme, base.netloc, path, base.query, ""))
    finally:
        # Another test may have the broker's app stopped (rabbit_app): wait for it.
        with contextlib.suppress(RuntimeError):
            wait_amqp_ready(timeout=120)
        _rabbitmqctl("delete_vhost", name)


class Daemon:
    """A long-running helper process (Prometheus, an exporter); output to ``log_path``."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv, self.log_path, self.env = argv, log_path, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env={**os.environ, **(self.env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.log_path.name} ---\n" + "\n".join(text.splitlines()[-lines:])


class Prometheus:
    """A Prometheus server on a free port with its config and data in ``workdir``."""

    def __init__(self, binary: str, workdir: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.daemon = Daemon(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=2h",
                "--log.level=warn",
            ],
            workdir / "prometheus.log",
        )

    def start(self) -> Prometheus:
        self.daemon.start()
        wait_for(lambda: _http_ok(f"{self.url}/-/ready"), 60, self.daemon.tail, interval=0.5)
        return self

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            doc = json.loads(resp.read())
        assert doc["status"] == "success", doc
        return doc["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now (an error fails the test)."""
        data = self.api("query", query=expr)
        return list(data["result"]) if data["resultType"] == "vector" else [data]

    def firing(self) -> list[dict[str, str]]:
        """Labels of every alert that is firing now."""
        return [a["labels"] for a in self.api("alerts")["alerts"] if a["state"] == "firing"]

    def stop(self) -> None:
        self.daemon.stop()


# --------------------------------------------------------------------------------------------
# bootstrap: a database and two roles as deploy/kubernetes/sql creates them


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
        with pg_connect(ADMIN_URL) as admin:
            _drop_database(admin, names["db"])
            for role in (names["relay_role"], names["worker_role"], names["monitor_role"]):
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def role_url(role: str, dbname: str) -> str:
    """``dbname`` as ``role`` (the test server trusts local connections: no password)."""
    parts = urlsplit(db_url(dbname))
    hostport = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{role}@{hostport}", parts.path, parts.query, ""))
