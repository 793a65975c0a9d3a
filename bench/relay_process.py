"""The relay under test, driven as a black box through its console script.

``cdc setup`` and ``cdc relay`` run from the same environment as the harness (so whatever
relay is installed there is what gets measured), configured only by ``CDC_*`` variables,
observed through ``/healthz`` and ``/metrics``. Its output goes to a log file in the run's
results folder. ``stop()`` sends SIGTERM (the relay drains), then SIGKILL if it lingers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO

import psycopg

from bench.env import Names, Run, drop_slot, drop_table
from bench.observe import fetch_text

CDC = str(Path(sys.executable).with_name("cdc"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayError(RuntimeError):
    """The relay could not be set up or did not start; the message points at its log."""


class RelayProcess:
    """One ``cdc relay`` process for one scenario's table, slot and exchange."""

    def __init__(self, run: Run, names: Names, label: str, **overrides: str) -> None:
        self.run = run
        self.names = names
        self.port = free_port()
        self.log_path = run.results_dir / f"relay-{label}.log"
        self.env = {
            **os.environ,
            "CDC_DATABASE_URL": run.db_url,
            "CDC_AMQP_URL": run.amqp_url,
            "CDC_SLOT_NAME": names.slot,
            "CDC_PUBLICATION_NAME": names.publication,
            "CDC_OUTBOX_TABLE": f"public.{names.table}",
            "CDC_EXCHANGE": names.exchange,
            "CDC_PARKING_QUEUE": names.parking,
            "CDC_METRICS_PORT": str(self.port),
            "CDC_METRICS_HOST": "127.0.0.1",
            "CDC_LOG_LEVEL": "WARNING",
            **overrides,
        }
        self.extra: dict[str, str] = {}  # on top of ``env`` for `cdc relay` (bench.pipeline_at)
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    async def setup(self, timeout: float = 300.0) -> None:
        """``cdc setup``: table, publication, slot (the slot must exist before the backlog).

        Creating a logical slot waits until every transaction open at that moment, in any
        database, has ended; on a busy shared server that can take a while, so the wait is
        bounded and a timeout names the transactions in the way.
        """
        with self.log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(
                CDC, "setup", env=self.env, stdout=log, stderr=log
            )
            try:
                code = await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise RelayError(
                    f"cdc setup did not finish in {timeout:.0f}s: slot creation waits for "
                    f"open transactions; oldest: {await _oldest_transactions(self.run)}"
                ) from None
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        if code != 0:
            raise RelayError(f"cdc setup exited {code}; see {self.log_path}")

    async def start(self, timeout: float = 60.0) -> None:
        """Start ``cdc relay`` and wait until ``/healthz`` says it is streaming."""
        self._log = self.log_path.open("ab")
        self.proc = await asyncio.create_subprocess_exec(
            CDC, "relay", env={**self.env, **self.extra}, stdout=self._log, stderr=self._log,
            start_new_session=True,  # Ctrl-C reaches the harness only; it stops the relay
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.returncode is not None:
                raise RelayError(f"cdc relay exited {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError, ValueError):
                health = json.loads(await fetch_text(self.url("/healthz"), timeout=1.0))
                if health.get("state") == "streaming":
                    return
            await asyncio.sleep(0.1)
        raise RelayError(f"cdc relay not streaming after {timeout:.0f}s; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    async def metrics(self) -> str:
        return await fetch_text(self.url("/metrics"))

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Returns the exit code."""
        proc, self.proc = self.proc, None
        try:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), timeout)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    await proc.wait()
            return proc.returncode if proc is not None else None
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None


async def _oldest_transactions(run: Run) -> str:
    async with await psycopg.AsyncConnection.connect(run.admin_url, autocommit=True) as db:
        cur = await db.execute(
            "SELECT pid, datname, now() - xact_start, left(query, 60) FROM pg_stat_activity"
            " WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid()"
            " ORDER BY xact_start LIMIT 3"
        )
        rows = await cur.fetchall()
    return "; ".join(f"pid {pid} in {db_name} for {age}: {query!r}"
                     for pid, db_name, age, query in rows) or "none now"


@contextlib.asynccontextmanager
async def relay_scenario(
    run: Run, label: str, *, max_length: int | None = None, **overrides: str
) -> AsyncIterator[RelayProcess]:
    """A scenario's sink queue, outbox table, publication and slot (``cdc setup``), and a
    relay process ready to start; all removed at the end, even on failure or cancellation."""
    names = run.names(label)
    await run.declare_sink(names, max_length=max_length)
    relay = RelayProcess(run, names, label, **overrides)
    try:
        await relay.setup()
        yield relay
    finally:
        await relay.stop()
        with contextlib.suppress(Exception):
            await drop_slot(run.admin_url, names.slot)
        with contextlib.suppress(Exception):
            await drop_table(run.db_url, names.table)
        with contextlib.suppress(Exception):
            await run.delete_sink(names)
