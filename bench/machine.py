"""Facts about the machine and the software measured, recorded with every run."""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import aiormq
import psutil
import psycopg

import cdc
from bench.nodetool import amqplib_version, node_version


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _git(directory: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def speed_probe_ms(repeats: int = 5) -> float:
    """Milliseconds a fixed piece of work takes (pure-Python dict and string operations, then
    SHA-256 over 4 MB), the best of ``repeats``; lower is faster.

    The host is a shared virtual machine whose speed drifts by up to 2x over hours: the same
    code's figures move with it. Probed while nothing else of the run is running, it tells
    whether two runs' figures differ because the code did or because the host did."""
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        counts: dict[int, int] = {}
        width = 0
        for i in range(200_000):
            counts[i & 1023] = counts.get(i & 1023, 0) + i
            width += len(str(i))
        hashlib.sha256(b"x" * 4_000_000).digest()
        best = min(best, time.perf_counter() - began)
    return round(best * 1000, 1)


def relay_commit() -> dict[str, Any]:
    """The commit of the installed relay package, and whether ``cdc/`` has local changes."""
    package = Path(cdc.__file__).resolve().parent
    commit = _git(package, "rev-parse", "HEAD")
    dirty = _git(package, "status", "--porcelain", "--", ".")
    branch = _git(package, "rev-parse", "--abbrev-ref", "HEAD")
    return {
        "path": str(package),
        "commit": commit,
        "branch": branch,
        "dirty": bool(dirty) if dirty is not None else None,
    }


async def facts(db_url: str, amqp_url: str) -> dict[str, Any]:
    """CPU model, cores, RAM, PostgreSQL/RabbitMQ/Python/Node versions, relay commit."""
    async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as db:
        cur = await db.execute("SHOW server_version")
        row = await cur.fetchone()
        pg_version = str(row[0]) if row else "unknown"
        cur = await db.execute("SHOW synchronous_commit")
        row = await cur.fetchone()
        sync_commit = str(row[0]) if row else "unknown"
    conn = await aiormq.connect(amqp_url)
    try:
        properties = conn.server_properties or {}
        version = properties.get("version", b"unknown")
        rabbit_version = version.decode() if isinstance(version, bytes) else str(version)
    finally:
        await conn.close()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "postgresql": pg_version,
        "postgresql_synchronous_commit": sync_commit,
        "rabbitmq": rabbit_version,
        "python": platform.python_version(),
        "node": node_version(),
        "amqplib": amqplib_version(),
        "relay": relay_commit(),
    }
