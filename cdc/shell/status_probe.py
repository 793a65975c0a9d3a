"""Reads what `cdc status` shows from the processes around the slot (the I/O side of
:mod:`cdc.core.status_report`).

- the relay's and the workers' ``/metrics`` and ``/healthz`` over HTTP, all at once, each
  with a short timeout: an endpoint that does not answer is reported as such, never as 0;
- the depth of the relay's parking queue from the broker, when ``CDC_AMQP_URL`` is set
  (a passive declare: nothing is created).
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiormq
import orjson
import psycopg

from cdc.config import RelaySettings
from cdc.core import status_report as report
from cdc.errors import SourceError
from cdc.service.logs import redact
from cdc.shell import slot as slots

#: Seconds each endpoint may take; a status screen must not hang on one dead process.
TIMEOUT = 2.0
#: Seconds each of the status queries may take on PostgreSQL (its statement_timeout).
STATEMENT_TIMEOUT = 5.0
#: Seconds a round of `cdc status --watch` may take before it is abandoned: more than the
#: scrapes, the broker's and PostgreSQL's own bounds (connect_timeout 10 s) add up to.
ROUND_BOUND = 30.0


def default_relay_url(settings: RelaySettings) -> str | None:
    """``http://127.0.0.1:<CDC_METRICS_PORT>/metrics``; None when the port is 0 (disabled)."""
    if not settings.metrics_port:
        return None
    return f"http://127.0.0.1:{settings.metrics_port}/metrics"


def health_url(metrics_url: str) -> str:
    """The ``/healthz`` beside a ``/metrics`` URL (same scheme, host and port)."""
    parts = urlsplit(metrics_url)
    return urlunsplit((parts.scheme, parts.netloc, "/healthz", "", ""))


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:  # scheme checked by scrape()
        body: bytes = response.read()
        return body


def _why(exc: Exception) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        exc = exc.reason if isinstance(exc.reason, Exception) else exc
    if isinstance(exc, OSError) and exc.strerror:
        return redact(exc.strerror.lower())
    return redact(str(exc) or type(exc).__name__)


def scrape(url: str) -> report.Scrape:
    """Read ``url`` (``/metrics``) and the ``/healthz`` beside it; failures become ``error``."""
    if urlsplit(url).scheme not in ("http", "https"):
        return report.Scrape(url, error="not an http:// or https:// URL")
    try:
        metrics = _get(url).decode("utf-8", "replace")
    except (OSError, ValueError) as exc:
        return report.Scrape(url, error=_why(exc))
    try:
        health: Any = orjson.loads(_get(health_url(url)))
    except (OSError, ValueError):
        health = None  # an older process or a proxy that passes /metrics only: use the gauges
    return report.Scrape(url, metrics, health if isinstance(health, dict) else None)


async def _depths(url: str, queues: list[str]) -> dict[str, int | None]:
    # one bound for the whole conversation (a broker may stall after the connect); and
    # asyncio.timeout, not wait_for, which on 3.11 can swallow a cancellation
    async with asyncio.timeout(TIMEOUT * 2):
        return await _ask_depths(url, queues)


async def _ask_depths(url: str, queues: list[str]) -> dict[str, int | None]:
    connection = await aiormq.connect(url)
    found: dict[str, int | None] = {}
    try:
        for queue in queues:
            # A missing queue closes the channel: ask each on a fresh one.
            channel = await connection.channel()
            try:
                ok = await channel.queue_declare(queue, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                found[queue] = None
                continue
            found[queue] = int(ok.message_count or 0)
            await channel.close()
    finally:
        await connection.close()
    return found


def depths(settings: RelaySettings, queues: list[str]) -> report.Depths:
    """How many messages wait in ``queues`` (passive declares: nothing is created)."""
    if settings.amqp_url is None:
        return report.Depths()
    try:
        return report.Depths(asyncio.run(_depths(settings.broker_url(), queues)), asked=True)
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
        return report.Depths(asked=True, error=f"broker: {_why(exc)}")


def _database_side(settings: RelaySettings, standby_urls: list[str]) -> dict[str, Any]:
    """The slot's status and the failover readiness of the standbys."""
    from cdc.shell.standbys import failover_status

    with slots.connect(settings) as conn:
        try:
            # set_config, not SET: a utility statement takes no bound parameter
            conn.execute("SELECT set_config('statement_timeout', %s, false)",
                         (f"{round(STATEMENT_TIMEOUT * 1000)}ms",))
            slot = slots.status(conn, settings).as_dict()
            return slot | {"failover": failover_status(conn, settings, standby_urls)}
        except psycopg.OperationalError as exc:  # a timeout or a lost connection
            raise SourceError(f"PostgreSQL stopped answering: {exc}".strip()) from exc


def gather(
    settings: RelaySettings,
    relay_url: str | None,
    worker_urls: list[str],
    standby_urls: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything `cdc status` shows, as the JSON document of :func:`status_report.build`."""
    relay_url = relay_url or default_relay_url(settings)
    note = None if relay_url else "CDC_METRICS_PORT is 0: the relay serves no metrics"
    urls = ([relay_url] if relay_url else []) + worker_urls
    with ThreadPoolExecutor(max_workers=max(len(urls), 1)) as pool:
        scrapes = pool.map(scrape, urls)
        # PostgreSQL in this thread, beside the scrapes: a watch abandons a round in its
        # own daemon thread, and the exit waits only for pool threads (the scrapes, bounded)
        database = _database_side(settings, list(standby_urls))
        found = list(scrapes)
        relay = found.pop(0) if relay_url else None
        # the workers' queues are named in their metrics: ask the broker once for all
        queues = [settings.parking_queue] + [
            q for w in found for q in report.worker_view(w)["queues"]
        ]
        waiting = depths(settings, queues)
        return report.build(
            database, relay, found, settings.parking_queue, waiting, note
        )
