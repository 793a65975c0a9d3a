"""Throwaway resources of one harness run, and their removal even on failure or Ctrl-C.

A run owns: a database ``cdc_benchrun_<tag>`` (every scenario gets its own table, publication
and slot in it) and, when ``rabbitmqctl`` is usable, a virtual host ``cdc_benchrun_<tag>`` on
the shared broker (so a worker's fixed queue names cannot collide with anyone's). Without
``rabbitmqctl`` the run uses the default vhost and deletes every exchange and queue it
declared by name. ``close()`` terminates the run's walsenders and backends, drops its slots
(a forgotten slot pins WAL), the database and the vhost. Leftovers of a crashed run older
than an hour are swept at the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import shutil
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import aiormq
import psycopg
from aiormq.abc import AbstractChannel
from pamqp.common import FieldValue
from psycopg import sql

PREFIX = "cdc_benchrun_"
STALE_AFTER_S = 3600
_TAGGED_RE = re.compile(r"^cdc_benchrun_([0-9a-f]{8})[0-9a-f]{4}(_|$)")


@dataclass(frozen=True, slots=True)
class Names:
    """Names of one scenario's resources (validated shapes: the relay checks them again)."""

    table: str
    slot: str
    publication: str
    exchange: str
    queue: str
    parking: str


def with_path(url: str, path: str) -> str:
    """``url`` with its path replaced (a database name or a URL-quoted vhost)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + path, parts.query, parts.fragment))


@dataclass
class Run:
    """Context of one harness run: where to connect and what to remove at the end."""

    admin_url: str
    amqp_root_url: str
    results_dir: Path
    tag: str = field(default_factory=lambda: f"{int(time.time()):08x}{secrets.token_hex(2)}")
    vhost: str | None = None
    declared_queues: set[str] = field(default_factory=set)
    declared_exchanges: set[str] = field(default_factory=set)

    @property
    def db_name(self) -> str:
        return PREFIX + self.tag

    @property
    def db_url(self) -> str:
        return with_path(self.admin_url, self.db_name)

    @property
    def amqp_url(self) -> str:
        if self.vhost is None:
            return self.amqp_root_url
        return with_path(self.amqp_root_url, quote(self.vhost, safe=""))

    def names(self, scenario: str) -> Names:
        """Resource names of ``scenario`` (lower-case letters, digits and _ only)."""
        key = re.sub(r"[^a-z0-9_]", "_", scenario.lower())
        base = f"cdc_benchrun.{self.tag}.{key}"
        return Names(
            table=f"outbox_{key}",
            slot=f"{PREFIX}{self.tag}_{key}"[:63],
            publication=f"pub_{key}",
            exchange=f"{base}.events",
            queue=f"{base}.sink",
            parking=f"{base}.parked",
        )

    # ----------------------------------------------------------------------------------
    # lifecycle

    async def open(self) -> None:
        """Sweep stale leftovers, create the database and (if possible) the vhost."""
        self.results_dir.mkdir(parents=True, exist_ok=True)
        await self._sweep_stale()
        async with await psycopg.AsyncConnection.connect(self.admin_url, autocommit=True) as db:
            await db.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.db_name)))
        if shutil.which("rabbitmqctl") and await _rabbitmqctl("add_vhost", PREFIX + self.tag):
            self.vhost = PREFIX + self.tag
            user = _amqp_user(self)
            await _rabbitmqctl("set_permissions", "-p", self.vhost, user, ".*", ".*", ".*")

    async def close(self) -> None:
        """Remove everything the run created; each step runs even if an earlier one failed."""
        with contextlib.suppress(Exception):
            await drop_database(self.admin_url, self.db_name)
        if self.vhost is not None:
            with contextlib.suppress(Exception):
                await _rabbitmqctl("delete_vhost", self.vhost)
        else:
            with contextlib.suppress(Exception):
                await self._delete_amqp()

    async def _delete_amqp(self) -> None:
        async with self.channel() as channel:
            for queue in sorted(self.declared_queues):
                await channel.queue_delete(queue)
            for exchange in sorted(self.declared_exchanges):
                await channel.exchange_delete(exchange)

    async def _sweep_stale(self) -> None:
        cutoff = time.time() - STALE_AFTER_S
        async with await psycopg.AsyncConnection.connect(self.admin_url, autocommit=True) as db:
            cur = await db.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE 'cdc\\_benchrun\\_%'"
            )
            stale = [name for (name,) in await cur.fetchall() if _older(name, cutoff)]
        for name in stale:
            with contextlib.suppress(Exception):
                await drop_database(self.admin_url, name)
        if shutil.which("rabbitmqctl"):
            listing = await _rabbitmqctl_output("list_vhosts", "--quiet")
            for vhost in (listing or "").split():
                if _older(vhost, cutoff):
                    await _rabbitmqctl("delete_vhost", vhost)

    # ----------------------------------------------------------------------------------
    # broker

    @contextlib.asynccontextmanager
    async def channel(self) -> AsyncIterator[AbstractChannel]:
        """A channel on a connection of its own to the run's vhost, closed at the end."""
        conn = await aiormq.connect(self.amqp_url)
        try:
            yield await conn.channel()
        finally:
            await conn.close()

    async def declare_sink(
        self, names: Names, *, max_length: int | None = None, bind: str = "#"
    ) -> None:
        """Declare the scenario's topic exchange and durable classic queue bound with ``bind``.

        ``max_length`` caps the queue (drop-head, still persisted and confirmed) for
        scenarios that push more events than are worth keeping in the broker.
        """
        arguments: dict[str, FieldValue] = {"x-queue-type": "classic"}
        if max_length is not None:
            arguments["x-max-length"] = max_length
        async with self.channel() as channel:
            await channel.exchange_declare(names.exchange, exchange_type="topic", durable=True)
            self.declared_exchanges.add(names.exchange)
            await channel.queue_declare(names.queue, durable=True, arguments=arguments)
            self.declared_queues.add(names.queue)
            self.declared_queues.add(names.parking)
            await channel.queue_bind(names.queue, names.exchange, routing_key=bind)

    async def purge(self, queue: str) -> None:
        """Drop the messages of ``queue``."""
        async with self.channel() as channel:
            await channel.queue_purge(queue)

    async def delete_sink(self, names: Names) -> None:
        """Delete the scenario's queues and exchange (they can hold a lot of messages)."""
        async with self.channel() as channel:
            for queue in (names.queue, names.parking):
                await channel.queue_delete(queue)
                self.declared_queues.discard(queue)
            await channel.exchange_delete(names.exchange)
            self.declared_exchanges.discard(names.exchange)


