"""The relay under test: one test's outbox table, slot, publication, exchange and queues
(:class:`Env`), and :class:`Clusters` of throwaway servers with an ``Env`` on each.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import dict_row

from harness import pgcluster
from harness.common import (
    LSN_RE,
    SNAPSHOT_RE,
    Teardown,
    format_lsn,
    free_port,
    parse_lsn,
    wait_for,
    with_overrides,
)
from harness.postgres import SqlAccess, delete_checkpoint, drop_slot, pg_connect, rollback_prepared
from harness.processes import Relay
from harness.rabbitmq import Broker, Msg
from harness.rows import RawJson, Row, Workload, insert_rows, iso, new_event
from harness.session import REPO, SESSION, db_url, session_services


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
            assert SNAPSHOT_RE.match(str(h.get("x-cdc-snapshot"))), (where, h)
            assert "commit_lsn" not in h and "commit_time" not in h, (where, h)
        else:
            assert LSN_RE.match(str(h.get("commit_lsn"))), (where, h)
            commit_time = iso(h.get("commit_time"))
            assert commit_time.utcoffset() == dt.timedelta(0), (where, h["commit_time"])
            now = dt.datetime.now(dt.UTC)
            soon = now + dt.timedelta(minutes=1)
            assert self.t0 - dt.timedelta(minutes=1) <= commit_time <= soon, where
        created_h = iso(h.get("created_at"))
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
                    lambda: rollback_prepared(conn, self.dbname, self.gid_prefix),
                )
                step("drop slot", lambda: drop_slot(conn, self.slot))
                step("delete checkpoint row", lambda: delete_checkpoint(conn, self.slot))
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
