"""The external channels: a signed webhook POST and an SMTP email (blocking clients in a thread).

Contract: :func:`post_webhook` and :func:`send_email` return when the receiver accepted the
notification and raise :class:`~consumers.errors.Retry` on anything transient (timeout,
refused connection, a non-2xx answer, a temporary SMTP error) so the runtime tries again
after its backoff delay; a recipient the SMTP server refuses for good is a
:class:`~consumers.errors.PermanentError`. Both carry the delivery's idempotency key
(``Idempotency-Key`` header; ``Message-ID`` and ``X-Idempotency-Key`` in the email), the
same on every attempt. Redirects are not followed: a POST must not turn into a GET. A
webhook goes only to a target ``targets`` allows, over a connection to the very address that
was checked (no second DNS lookup, no HTTP proxy); a refused target is a
:class:`~consumers.errors.PermanentError`.
"""

from __future__ import annotations

import asyncio
import http.client
import smtplib
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

from consumers.errors import PermanentError, Retry
from consumers.notifications import targets
from consumers.notifications.signing import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    body: bytes
    idempotency_key: str
    event_type: str
    message_id: str


class _PinnedHTTP(http.client.HTTPConnection):
    """Plain HTTP to ``address`` (already checked), ``Host`` naming the URL's host."""

    def __init__(self, target: targets.WebhookTarget, address: str, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to ``address`` (already checked); the certificate is verified for the URL's host."""

    def __init__(self, target: targets.WebhookTarget, address: str, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout, context=_TLS)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = _TLS.wrap_socket(sock, server_hostname=self.host)


_TLS = ssl.create_default_context()


def pinned_connection(
    target: targets.WebhookTarget, address: str, timeout: float
) -> http.client.HTTPConnection:
    """An HTTP(S) connection to ``target`` that connects to ``address`` and nowhere else."""
    pinned = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    return pinned(target, address, timeout)


def _resolve(target: targets.WebhookTarget) -> list[str]:
    infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _post(
    hook: Webhook, secret: bytes, timeout: float, policy: targets.TargetPolicy
) -> int:
    target = targets.webhook_target(hook.url, policy)
    # Resolve once, check every address, connect to the checked one: a second lookup by
    # the HTTP client could get another answer (DNS rebinding).
    address = targets.checked_address(target, _resolve(target), policy)
    conn = pinned_connection(target, address, timeout)
    try:
        conn.request(
            "POST",
            target.path,
            body=hook.body,
            headers={
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(secret, hook.body),
                IDEMPOTENCY_HEADER: hook.idempotency_key,
                "X-CDC-Event-Type": hook.event_type,
                "X-CDC-Message-Id": hook.message_id,
                "User-Agent": "outbox-cdc-notifications",
            },
        )
        response = conn.getresponse()
        response.read()
        return int(response.status)
    finally:
        conn.close()


def _where(url: str) -> str:
    # Webhook URLs often carry a token in the path or query: errors (which end up in logs
    # and parking headers) name the scheme and host only.
    try:
        parts = urllib.parse.urlsplit(url)
        return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}".rstrip(":")
    except ValueError:
        return "(unparsable URL)"


async def post_webhook(
    hook: Webhook, secret: bytes, timeout: float, policy: targets.TargetPolicy
) -> None:
    """POST the signed body to the checked target; a 2xx answer is a delivery, a refused
    target a :class:`PermanentError`, anything else a :class:`Retry`."""
    try:
        status = await asyncio.to_thread(_post, hook, secret, timeout, policy)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise Retry(f"webhook {_where(hook.url)} unreachable: {exc!r}") from exc
    if not 200 <= status < 300:
        raise Retry(f"webhook {_where(hook.url)} answered {status}")


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


def _send(mail: Email, config: SmtpConfig) -> None:
    with smtplib.SMTP(config.host, config.port, timeout=config.timeout) as smtp:
        if config.starttls:
            smtp.starttls()
        if config.username:
            smtp.login(config.username, config.password or "")
        smtp.send_message(_message(mail, config))


async def send_email(mail: Email, config: SmtpConfig) -> None:
    """Hand the email to the SMTP server; transient failures are a :class:`Retry`."""
    try:
        await asyncio.to_thread(_send, mail, config)
    except smtplib.SMTPRecipientsRefused as exc:
        codes = [code for code, _ in exc.recipients.values()]
        if codes and all(500 <= c < 600 for c in codes):
            raise PermanentError(f"the SMTP server refuses {mail.to}: {exc.recipients}") from exc
        raise Retry(f"SMTP recipient {mail.to} refused for now: {exc.recipients}") from exc
    except (smtplib.SMTPException, OSError) as exc:
        raise Retry(f"SMTP {config.host}:{config.port} failed: {exc}") from exc
