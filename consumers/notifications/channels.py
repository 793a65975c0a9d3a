"""The external channels: signed webhook POSTs (asyncio, pooled connections) and SMTP email
(a small pool of connections, each send in a thread).

Contract: :meth:`WebhookClient.post` and :meth:`SmtpPool.send` return when the receiver
accepted the notification and raise :class:`~consumers.errors.Retry` on anything transient
(timeout, refused connection, a non-2xx answer, a temporary SMTP error, an endpoint whose
breaker is open) so the runtime tries again after its backoff delay; a refused target or a
recipient the SMTP server refuses for good is a :class:`~consumers.errors.PermanentError`.
Both carry the delivery's idempotency key (``Idempotency-Key`` header; ``Message-ID`` and
``X-Idempotency-Key`` in the email), the same on every attempt. Redirects are not followed:
a POST must not turn into a GET.

Webhooks: one HTTP/1.1 client per worker (``http1`` for the bytes, an ``asyncio.Protocol``
per connection: the request is a small POST and the answer needs only its status and end)
keeps connections open per endpoint (``scheme://host:port``, idle ones for
:data:`KEEPALIVE` s) and runs at most ``CDC_WEBHOOK_CONCURRENCY`` requests per endpoint at
once (the rest wait for a slot, within their timeout), so a slow endpoint holds only its own
slots. When the worker stops (:meth:`WebhookClient.drain`), requests still waiting for a
slot are not sent (``Retry``) and those in flight finish. A host name is looked up when a
connection opens: every address is checked (``targets``) and the connection goes to the
checked one, the only lookup (no second resolution, no HTTP proxy); an IP literal is checked
before the request. TLS verifies the certificate for the URL's host. A request on a reused
connection that the server had closed while idle goes once more on a new connection (the
same idempotency key). ``breaker`` stops waiting on an endpoint that keeps failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import smtplib
import socket
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import cast

from consumers.errors import PermanentError, Retry
from consumers.notifications import http1, targets
from consumers.notifications.breaker import Breaker
from consumers.notifications.signing import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign

#: ``(host, port) -> addresses``: the one DNS lookup of a webhook host (tests replace it).
Lookup = Callable[[str, int], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    body: bytes
    idempotency_key: str
    event_type: str
    message_id: str


async def _system_lookup(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _where(url: str) -> str:
    # Webhook URLs often carry a token in the path or query: errors (which end up in logs
    # and parking headers) name the scheme and host only.
    try:
        parts = urllib.parse.urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}".rstrip(":")
    except ValueError:
        return "(unparsable URL)"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


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
class _Target:
    """A webhook URL once checked: where to connect, its endpoint, its request head."""

    target: targets.WebhookTarget
    endpoint: str
    head: bytes
    ip: bool


#: Seconds an idle connection is kept for the next request (servers close theirs after
#: 5-75 s; reusing one that the server is closing costs a stale retry).
KEEPALIVE = 15.0
_USER_AGENT = "outbox-cdc-notifications"


class WebhookClient:
    """Signed POSTs over pooled keep-alive connections, bounded per endpoint (module doc).

    Created in the worker's event loop; :meth:`close` releases the connections.
    """

    def __init__(
        self,
        secret: bytes,
        timeout: float,
        policy: targets.TargetPolicy,
        *,
        per_endpoint: int = 32,
        breaker: Breaker | None = None,
        lookup: Lookup = _system_lookup,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secret = secret
        self._timeout = timeout
        self._policy = policy
        self._per_endpoint = per_endpoint
        self._breaker = breaker or Breaker(0, 0.0)
        self._lookup = lookup
        self._clock = clock
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._targets: dict[str, _Target] = {}
        self._idle: dict[str, list[_Connection]] = {}
        self._swept = 0.0
        self._closed = False
        self._draining = asyncio.Event()

    def _target(self, url: str) -> _Target:
        """``url`` checked (its form, an IP literal's address) and split; the answer for a
        URL is kept (the policy does not change while the worker runs)."""
        known = self._targets.get(url)
        if known is None:
            target = targets.webhook_target(url, self._policy)
            ip = _is_ip(target.host)
            if ip:
                # No lookup will check an IP literal: check it here.
                targets.checked_address(target, [target.host], self._policy)
            default = 443 if target.scheme == "https" else 80
            try:
                head = http1.request_head(
                    target.host, target.port, default, target.path, _USER_AGENT
                )
            except ValueError as exc:
                raise PermanentError(f"webhook {target.where()} refused: {exc}") from exc
            if len(self._targets) > 100_000:
                self._targets.clear()
            known = self._targets[url] = _Target(target, target.where(), head, ip)
        return known

    def drain(self) -> None:
        """The worker is stopping: POSTs still waiting for a slot are not sent (``Retry``);
        those in flight finish."""
        self._draining.set()

    async def _slot(self, endpoint: str, timeout: float) -> asyncio.Semaphore:
        """One of the endpoint's slots, within ``timeout``; a timeout counts as a failure."""
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

    async def post(self, hook: Webhook) -> None:
        """POST the signed body to the checked target; a 2xx answer is a delivery, a refused
        target a :class:`PermanentError`, anything else a :class:`Retry`."""
        known = self._target(hook.url)
        endpoint = known.endpoint
        now = self._clock()
        wait = self._breaker.admit(endpoint, now)
        if wait is not None:
            raise Retry(
                f"webhook {endpoint} keeps failing: not tried for another {wait:.0f}s "
                "(CDC_WEBHOOK_BREAKER_FAILURES, CDC_WEBHOOK_BREAKER_SECONDS)",
                after=wait,
            )
        try:
            data = http1.request(
                known.head,
                [
                    (SIGNATURE_HEADER, sign(self._secret, hook.body)),
                    (IDEMPOTENCY_HEADER, hook.idempotency_key),
                    ("X-CDC-Event-Type", hook.event_type),
                    ("X-CDC-Message-Id", hook.message_id),
                ],
                hook.body,
            )
        except ValueError as exc:  # no resend can change the event's own fields
            raise PermanentError(f"webhook {endpoint} not sent: {exc}") from exc
        if now - self._swept > 5.0:
            self._sweep(now)
        slots = await self._slot(endpoint, self._timeout)
        try:
            left = max(self._timeout - (self._clock() - now), 0.001)
            async with asyncio.timeout(left):
                status = await self._exchange(known, data)
        except (OSError, TimeoutError, http1.ProtocolError) as exc:
            self._breaker.failed(endpoint, self._clock())
            raise Retry(
                f"webhook {_where(hook.url)} unreachable: {_describe(exc, left)}"
            ) from exc
        except BaseException:
            self._breaker.abandoned(endpoint)
            raise
        finally:
            slots.release()
        self._breaker.succeeded(endpoint)
        if not 200 <= status < 300:
            raise Retry(f"webhook {_where(hook.url)} answered {status}")

    async def _exchange(self, known: _Target, data: bytes) -> int:
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

    async def _connect(self, known: _Target) -> _Connection:
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

    def _sweep(self, now: float) -> None:
        """Close connections idle longer than :data:`KEEPALIVE`."""
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


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"TimeoutError: no answer within {timeout:.3g}s"
    return f"{type(exc).__name__}: {exc}"


_TLS = ssl.create_default_context()


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    sender: str
    timeout: float
    starttls: bool = False
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True, slots=True)
class Email:
    to: str
    subject: str
    text: str
    idempotency_key: str
    message_id: str
    event_type: str


