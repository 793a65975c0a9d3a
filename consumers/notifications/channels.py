"""The external channels: a signed webhook POST and an SMTP email (blocking clients in a thread).

Contract: :func:`post_webhook` and :func:`send_email` return when the receiver accepted the
notification and raise :class:`~consumers.errors.Retry` on anything transient (timeout,
refused connection, a non-2xx answer, a temporary SMTP error) so the runtime tries again
after its backoff delay; a recipient the SMTP server refuses for good is a
:class:`~consumers.errors.PermanentError`. Both carry the delivery's idempotency key
(``Idempotency-Key`` header; ``Message-ID`` and ``X-Idempotency-Key`` in the email), the
same on every attempt. Redirects are not followed: a POST must not turn into a GET.
"""

from __future__ import annotations

import asyncio
import smtplib
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate
from typing import Any

from consumers.errors import PermanentError, Retry
from consumers.notifications.signing import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, sign


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


@dataclass(frozen=True, slots=True)
class Webhook:
    url: str
    body: bytes
    idempotency_key: str
    event_type: str
    message_id: str


def _post(hook: Webhook, secret: bytes, timeout: float) -> int:
    request = urllib.request.Request(
        hook.url,
        data=hook.body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(secret, hook.body),
            IDEMPOTENCY_HEADER: hook.idempotency_key,
            "X-CDC-Event-Type": hook.event_type,
            "X-CDC-Message-Id": hook.message_id,
            "User-Agent": "outbox-cdc-notifications",
        },
    )
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _where(url: str) -> str:
    # Webhook URLs often carry a token in the path or query: errors (which end up in logs
    # and parking headers) name the scheme and host only.
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}".rstrip(":")


async def post_webhook(hook: Webhook, secret: bytes, timeout: float) -> None:
    """POST the signed body; a 2xx answer is a delivery, anything else is a :class:`Retry`."""
    try:
        status = await asyncio.to_thread(_post, hook, secret, timeout)
    except (OSError, urllib.error.URLError, ValueError) as exc:
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
