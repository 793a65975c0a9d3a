"""The small HTTP endpoint of every outbox-cdc process: ``/metrics`` and ``/healthz``.

A few lines of asyncio rather than prometheus_client's threaded server, so that ``/healthz``
can report the process's live state from the event loop. The relay and the workers each
keep their metrics on a private registry (:func:`process_registry`) and serve it here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

import orjson
from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Gauge,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from cdc import __version__

log = logging.getLogger(__name__)


def process_registry(build_info: str, labels: dict[str, str] | None = None) -> CollectorRegistry:
    """A private registry with the ``process_*`` and ``python_info`` series of this process
    and ``<build_info>{version, ...labels} 1``: what every outbox-cdc process exports
    besides its own metrics. Private so that tests may build several in one process."""
    r = CollectorRegistry()
    r.register(PROCESS_COLLECTOR)
    r.register(PLATFORM_COLLECTOR)
    extra = labels or {}
    info = Gauge(build_info, "Version of outbox-cdc, always 1", ["version", *extra], registry=r)
    info.labels(version=__version__, **extra).set(1)
    return r


class Registered(Protocol):
    """Anything that keeps its metrics on ``registry`` (the relay's, a worker's)."""

    registry: CollectorRegistry


async def serve(
    host: str, port: int, metrics: Registered, health: Callable[[], dict[str, object]]
) -> asyncio.Server:
    """Start the HTTP endpoint; the caller closes the returned server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), timeout=5)
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path.startswith("/metrics"):
                body = generate_latest(metrics.registry)
                status, ctype = "200 OK", CONTENT_TYPE_LATEST
            elif path.startswith("/healthz"):
                status, ctype, body = "200 OK", "application/json", orjson.dumps(health())
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
            head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            writer.write(head.encode() + body)
            await writer.drain()
        except (OSError, TimeoutError, UnicodeDecodeError) as exc:
            log.debug("metrics request failed: %s", exc)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port)
