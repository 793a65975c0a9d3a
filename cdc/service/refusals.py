"""Which connection failures are refusals (retrying cannot help) and what the operator does.

A refused login, an unknown database or vhost, a missing privilege or a TLS certificate
that does not verify fails the same way on every try: the relay and the workers stop with
exit code 3 and one line that says what to fix. Everything else (connection refused or
reset, a server starting up or shutting down, too many connections) is an outage that
passes: they keep retrying with backoff.

PostgreSQL reports connection failures as text only (libpq gives no SQLSTATE before a
session exists), so they are recognised by the server's own message; RabbitMQ by the reply
code of its Connection.Close / Channel.Close. Pure: strings and numbers in, a hint out.
"""

from __future__ import annotations

import re

from cdc.errors import RefusedError

# (pattern of the server's message, SQLSTATE it stands for, what to do)
_POSTGRES: tuple[tuple[re.Pattern[str], str, str], ...] = tuple(
    (re.compile(pattern, re.I), state, hint)
    for pattern, state, hint in (
        (
            r"password authentication failed",
            "28P01",
            "check the user and password in {var}",
        ),
        (
            r"no password supplied|password is required",
            "28P01",
            "the server asks for a password: put it in {var} (or {var}_FILE)",
        ),
        (
            r'database ".*" does not exist',
            "3D000",
            "create the database or correct its name in {var}",
        ),
        (r'role ".*" does not exist', "28000", "create the role or correct the user in {var}"),
        (
            r"pg_hba\.conf",
            "28000",
            "add a pg_hba.conf line for this user, database and host "
            "(the relay also needs one for `replication`)",
        ),
        (
            r"permission denied for database|not permitted to log in",
            "42501",
            "GRANT CONNECT ON DATABASE (and ALTER ROLE ... LOGIN) to the role",
        ),
        (
            r"replication role|permission denied to start WAL sender",
            "42501",
            "ALTER ROLE ... REPLICATION (see `cdc setup`)",
        ),
        (
            r"certificate verify failed|root certificate file|sslrootcert",
            "TLS",
            "the server's TLS certificate does not verify: set sslrootcert in {var} "
            "to the CA that signed it",
        ),
    )
)

#: Reply codes of a broker close that no retry can fix: ACCESS_REFUSED (login or
#: permissions), NOT_ALLOWED (unknown vhost, or no access to it), INVALID_PATH.
AMQP_REFUSED = {403: "ACCESS_REFUSED", 530: "NOT_ALLOWED", 402: "INVALID_PATH"}


def postgres_refusal(message: str, var: str = "CDC_DATABASE_URL") -> str | None:
    """``"<SQLSTATE>: <what to do>"`` if PostgreSQL's ``message`` is a refusal, else None."""
    for pattern, state, hint in _POSTGRES:
        if pattern.search(message):
            return f"{state}: {hint.format(var=var)}"
    return None


def amqp_refusal(reply_code: int, var: str = "CDC_AMQP_URL") -> str | None:
    """What to do if a broker close with ``reply_code`` is a refusal, else None."""
    if reply_code == 403:
        return (
            f"check the user and password in {var}, and that the user may configure, write "
            "and read on the vhost (rabbitmqctl set_permissions)"
        )
    if reply_code in (530, 402):
        return f"the vhost in {var} does not exist or the user has no access to it"
    return None


def tls_hint(var: str = "CDC_AMQP_URL") -> str:
    """What to do when the broker's TLS certificate does not verify."""
    return (
        f"the broker's TLS certificate does not verify: add ?cafile=<CA bundle> to {var}, "
        "or use the host name the certificate was issued for"
    )


def first_line(text: str) -> str:
    """The first non-empty line of a server message, stripped (libpq adds context lines)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return text.strip()


def refused_by_postgres(message: str, doing: str) -> RefusedError | None:
    """The error to stop with if PostgreSQL's ``message`` is a refusal, else None."""
    hint = postgres_refusal(message)
    return None if hint is None else RefusedError(f"{doing}: {first_line(message)}: {hint}")