async def drop_slots(admin_url: str, db_name: str) -> None:
    """Terminate the walsenders of ``db_name``'s slots and drop the slots."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as db:
        for _ in range(20):
            cur = await db.execute(
                "SELECT slot_name, active_pid FROM pg_replication_slots WHERE database = %s",
                (db_name,),
            )
            slots = await cur.fetchall()
            if not slots:
                return
            for slot, pid in slots:
                if pid is not None:
                    await db.execute("SELECT pg_terminate_backend(%s)", (pid,))
                else:
                    with contextlib.suppress(psycopg.Error):
                        await db.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            await asyncio.sleep(0.25)


async def drop_slot(admin_url: str, slot: str) -> None:
    """Drop one slot (terminating its walsender first); absent is fine."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as db:
        for _ in range(20):
            cur = await db.execute(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (slot,)
            )
            row = await cur.fetchone()
            if row is None:
                return
            if row[0] is not None:
                await db.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                await asyncio.sleep(0.25)
                continue
            with contextlib.suppress(psycopg.Error):
                await db.execute("SELECT pg_drop_replication_slot(%s)", (slot,))


async def drop_table(db_url: str, table: str) -> None:
    """Drop a scenario's outbox table (frees its disk before the next scenario)."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        await db.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(table)))


async def drop_database(admin_url: str, db_name: str) -> None:
    """Drop ``db_name`` after its slots; backends are forced out."""
    await drop_slots(admin_url, db_name)
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as db:
        await db.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(db_name))
        )


def _older(name: str, cutoff: float) -> bool:
    match = _TAGGED_RE.match(name)
    return match is not None and int(match.group(1), 16) < cutoff


def _amqp_user(run: Run) -> str:
    return urlsplit(run.amqp_root_url).username or "guest"


async def _rabbitmqctl_output(*args: str) -> str | None:
    proc = await asyncio.create_subprocess_exec(
        "rabbitmqctl", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    return out.decode() if proc.returncode == 0 else None


async def _rabbitmqctl(*args: str) -> bool:
    return await _rabbitmqctl_output(*args) is not None
