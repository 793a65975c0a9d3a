"""Instruments that watch without taking part: queue depth, a process's CPU and RSS, /metrics.

Each sampler is an asyncio task started with ``start()`` and ended with ``stop()``; their
samples are plain ``(monotonic_seconds, value)`` pairs for :mod:`bench.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import time
import urllib.request
from pathlib import Path

import aiormq
import psutil
import psycopg


class DepthSampler:
    """Samples a queue's message count (passive declare) every ``interval`` seconds.

    Cheap for the broker and adds no consumer, so a drain is measured exactly as the broker
    ceiling is: publishes landing in a queue nobody reads.
    """

    def __init__(self, amqp_url: str, queue: str, interval: float = 0.05) -> None:
        self.amqp_url = amqp_url
        self.queue = queue
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None
        self._conn: aiormq.abc.AbstractConnection | None = None
        self._stopping = False

    async def start(self) -> None:
        self._conn = await aiormq.connect(self.amqp_url)
        channel = await self._conn.channel()
        self._task = asyncio.create_task(self._loop(channel))

    async def _loop(self, channel: aiormq.abc.AbstractChannel) -> None:
        while not self._stopping:
            declared = await channel.queue_declare(self.queue, passive=True)
            self.samples.append((time.monotonic(), int(declared.message_count or 0)))
            await asyncio.sleep(self.interval)

    async def wait_for(self, target: int, timeout: float, stall: float = 60.0) -> bool:
        """Wait until the depth reaches ``target``; give up after ``timeout`` s, or ``stall``
        s without progress. Returns whether ``target`` was reached."""
        deadline = time.monotonic() + timeout
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            if self._task is not None and self._task.done():
                self._task.result()  # re-raise a broken sampler
            count = self.samples[-1][1] if self.samples else 0
            if count >= target:
                return True
            if count != last_count:
                last_count, last_change = count, time.monotonic()
            elif time.monotonic() - last_change > stall:
                return False
            await asyncio.sleep(self.interval)
        return False

    @property
    def depth(self) -> int:
        return self.samples[-1][1] if self.samples else 0

    async def stop(self) -> None:
        # Let the loop finish its declare rather than cancel it: a cancelled RPC makes
        # aiormq close the channel and log about it.
        self._stopping = True
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=5)
            except (TimeoutError, Exception):
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()


class ProcessSampler:
    """RSS every ``interval`` s and CPU seconds on demand, for one pid (psutil)."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.process = psutil.Process(pid)
        self.interval = interval
        self.rss: list[tuple[float, int]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        with contextlib.suppress(psutil.Error):
            while True:
                self.rss.append((time.monotonic(), self.process.memory_info().rss))
                await asyncio.sleep(self.interval)

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the process has used so far (0 once it is gone)."""
        try:
            times = self.process.cpu_times()
        except psutil.Error:
            return 0.0
        return float(times.user + times.system)

    def rss_between(self, start: float, end: float) -> list[int]:
        return [value for when, value in self.rss if start <= when <= end]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class CpuWindow:
    """CPU share of a process over a wall-clock window (1.0 = one core busy)."""

    def __init__(self, sampler: ProcessSampler) -> None:
        self.sampler = sampler
        self.started = time.monotonic()
        self.cpu_start = sampler.cpu_seconds()

    def share(self) -> float:
        wall = time.monotonic() - self.started
        return (self.sampler.cpu_seconds() - self.cpu_start) / wall if wall > 0 else 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0 once it is gone)."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


def broker_pids(port: int = 5672) -> list[int]:
    """The RabbitMQ node listening on ``port`` in this network namespace.

    Found by the listening socket, not by scanning nodes' own sockets: a broker in a
    container also listens on 5672 inside its namespace, and it is not the one measured.
    """
    pids = sorted({
        c.pid for c in psutil.net_connections(kind="tcp")
        if c.pid and c.status == psutil.CONN_LISTEN and c.laddr.port == port
    })
    return pids or [p.pid for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]


async def walsender_pids(admin_url: str, db_name: str) -> list[int]:
    """The walsenders streaming the slots of ``db_name`` now: their process titles do not
    name the database, so they are found through the slots."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as db:
        cur = await db.execute(
            "SELECT active_pid FROM pg_replication_slots"
            " WHERE database = %s AND active_pid IS NOT NULL", (db_name,),
        )
        return [int(pid) for (pid,) in await cur.fetchall()]


def postgres_cpu(db_name: str, walsenders: list[int]) -> float:
    """CPU seconds of the PostgreSQL backends serving ``db_name`` now: ``walsenders`` (see
    :func:`walsender_pids`) and the sessions whose title names the database (the workers';
    the server's other databases are not counted, nor the writers' sessions, which end with
    their level: the business transactions)."""
    total = sum(cpu_seconds(pid) for pid in walsenders)
    for proc in psutil.process_iter(["name", "cmdline"]):
        if proc.info["name"] == "postgres" and db_name in " ".join(proc.info["cmdline"] or ()):
            total += cpu_seconds(proc.pid)
    return total


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has spent busy so far (not idle, not iowait):
    on a shared machine, what everyone else ran beside the measured processes shows here."""
    t = psutil.cpu_times()
    # guest time is already inside user on Linux, so it is not added again.
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0)
                 + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0))


class Profiler:
    """``py-spy record`` of one process (raw collapsed stacks), when ``BENCH_PROFILE`` is set.

    Used to see where the relay's time goes during a drain; py-spy samples from outside
    (``--nonblocking``: the process is never paused), so the figures measured beside it
    barely move. Without ``BENCH_PROFILE`` or py-spy this does nothing.
    """

    def __init__(self, pid: int, out: Path) -> None:
        self.pid, self.out = pid, out
        self.proc: asyncio.subprocess.Process | None = None
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.spy = spy if os.environ.get("BENCH_PROFILE") and Path(spy).exists() else None

    async def start(self) -> None:
        if self.spy is None:
            return
        self.proc = await asyncio.create_subprocess_exec(
            self.spy, "record", "--pid", str(self.pid), "--rate", "200", "--format", "raw",
            "--nonblocking", "-o", str(self.out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )

    async def stop(self) -> None:
        """Stop sampling; py-spy writes its file on SIGINT."""
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.proc.wait(), 30)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def mib(values: list[int]) -> float | None:
    """Largest of ``values`` (bytes) in MiB, rounded; ``None`` when there are none."""
    return round(max(values) / 2**20, 1) if values else None


async def fetch_text(url: str, timeout: float = 5.0) -> str:
    """GET ``url`` and return its body (for /metrics and /healthz), off the event loop."""

    def get() -> str:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)