def _message(mail: Email, config: SmtpConfig) -> EmailMessage:
    msg = EmailMessage()
    domain = config.sender.rpartition("@")[2] or "localhost"
    msg["From"] = config.sender
    msg["To"] = mail.to
    msg["Subject"] = mail.subject
    msg["Date"] = formatdate(usegmt=True)
    # Derived from the event, so a resend is recognisably the same email.
    msg["Message-ID"] = f"<{mail.idempotency_key}@{domain}>"
    msg["X-Idempotency-Key"] = mail.idempotency_key
    msg["X-CDC-Message-Id"] = mail.message_id
    msg["X-CDC-Event-Type"] = mail.event_type
    msg.set_content(mail.text)
    return msg


def _connect(config: SmtpConfig) -> smtplib.SMTP:
    smtp = smtplib.SMTP(config.host, config.port, timeout=config.timeout)
    try:
        if config.starttls:
            smtp.starttls()
        if config.username:
            smtp.login(config.username, config.password or "")
    except BaseException:
        with contextlib.suppress(Exception):
            smtp.close()
        raise
    return smtp


class SmtpPool:
    """Up to ``size`` SMTP connections kept open and reused, one send at a time on each
    (smtplib in a thread). A connection that fails is dropped; one the server closed while
    idle is replaced once, transparently."""

    def __init__(self, config: SmtpConfig, size: int = 4) -> None:
        self.config = config
        self._idle: list[smtplib.SMTP] = []
        self._slots = asyncio.Semaphore(size)
        self._draining = False

    def drain(self) -> None:
        """The worker is stopping: emails still waiting for a connection are not sent."""
        self._draining = True

    def _send(self, mail: Email, smtp: smtplib.SMTP | None) -> smtplib.SMTP:
        message = _message(mail, self.config)
        if smtp is not None:
            try:
                smtp.send_message(message)
                return smtp
            except smtplib.SMTPServerDisconnected:
                pass  # closed by the server while idle: a fresh connection below
            except BaseException:
                with contextlib.suppress(Exception):
                    smtp.close()
                raise
        smtp = _connect(self.config)
        try:
            smtp.send_message(message)
        except BaseException:
            with contextlib.suppress(Exception):
                smtp.close()
            raise
        return smtp

    async def send(self, mail: Email) -> None:
        """Hand the email to the SMTP server; transient failures are a :class:`Retry`."""
        async with self._slots:
            if self._draining:
                raise Retry(f"email to {mail.to} not sent: the worker is stopping")
            reused = self._idle.pop() if self._idle else None
            try:
                smtp = await asyncio.to_thread(self._send, mail, reused)
            except smtplib.SMTPRecipientsRefused as exc:
                codes = [code for code, _ in exc.recipients.values()]
                if codes and all(500 <= c < 600 for c in codes):
                    raise PermanentError(
                        f"the SMTP server refuses {mail.to}: {exc.recipients}"
                    ) from exc
                raise Retry(f"SMTP recipient {mail.to} refused for now: {exc.recipients}") from exc
            except (smtplib.SMTPException, OSError) as exc:
                raise Retry(f"SMTP {self.config.host}:{self.config.port} failed: {exc}") from exc
            self._idle.append(smtp)

    async def close(self) -> None:
        """QUIT every idle connection."""
        idle, self._idle = self._idle, []
        for smtp in idle:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(smtp.quit)

