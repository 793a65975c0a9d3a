"""Instruments that watch without taking part: queue depth, a process's CPU and RSS, /metrics.

Each sampler is an asyncio task started with ``start()`` and ended with ``stop()``; their
samples are plain ``(monotonic_seconds, value)`` pairs for :mod:`bench.stats`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.request

import aiormq
import psutil


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


def mib(values: list[int]) -> float | None:
    """Largest of ``values`` (bytes) in MiB, rounded; ``None`` when there are none."""
    return round(max(values) / 2**20, 1) if values else None


async def fetch_text(url: str, timeout: float = 5.0) -> str:
    """GET ``url`` and return its body (for /metrics and /healthz), off the event loop."""

    def get() -> str:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)
