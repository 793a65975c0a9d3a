"""The PostgreSQL side: one replication connection in COPY BOTH mode, driven over asyncio.

psycopg 3 has no replication API, so this drives its libpq layer (``conn.pgconn``)
directly. This module is the only code that touches the replication socket; protocol
bytes are built and parsed by ``cdc/wire/replication.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.config import RelaySettings
from cdc.errors import SetupError, SlotBusyError, SourceError
from cdc.service.refusals import refused_by_postgres
from cdc.wire.replication import (
    pgoutput_version,
    standby_status,
    start_replication_command,
    unix_us_to_pg,
)

# Output functions run with the walsender's settings: pin them so timestamps parse.
_SESSION_OPTIONS = "-c TimeZone=UTC -c DateStyle=ISO,YMD -c extra_float_digits=3"
# Liveness unless the DSN sets its own: connecting gives up after 10 s (libpq waits forever
# by default); TCP keepalives probe after 10 s idle, then every 5 s, dead after 3
# unanswered; unacknowledged data gives up after 30 s (tcp_user_timeout, ms).
_KEEPALIVES = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
    "tcp_user_timeout": "30000",
}


def with_keepalives(dsn: str) -> str:
    """``dsn`` plus the libpq connect timeout and TCP keepalive parameters it lacks."""
    try:
        given = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return dsn  # libpq reports a bad DSN better when it connects
    return make_conninfo(dsn, **{k: v for k, v in _KEEPALIVES.items() if k not in given})
_SETUP_STATES = {"42501", "42704", "55000", "42P01", "3D000", "28000"}


def translate_error(result: pq.abc.PGresult | None, pgconn: pq.abc.PGconn) -> SourceError:
    """Turn a failed replication-protocol result into the relay's error of that kind."""
    state = (result.error_field(pq.DiagnosticField.SQLSTATE) or b"").decode() if result else ""
    text = (result.error_message if result else pgconn.error_message).decode(errors="replace")
    text = text.strip() or "replication connection closed"
    if state == "55006":
        return SlotBusyError(text)
    if state in _SETUP_STATES:
        return SetupError(f"{text} (run `cdc setup`, and check the role has REPLICATION)")
    return SourceError(text)


def _resolve(future: asyncio.Future[None]) -> None:
    # Reader/writer callbacks fire on every loop turn while the socket stays ready.
    if not future.done():
        future.set_result(None)


class ReplicationStream:
    """A started logical replication stream; read CopyData payloads, send status updates."""

    def __init__(self, conn: psycopg.AsyncConnection[tuple[object, ...]]) -> None:
        self._conn = conn
        self._pg = conn.pgconn
        self._fd = self._pg.socket
        self.proto_version = pgoutput_version(self._pg.server_version)
        #: The walsender's process id, to recognise it later if this connection is abandoned.
        self.backend_pid = self._pg.backend_pid

    @classmethod
    async def start(cls, settings: RelaySettings) -> ReplicationStream:
        """Connect with ``replication=database`` and issue START_REPLICATION at the slot."""
        try:
            conn = await psycopg.AsyncConnection.connect(
                with_keepalives(settings.dsn()),
                replication="database",
                autocommit=True,
                options=_SESSION_OPTIONS,
            )
        except psycopg.OperationalError as exc:
            doing = "cannot open the replication connection"
            refused = refused_by_postgres(str(exc), doing)
            raise refused or SourceError(f"{doing}: {exc}") from exc
        stream = cls(conn)
        try:
            await stream._start(settings)
        except BaseException:
            await stream.close()
            raise
        return stream

    async def _start(self, settings: RelaySettings) -> None:
        cmd = start_replication_command(
            settings.slot_name, settings.publication_name, self.proto_version
        )
        self._pg.send_query(cmd)
        result = await self._next_result()
        if result is None or result.status != pq.ExecStatus.COPY_BOTH:
            raise translate_error(result, self._pg)

    async def _next_result(self) -> pq.abc.PGresult | None:
        while True:
            self._pg.consume_input()
            if not self._pg.is_busy():
                return self._pg.get_result()
            await self._wait_readable(None)

    async def _wait_readable(self, timeout: float | None) -> bool:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self._fd, _resolve, ready)
        try:
            # Not wait_for: on 3.11 it swallows a cancellation that arrives as the socket
            # turns readable, and the reader task would then never end.
            done, _ = await asyncio.wait((ready,), timeout=timeout)
            return bool(done)
        finally:
            loop.remove_reader(self._fd)

    async def _wait_writable(self) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()
        loop.add_writer(self._fd, _resolve, ready)
        try:
            await ready
        finally:
            loop.remove_writer(self._fd)

    def read_ready(self) -> memoryview | None:
        """The next CopyData payload if libpq already holds it, else ``None``; never waits."""
        try:
            nbytes, data = self._pg.get_copy_data(1)
        except psycopg.OperationalError as exc:
            raise SourceError(f"replication stream failed: {exc}") from exc
        if nbytes > 0:
            return data
        if nbytes == -1:
            raise translate_error(self._pg.get_result(), self._pg)
        return None

    async def read(self, timeout: float) -> memoryview | None:
        """Return the next CopyData payload, or ``None`` if nothing came within ``timeout``."""
        data = self.read_ready()
        if data is not None:  # a backlog: no clock reading per message
            return data
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await self._wait_readable(left):
                return None
            try:
                self._pg.consume_input()
            except psycopg.OperationalError as exc:
                raise SourceError(f"replication connection lost: {exc}") from exc
            data = self.read_ready()
            if data is not None:
                return data

    async def send_status(self, lsn: int, *, reply: bool = False) -> None:
        """Report ``lsn`` as written, flushed and applied."""
        now = unix_us_to_pg(time.time_ns() // 1000)
        try:
            if self._pg.put_copy_data(standby_status(lsn, now, reply=reply)) != 1:
                raise SourceError("could not queue the standby status update")
            while self._pg.flush() == 1:
                await self._wait_writable()
        except psycopg.OperationalError as exc:
            raise SourceError(f"replication connection lost: {exc}") from exc

    async def finish(self, lsn: int, timeout: float) -> bool:
        """Report ``lsn``, end the stream (CopyDone) and wait up to ``timeout`` seconds for
        the server to end its side; True once it has. The server reads its messages in
        order, so then it has taken the report. Closing right after the report could lose
        it: a walsender that fails writing WAL to the closed socket exits without reading
        what is left of its input. WAL that arrives meanwhile lies past ``lsn``: dropped,
        the next session reads it again."""
        await self.send_status(lsn)
        deadline = time.monotonic() + timeout
        try:
            if self._pg.put_copy_end() != 1:
                return False
            while self._pg.flush() == 1:
                await self._wait_writable()
            while True:
                self._pg.consume_input()
                nbytes, _ = self._pg.get_copy_data(1)
                if nbytes == -1:
                    return True
                left = deadline - time.monotonic()
                if nbytes == 0 and (left <= 0 or not await self._wait_readable(left)):
                    return False
        except psycopg.OperationalError:
            return False

    async def close(self) -> None:
        """Close the connection; the walsender releases the slot."""
        with contextlib.suppress(Exception):
            await self._conn.close()
