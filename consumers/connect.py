"""Opening the workers' connections, with refusals told apart from outages.

A broker or database that refuses the configuration (wrong password, unknown vhost or
database, missing privilege, TLS certificate that does not verify) raises
:class:`~consumers.errors.Refused`, which nothing retries (exit 3); every other failure is
raised as the library raised it, for the caller's reconnect loop. The rules are
``cdc/service/refusals.py``'s, shared with the relay.
"""

from __future__ import annotations

import ssl
from typing import Any

import aio_pika
import aiormq
import psycopg
from aio_pika.abc import AbstractConnection

from cdc.service.logs import redact
from cdc.service.refusals import amqp_refusal, first_line, postgres_refusal, tls_hint
from consumers.errors import Refused

#: What a broker connection or channel raises when it fails (a session then ends).
AMQP_ERRORS = (aiormq.exceptions.AMQPError, OSError, RuntimeError, TimeoutError)


def _broker_refusal(exc: BaseException) -> tuple[str, str | None]:
    """What the broker said and what to do, if ``exc`` (from aio-pika's connect) is a refusal."""
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return str(exc), amqp_refusal(403)
    # aiormq reports a refused Connection.Open (vhost) as an unexpected frame: the broker's
    # Connection.Close (530 NOT_ALLOWED) came where Connection.OpenOk was expected.
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.OpenOk" in str(exc):
        return "Connection.Open refused: 530 NOT_ALLOWED", amqp_refusal(530)
    chain: BaseException | None = exc
    while chain is not None:
        text = str(chain)
        if isinstance(chain, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in text:
            return text, tls_hint()
        chain = chain.__cause__ or chain.__context__
    return str(exc), None


def refused_by_broker(exc: BaseException) -> Refused:
    """The error to stop with when the broker refuses a declaration (403 on a channel)."""
    return Refused(redact(f"the broker refuses this configuration ({exc}): {amqp_refusal(403)}"))


async def open_broker(url: str, timeout: float = 10) -> AbstractConnection:
    """aio-pika's connect; :class:`Refused` if the broker refuses the configuration."""
    try:
        return await aio_pika.connect(url, timeout=timeout)
    except (aiormq.exceptions.AMQPError, OSError) as exc:
        said, hint = _broker_refusal(exc)
        if hint is None:
            raise
        raise Refused(redact(f"the broker refuses this configuration ({said}): {hint}")) from exc


async def open_database(url: str, **options: Any) -> psycopg.AsyncConnection[Any]:
    """psycopg's async connect; :class:`Refused` if PostgreSQL refuses the configuration."""
    try:
        return await psycopg.AsyncConnection.connect(url, **options)
    except psycopg.OperationalError as exc:
        hint = postgres_refusal(str(exc))
        if hint is None:
            raise
        line = first_line(str(exc))
        raise Refused(redact(f"PostgreSQL refuses this configuration ({line}): {hint}")) from exc
