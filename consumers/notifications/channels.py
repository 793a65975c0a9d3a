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

Webhooks: one client per worker checks the URL (its form, an IP literal's address, before
the request), signs the body and sends it through ``webhook_client`` (pooled keep-alive
connections, at most ``CDC_WEBHOOK_CONCURRENCY`` requests per endpoint at once, the host
looked up and checked when a connection opens). When the worker stops
(:meth:`WebhookClient.drain`), requests still waiting for a slot are not sent (``Retry``)
and those in flight finish. A request retried on a new connection after a stale one keeps
the same idempotency key. ``breaker`` stops waiting on an endpoint that keeps failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import smtplib
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

from consumers.errors import PermanentError, Retry
from consumers.notifications import http1, targets
from consumers.notifications.breaker import Breaker
from consumers.notifications.signing import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign
from consumers.notifications.webhook_client import (
    CheckedTarget,
    Lookup,
    WebhookPool,
    system_lookup,
)


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    body: bytes
    idempotency_key: str
    event_type: str
    message_id: str


def endpoint_of(url: str) -> str:
    """``scheme://host:port`` of ``url``, to name it in errors and logs."""
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
        lookup: Lookup = system_lookup,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._secret = secret
        self._timeout = timeout
        self._policy = policy
        self._breaker = breaker or Breaker(0, 0.0)
        self._clock = clock
        self._targets: dict[str, CheckedTarget] = {}
        self._pool = WebhookPool(policy, per_endpoint, self._breaker, lookup, clock)

    def _target(self, url: str) -> CheckedTarget:
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
            known = self._targets[url] = CheckedTarget(target, target.where(), head, ip)
        return known

    def drain(self) -> None:
        """The worker is stopping: POSTs still waiting for a slot are not sent (``Retry``);
        those in flight finish."""
        self._pool.drain()

    def refusal(self, url: str) -> Retry | None:
        """The :class:`Retry` a POST to ``url`` would fail with at once, its endpoint's
        breaker being open (the probe is left to :meth:`post`); None if it would be tried
        or the URL is refused (:meth:`post` says why). The caller can then skip building
        and signing a body that would not be sent."""
        try:
            endpoint = self._target(url).endpoint
        except PermanentError:
            return None
        wait = self._breaker.open_for(endpoint, self._clock())
        return None if wait is None else _open(endpoint, wait, self._timeout)

    def take_probe(self, url: str) -> bool:
        """True when a POST to ``url`` is due as its endpoint's probe (the breaker's cooldown
        is over), which this call takes: send it with ``post(hook, probe=True)``."""
        try:
            endpoint = self._target(url).endpoint
        except PermanentError:
            return False
        return self._breaker.take_probe(endpoint, self._clock())

    async def post(self, hook: Webhook, *, probe: bool = False) -> None:
        """POST the signed body to the checked target; a 2xx answer is a delivery, a refused
        target a :class:`PermanentError`, anything else a :class:`Retry`. ``probe``: the
        endpoint's probe, taken with :meth:`take_probe` (its outcome is reported)."""
        known = self._target(hook.url)
        endpoint = known.endpoint
        now = self._clock()
        if not probe:
            wait = self._breaker.admit(endpoint, now)
            if wait is not None:
                raise _open(endpoint, wait, self._timeout)
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
            if probe:  # not sent: no outcome, the next send may probe
                self._breaker.abandoned(endpoint)
            raise PermanentError(f"webhook {endpoint} not sent: {exc}") from exc
        self._pool.sweep(now)
        slots = await self._pool.slot(endpoint, self._timeout)
        try:
            left = max(self._timeout - (self._clock() - now), 0.001)
            async with asyncio.timeout(left):
                status = await self._pool.exchange(known, data)
        except (OSError, TimeoutError, http1.ProtocolError) as exc:
            self._breaker.failed(endpoint, self._clock())
            raise Retry(
                f"webhook {endpoint_of(hook.url)} unreachable: {_describe(exc, left)}"
            ) from exc
        except BaseException:
            self._breaker.abandoned(endpoint)
            raise
        finally:
            slots.release()
        self._breaker.succeeded(endpoint)
        if not 200 <= status < 300:
            raise Retry(f"webhook {endpoint_of(hook.url)} answered {status}")

    async def close(self) -> None:
        """Close the pooled connections."""
        await self._pool.close()


def _open(endpoint: str, wait: float, timeout: float) -> Retry:
    """The failure of a webhook to ``endpoint`` while its breaker is open for ``wait`` s.

    The retry waits for the probe's outcome too (up to one ``timeout`` after the breaker's
    cooldown): one that came back sooner would only fail at once again, a delivery, a retry
    copy and an ack more for nothing."""
    return Retry(
        f"webhook {endpoint} keeps failing: not tried for another {wait:.0f}s "
        "(CDC_WEBHOOK_BREAKER_FAILURES, CDC_WEBHOOK_BREAKER_SECONDS)",
        after=wait + timeout,
    )


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"TimeoutError: no answer within {timeout:.3g}s"
    return f"{type(exc).__name__}: {exc}"


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
