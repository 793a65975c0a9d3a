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

Webhooks: one HTTP client per worker keeps connections open per endpoint
(``scheme://host:port``) and runs at most ``CDC_WEBHOOK_CONCURRENCY`` requests per endpoint
at once (the rest wait for a slot, within their timeout), so a slow endpoint holds only its
own slots. When the worker stops (:meth:`WebhookClient.drain`), requests still waiting for a
slot are not sent (``Retry``) and those in flight finish. A host name is resolved by
:class:`_CheckedResolver` when a connection opens: every address is checked (``targets``)
and the connection goes to the checked one, the only lookup (no second resolution, no HTTP
proxy); an IP literal is checked before the request. ``breaker`` stops waiting on an
endpoint that keeps failing.
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

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from consumers.errors import PermanentError, Retry
from consumers.notifications import targets
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


class _CheckedResolver(AbstractResolver):
    """aiohttp's resolver for webhook hosts: look up once, check every address, hand back
    only the checked one (``targets.checked_address``). A refused host raises
    :class:`PermanentError`, which aiohttp passes through unchanged."""

    def __init__(self, policy: targets.TargetPolicy, lookup: Lookup) -> None:
        self._policy = policy
        self._lookup = lookup

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        target = targets.WebhookTarget("http", host, port, "/")
        address = targets.checked_address(target, await self._lookup(host, port), self._policy)
        bare = address.split("%", 1)[0]
        v6 = isinstance(ipaddress.ip_address(bare), ipaddress.IPv6Address)
        return [
            {
                "hostname": host,
                "host": bare,
                "port": port,
                "family": socket.AF_INET6 if v6 else socket.AF_INET,
                "proto": 0,
                "flags": socket.AI_NUMERICHOST,
            }
        ]

    async def close(self) -> None:
        """Nothing to release."""


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
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class WebhookClient:
    """Signed POSTs over pooled connections, bounded per endpoint (module doc).

    Created in the worker's event loop (the first :meth:`post` opens the session);
    :meth:`close` releases the connections.
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
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._policy = policy
        self._per_endpoint = per_endpoint
        self._breaker = breaker or Breaker(0, 0.0)
        self._lookup = lookup
        self._clock = clock
        self._session: aiohttp.ClientSession | None = None
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._targets: dict[str, tuple[targets.WebhookTarget, str]] = {}
        self._draining = asyncio.Event()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                resolver=_CheckedResolver(self._policy, self._lookup),
                # Every new connection looks up and checks again; open ones are reused.
                use_dns_cache=False,
                limit=0,  # the worker's prefetch bounds the total, _slot each endpoint

                ssl=_TLS,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self._timeout,
                trust_env=False,  # no HTTP proxy: the connection goes to the checked address
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    def _endpoint(self, url: str) -> str:
        """``url``'s endpoint, once its form (and an IP literal's address) is allowed; the
        answer for a URL is kept (the policy does not change while the worker runs)."""
        known = self._targets.get(url)
        if known is None:
            target = targets.webhook_target(url, self._policy)
            if _is_ip(target.host):
                # aiohttp does not ask the resolver about an IP literal: check it here.
                targets.checked_address(target, [target.host], self._policy)
            if len(self._targets) > 100_000:
                self._targets.clear()
            known = self._targets[url] = (target, target.where())
        return known[1]

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
        endpoint = self._endpoint(hook.url)
        wait = self._breaker.admit(endpoint, self._clock())
        if wait is not None:
            raise Retry(
                f"webhook {endpoint} keeps failing: not tried for another {wait:.0f}s "
                "(CDC_WEBHOOK_BREAKER_FAILURES, CDC_WEBHOOK_BREAKER_SECONDS)",
                after=wait,
            )
        started = self._clock()
        slots = await self._slot(endpoint, self._timeout.total or 0.0)
        status = 0
        try:
            left = max((self._timeout.total or 0.0) - (self._clock() - started), 0.001)
            async with self._open().post(
                hook.url,
                data=hook.body,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=left),
                headers={
                    "Content-Type": "application/json",
                    SIGNATURE_HEADER: sign(self._secret, hook.body),
                    IDEMPOTENCY_HEADER: hook.idempotency_key,
                    "X-CDC-Event-Type": hook.event_type,
                    "X-CDC-Message-Id": hook.message_id,
                    "User-Agent": "outbox-cdc-notifications",
                },
            ) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
            self._breaker.failed(endpoint, self._clock())
            raise Retry(f"webhook {_where(hook.url)} unreachable: {_describe(exc)}") from exc
        except BaseException:
            self._breaker.abandoned(endpoint)
            raise
        finally:
            slots.release()
        self._breaker.succeeded(endpoint)
        if not 200 <= status < 300:
            raise Retry(f"webhook {_where(hook.url)} answered {status}")

    async def close(self) -> None:
        """Close the pooled connections."""
        if self._session is not None:
            await self._session.close()
            self._session = None


def _describe(exc: BaseException) -> str:
    # aiohttp's connection errors name the host and port (not the path); the underlying
    # OSError/SSL error says what went wrong.
    cause = getattr(exc, "os_error", None) or exc.__cause__
    text = f"{type(exc).__name__}: {exc}"
    if cause is not None and str(cause) not in text:
        text += f" ({cause!r})"
    return text or "timeout"


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

