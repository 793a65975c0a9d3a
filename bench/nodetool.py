"""Python side of the Node instruments in ``bench/amqp_tool.js`` (amqplib from npm).

``ensure_node()`` installs the locked npm dependencies on first use (``npm ci``);
``ceiling_publish`` runs the reference publisher; :class:`NodeConsumer` records arrivals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
TOOL = BENCH_DIR / "amqp_tool.js"


class NodeError(RuntimeError):
    """Node or its amqplib is missing or failed; the message says what to do."""


def node_version() -> str | None:
    import subprocess

    node = shutil.which("node")
    if node is None:
        return None
    return subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()


def amqplib_version() -> str | None:
    package = BENCH_DIR / "node_modules" / "amqplib" / "package.json"
    if not package.exists():
        return None
    return str(json.loads(package.read_text())["version"])


async def ensure_node() -> None:
    """Make sure ``node`` and the locked ``amqplib`` are there (``npm ci`` if needed)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        raise NodeError("node and npm are needed for the instruments (apt-get install nodejs npm)")
    if amqplib_version() is not None:
        return
    proc = await asyncio.create_subprocess_exec(
        "npm", "ci", "--no-audit", "--no-fund", cwd=BENCH_DIR,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise NodeError(f"npm ci in {BENCH_DIR} failed:\n{out.decode()[-2000:]}")


async def ceiling_publish(
    url: str, exchange: str, routing_key: str, *, count: int, size: int, window: int,
    routing_keys: list[str] | None = None, rate: float | None = None, burst: int = 1,
) -> dict[str, Any]:
    """Run the reference publisher; returns its ``{published, nacked, seconds, rate}``.
    ``routing_keys``: message i goes with ``routing_keys[i % len]`` (a mix of events);
    ``rate``: paced at that many messages per second instead of flat out, in groups of
    ``burst`` back to back."""
    options: dict[str, Any] = {"url": url, "exchange": exchange, "routingKey": routing_key,
                               "count": count, "size": size, "window": window}
    if routing_keys:
        options["routingKeys"] = routing_keys
    if rate:
        options["rate"], options["burst"] = rate, burst
    proc = await asyncio.create_subprocess_exec(
        "node", str(TOOL), "publish", json.dumps(options),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise NodeError(f"reference publisher failed: {err.decode()[-2000:]}")
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


class NodeConsumer:
    """Auto-ack consumer of one queue that records ``(arrival, commit_time, created_at)``."""

    def __init__(self, url: str, queue: str, out: Path) -> None:
        self.url = url
        self.queue = queue
        self.out = out
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        options = {"url": self.url, "queue": self.queue, "out": str(self.out)}
        self.proc = await asyncio.create_subprocess_exec(
            "node", str(TOOL), "consume", json.dumps(options),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=30)
        if line.strip() != b"ready":
            err = b""
            if self.proc.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    err = await asyncio.wait_for(self.proc.stderr.read(), timeout=5)
            await self.kill()
            raise NodeError(f"latency consumer did not start: {err.decode()[-2000:]}")

    async def stop(self) -> list[tuple[float, str, str]]:
        """Stop consuming and return the arrivals (epoch seconds) with their headers."""
        if self.proc is None:
            return []
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        rows: list[tuple[float, str, str]] = []
        if self.out.exists():
            for line in self.out.read_text().splitlines():
                arrival, commit_time, created_at = line.split("\t")
                rows.append((float(arrival) / 1000.0, commit_time, created_at))
        return rows

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        self.proc = None


class AckConsumer:
    """Trivial consumers (manual ack of every delivery, or one multiple ack per ``batch``)
    on ``queues``, in one Node process."""

    def __init__(self, url: str, queues: list[str], prefetch: int = 500, batch: int = 1) -> None:
        self.options = {"url": url, "queues": queues, "prefetch": prefetch, "batch": batch}
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "node", str(TOOL), "ack", json.dumps(self.options),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=30)
        if line.strip() != b"ready":
            await self.stop()
            raise NodeError("ack consumers did not start")

    async def stop(self) -> int:
        """Stop; how many deliveries were acked."""
        if self.proc is None:
            return 0
        proc, self.proc = self.proc, None
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            return 0
        with contextlib.suppress(ValueError, IndexError):
            return int(json.loads(out.decode().strip().splitlines()[-1])["acked"])
        return 0
