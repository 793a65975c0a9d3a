"""The relay under test: one test's outbox table, slot, publication, exchange and queues
(:class:`Env`), and :class:`Clusters` of throwaway servers with an ``Env`` on each.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import secrets
import subprocess
from pathlib import Path
from typing import Any

import pytest
from psycopg import sql

from harness import pgcluster
from harness.common import (
    Teardown,
    format_lsn,
    free_port,
    parse_lsn,
    wait_for,
    with_overrides,
)
from harness.contract import Contract
from harness.postgres import OutboxDb
from harness.processes import Relay, run_module
from harness.rabbitmq import Broker, SinkQueues
from harness.rows import RawJson, Row, new_event
from harness.session import db_url, session_services
from harness.workload import Workload


class Env:
    """One test of the relay: unique names on each service and helpers over them.

    A composition: ``pg`` (:class:`OutboxDb`: table, slot, publication in PostgreSQL), ``mq``
    (:class:`SinkQueues`: exchange and queues in RabbitMQ) and ``contract``
    (:class:`Contract`), plus the relay processes and ``cdc`` commands run with this test's
    settings. Their names and helpers read as ``env.<name>`` (``env.slot``,
    ``env.sink_queue``, ``env.check_message``). ``cleanup()`` removes everything.
    """

    def __init__(
        self, dbname: str, broker: Broker, tmp_path: Path, url: str | None = None
    ) -> None:
        self.tag = secrets.token_hex(3)
        self.tmp_path = tmp_path
        self.t0 = dt.datetime.now(dt.UTC)
        self.relays: list[Relay] = []
        self.pg = OutboxDb(dbname, url or db_url(dbname), self.tag)
        self.mq = SinkQueues(broker, self.tag, self.relay_tails)
        self.contract = Contract(self.mq.exchange, self.t0)

    def __getattr__(self, name: str) -> Any:
        # Only names Env lacks get here: the parts' names and helpers, as env.<name>.
        if name in ("pg", "mq", "contract"):  # not set yet (during __init__)
            raise AttributeError(name)
        for part in (self.pg, self.mq, self.contract):
            with contextlib.suppress(AttributeError):
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

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

    # plain helpers, reachable from tests without importing the harness
    event = staticmethod(new_event)
    raw_json = RawJson
    parse_lsn = staticmethod(parse_lsn)
    format_lsn = staticmethod(format_lsn)
    wait_for = staticmethod(wait_for)
    free_port = staticmethod(free_port)

    def workload(self, **kw: Any) -> Workload:
        return Workload(self, **kw)

    # -- the cdc CLI ------------------------------------------------------------------------

    def relay_env(self, **overrides: Any) -> dict[str, str]:
        """CDC_* variables for this test; ``overrides`` by field name (``max_in_flight=10``)."""
        env = {
            "CDC_DATABASE_URL": self.db_url,
            "CDC_AMQP_URL": session_services().amqp_url,
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

    def cdc(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -m cdc ARGS`` with ``env`` (default: ``relay_env()``)."""
        return run_module("cdc", args, self.relay_env() if env is None else env, timeout)

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

    def relay_tails(self) -> str:
        return "\n".join(r.tail(30) for r in self.relays)

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
        """Stop the relays, then remove the names on each service; the problems met."""
        t = Teardown()
        for r in self.relays:
            t.step(f"stop {r.name}", r.stop)
        self.pg.drop(t)
        self.mq.delete(t)
        return t.errors


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
