"""The webhook transport: pooled keep-alive HTTP/1.1 connections, bounded per endpoint.

``http1`` does the bytes; an ``asyncio.Protocol`` per connection carries one request at a
time (a small POST whose answer needs only its status and end). :class:`WebhookPool` keeps
connections open per endpoint (``scheme://host:port``, idle ones for :data:`KEEPALIVE` s)
and lets at most ``per_endpoint`` requests run on an endpoint at once (the rest wait for a
slot, within their timeout), so a slow endpoint holds only its own slots. Once draining,
requests still waiting for a slot are not sent (``Retry``) and those in flight finish. A
host name is looked up when a connection opens: every address is checked (``targets``) and
the connection goes to the checked one, the only lookup (no second resolution, no HTTP
proxy). TLS verifies the certificate for the URL's host. A request on a reused connection
that the server had closed while idle goes once more on a new connection.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import cast

from consumers.errors import Retry
from consumers.notifications import http1, targets
from consumers.notifications.breaker import Breaker

#: ``(host, port) -> addresses``: the one DNS lookup of a webhook host (tests replace it).
Lookup = Callable[[str, int], Awaitable[list[str]]]


async def system_lookup(host: str, port: int) -> list[str]:
    """The system resolver's addresses for ``host`` (each once, in its order)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class _Stale(ConnectionError):
    """A reused connection closed before any byte of the answer: the server had closed it
    while idle, so the request can go again on a new connection."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an endpoint, one request at a time (``http1``)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._reader: http1.ResponseReader | None = None
        self._answer: asyncio.Future[http1.Response] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        reader, answer = self._reader, self._answer
        if reader is None or answer is None or answer.done():
            self.abort()  # bytes no request of ours asked for
            return
        try:
            response = reader.feed(data)
        except http1.ProtocolError as exc:
            answer.set_exception(exc)
            self.abort()
            return
        if response is not None:
            self._reader = None
            answer.set_result(response)

    def eof_received(self) -> bool:
        return False  # close our side too: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        reader, answer = self._reader, self._answer
        self._reader = None
        if reader is None or answer is None or answer.done():
            return
        response = reader.eof()
        if response is not None:
            answer.set_result(response)
        elif self.reused and not reader.started:
            answer.set_exception(_Stale("the server closed the idle connection"))
        else:
            answer.set_exception(
                exc or ConnectionResetError("the server closed the connection mid-answer")
            )

    async def exchange(self, data: bytes) -> http1.Response:
        """Send one request and read its answer."""
        assert self.transport is not None
        self._reader = http1.ResponseReader()
        self._answer = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self._answer

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


@dataclass(frozen=True, slots=True)
class CheckedTarget:
    """A webhook URL once checked: where to connect, its endpoint, its request head."""

    target: targets.WebhookTarget
    endpoint: str
    head: bytes
    ip: bool


#: Seconds an idle connection is kept for the next request (servers close theirs after
#: 5-75 s; reusing one that the server is closing costs a stale retry).
KEEPALIVE = 15.0
_TLS = ssl.create_default_context()


class WebhookPool:
    """Per-endpoint slots and idle keep-alive connections (module doc).

    Created in the worker's event loop; :meth:`close` releases the connections.
    """

    def __init__(
        self,
        policy: targets.TargetPolicy,
        per_endpoint: int,
        breaker: Breaker,
        lookup: Lookup,
        clock: Callable[[], float],
    ) -> None:
        self._policy = policy
        self._per_endpoint = per_endpoint
        self._breaker = breaker
        self._lookup = lookup
        self._clock = clock
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._idle: dict[str, list[_Connection]] = {}
        self._swept = 0.0
        self._closed = False
        self._draining = asyncio.Event()

    def drain(self) -> None:
        """The worker is stopping: requests still waiting for a slot are not sent
        (``Retry``); those in flight finish."""
        self._draining.set()

    async def slot(self, endpoint: str, timeout: float) -> asyncio.Semaphore:
        """One of the endpoint's slots, within ``timeout``; a timeout counts as a failure.
        The caller releases it."""
        slots = self._slots.get(endpoint)
        if slots is None:
            if len(self._slots) >= 10_000:  # forget idle endpoints (one semaphore each)
                full = self._per_endpoint  # a semaphore with every permit back is idle
                self._slots = {e: v for e, v in self._slots.items() if v._value < full}
            slots = self._slots[endpoint] = asyncio.Semaphore(self._per_endpoint)
        if not slots.locked() and not self._draining.is_set():
            await slots.acquire()
            return slots
        acquire = asyncio.ensure_future(slots.acquire())
        draining = asyncio.ensure_future(self._draining.wait())
        try:
            await asyncio.wait(
                (acquire, draining), timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except BaseException:  # cancelled: a permit got meanwhile must go back
            draining.cancel()
            acquire.cancel()
            if acquire.done() and not acquire.cancelled():
                slots.release()
            raise
        draining.cancel()
        acquire.cancel()
        got = acquire.done() and not acquire.cancelled()
        if got and not self._draining.is_set():
            return slots
        if got:
            slots.release()
        if self._draining.is_set():
            raise Retry(f"webhook {endpoint} not sent: the worker is stopping")
        self._breaker.failed(endpoint, self._clock())
        raise Retry(f"webhook {endpoint}: no free connection within {timeout:g}s")

    async def exchange(self, known: CheckedTarget, data: bytes) -> int:
        """The answer's status to ``data``, on an idle connection or a new one."""
        idle = self._idle.get(known.endpoint, [])
        conn = None
        while idle:
            candidate = idle.pop()
            if not candidate.closed:
                conn = candidate
                break
        if conn is None:
            conn = await self._connect(known)
        try:
            try:
                response = await conn.exchange(data)
            except _Stale:
                conn = await self._connect(known)
                response = await conn.exchange(data)
        except BaseException:
            conn.abort()
            raise
        if response.reusable and not conn.closed and not self._closed:
            conn.idle_since = self._clock()
            conn.reused = True
            # Looked up again: a sweep during the exchange may have dropped the list.
            self._idle.setdefault(known.endpoint, []).append(conn)
        else:
            conn.abort()
        return response.status

    async def _connect(self, known: CheckedTarget) -> _Connection:
        """A new connection to the checked address of ``known``'s host (one lookup, every
        answer checked; an IP literal was checked already)."""
        target = known.target
        if known.ip:
            address = target.host
        else:
            found = await self._lookup(target.host, target.port)
            address = targets.checked_address(target, found, self._policy)
        tls = target.scheme == "https"
        _, conn = await asyncio.get_running_loop().create_connection(
            _Connection,
            address,
            target.port,
            ssl=_TLS if tls else None,
            # The certificate is verified for the URL's host (SNI too, unless an IP).
            server_hostname=target.host if tls else None,
        )
        return conn

    def sweep(self, now: float) -> None:
        """Close connections idle longer than :data:`KEEPALIVE` (at most every 5 s)."""
        if now - self._swept <= 5.0:
            return
        self._swept = now
        for endpoint, idle in list(self._idle.items()):
            keep = [c for c in idle if not c.closed and now - c.idle_since < KEEPALIVE]
            for conn in idle:
                if conn not in keep:
                    conn.abort()
            if keep:
                self._idle[endpoint] = keep
            else:
                del self._idle[endpoint]

    async def close(self) -> None:
        """Close the pooled connections."""
        self._closed = True
        idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                if conn.transport is not None and not conn.closed:
                    conn.closed = True
                    conn.transport.close()
