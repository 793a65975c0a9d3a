"""The worker's PostgreSQL side: one connection, reopened after an outage, and batches run on
it until they commit.

The connection is opened with the inbox table and the worker's schema applied, retrying with
backoff while PostgreSQL is unavailable (a missing privilege is a refusal: no retry helps).
A batch whose transaction fails (:class:`~consumers.errors.BatchAborted`) runs again after a
backoff delay, on a new connection if the old one broke: the inbox makes that safe, and the
batch stays in hand meanwhile, unacked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any

import psycopg

from cdc.service.backoff import Backoff
from consumers.config import ConsumerSettings
from consumers.connect import open_database
from consumers.errors import BatchAborted, Refused
from consumers.runtime import inbox
from consumers.runtime.batch import BatchMessage, run_batch
from consumers.runtime.metrics import WorkerMetrics
from consumers.runtime.spec import WorkerSpec

log = logging.getLogger(__name__)


@dataclass(eq=False)
class WorkerDatabase:
    """The one database connection of a worker; see the module docstring."""

    settings: ConsumerSettings
    spec: WorkerSpec
    metrics: WorkerMetrics
    _conn: psycopg.AsyncConnection[Any] | None = field(default=None, init=False)

    def _backoff(self) -> Backoff:
        s = self.settings
        return Backoff(s.worker_reconnect_min_delay, s.worker_reconnect_max_delay)

    def _reconnected(self) -> None:
        self.metrics.reconnects.labels(worker=self.spec.name, side="database").inc()

    async def connection(self) -> psycopg.AsyncConnection[Any]:
        """The open connection, or a new one (schema applied), retrying with backoff."""
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        backoff = self._backoff()
        while True:
            try:
                conn = await open_database(
                    self.settings.dsn(),
                    connect_timeout=10,
                    application_name=f"cdc-worker:{self.spec.name}"[:63],
                    # No server-side prepared statements: psycopg may prepare one inside a
                    # pipelined batch that then fails, and later believe it exists ("prepared
                    # statement _pg3_N does not exist"). Batches make planning a small cost.
                    prepare_threshold=None,
                )
                await inbox.apply_schema(conn, self.settings.worker_inbox_table, self.spec.schema)
            except psycopg.errors.InsufficientPrivilege as exc:
                raise Refused(f"the worker's database role lacks a privilege: {exc}") from exc
            except psycopg.OperationalError as exc:
                delay = backoff.next_delay()
                self._reconnected()
                log.warning("database unavailable: %s; retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            self._conn = conn
            return conn

    async def run(self, items: list[BatchMessage]) -> None:
        """Run ``items`` as one batch until it commits (a database outage waits it out)."""
        backoff = self._backoff()
        while True:
            conn = await self.connection()
            try:
                how = await run_batch(
                    conn,
                    self.settings.worker_inbox_table,
                    self.spec.name,
                    items,
                    optimistic=self.spec.db_only,
                )
                if how is not None:
                    self.metrics.optimistic_batches.labels(worker=self.spec.name, result=how).inc()
                return
            except BatchAborted as exc:
                if conn.broken or conn.closed:
                    self._reconnected()
                    with contextlib.suppress(Exception):
                        await conn.close()
                    self._conn = None
                delay = backoff.next_delay()
                log.warning("%s; running the batch again in %.2fs", exc, delay)
                await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close the connection (errors ignored: the worker is stopping)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
