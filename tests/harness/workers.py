"""The consumer workers under test: the domain workers (billing, notifications) and the
runtime's test ledger worker, with the names and tables each test gives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import secrets
import subprocess
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import psycopg
from psycopg import sql

from harness.common import Teardown, free_port, wait_for, with_overrides
from harness.postgres import SqlAccess, pg_connect
from harness.processes import Relay, run_module
from harness.rabbitmq import Broker
from harness.relay import Env
from harness.session import SESSION, db_url, session_services


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
            "CDC_AMQP_URL": session_services().amqp_url,
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

    def start_notifications(self, secret: str, **overrides: Any) -> Relay:
        """The notifications worker, posting webhooks signed with ``secret`` to a test
        receiver (plain http on 127.0.0.1, 2 s timeout)."""
        return self.start(
            "notifications",
            webhook_secret=secret,
            webhook_timeout=2,
            webhook_allow_http="true",
            webhook_allowed_networks="127.0.0.1/32",
            **overrides,
        )

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


class LedgerWorkerEnv(SqlAccess):
    """Names and helpers for one test of the worker runtime with ``tests.workers.ledger``.

    Everything carries the session tag: exchange ``cdc_test.<S>.<t>.events``, queues and the
    retry exchange ``cdc_test.<S>.<t>.ledger*``, tables ``ledger_<t>``, ``ledger_<t>_blocked``
    and ``inbox_<t>``. ``cleanup()`` removes them all and stops the workers.
    """

    RETRY_DELAYS: tuple[float, ...] = (0.2, 0.4, 0.8)
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

    def use_retry_delays(self, *delays: float) -> None:
        """Give the workers started after this call another retry ladder (its queues are
        removed at teardown like the default ones)."""
        self.RETRY_DELAYS = delays
        self.retry_queues = [f"{self.retry_exchange}.{d:g}s" for d in delays]

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
            "CDC_AMQP_URL": session_services().amqp_url,
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
        return run_module("consumers", args, self.worker_env(**overrides), timeout)

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
