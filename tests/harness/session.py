"""The test session's servers, tag and names.

``SERVICES`` (the session's PostgreSQL and RabbitMQ, see :mod:`harness.services`),
``ADMIN_URL`` and ``AMQP_URL`` are provided on first use, not on import: under pytest-xdist
the controller process imports the conftest too but runs no test, so only the workers start
containers, each its own.
"""

from __future__ import annotations

import functools
import re
import secrets
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from harness import services

REPO = Path(__file__).resolve().parents[2]

#: Session tag: 8 hex digits of the start time (for the stale sweep) + 4 random ones.
SESSION = f"{int(time.time()):08x}{secrets.token_hex(2)}"
STALE_AFTER_S = 6 * 3600
STALE_DB_RE = re.compile(r"^cdc_test_([0-9a-f]{8})[0-9a-f]{4}$")
STALE_SLOT_RE = re.compile(r"^cdc_test_([0-9a-f]{8})[0-9a-f]{4}_")
STALE_AMQP_RE = re.compile(r"^cdc_test\.([0-9a-f]{8})[0-9a-f]{4}\.")


@functools.cache
def session_services() -> services.Services:
    """This process's test services, chosen and started on the first call."""
    return services.choose()


def close_services() -> None:
    """Remove the session's containers, if this process started any."""
    if session_services.cache_info().currsize:
        session_services().close()


def __getattr__(name: str) -> Any:
    # SERVICES, ADMIN_URL, AMQP_URL: looked up when first used (see the module docstring).
    if name == "SERVICES":
        return session_services()
    if name == "ADMIN_URL":
        return session_services().admin_url
    if name == "AMQP_URL":
        return session_services().amqp_url
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _with_login(url: str, user: str | None, password: str | None) -> tuple[Any, str]:
    parts = urlsplit(url)
    userinfo, _, hostport = parts.netloc.rpartition("@")
    old_user, _, old_password = userinfo.partition(":")
    user = user if user is not None else old_user
    password = password if password is not None else old_password
    return parts, f"{user}:{password}@{hostport}" if password else f"{user}@{hostport}"


def db_url(dbname: str, password: str | None = None, user: str | None = None) -> str:
    """The admin URL pointed at ``dbname`` (optionally as another user, with a password)."""
    admin = session_services().admin_url
    parts, netloc = _with_login(admin, user or urlsplit(admin).username or "postgres", password)
    return urlunsplit((parts.scheme, netloc, f"/{dbname}", parts.query, parts.fragment))


def broker_url(password: str | None = None, vhost: str = "/", scheme: str = "amqp") -> str:
    """The session's broker URL with another password, vhost or scheme (same host and port)."""
    _, netloc = _with_login(session_services().amqp_url, None, password)
    return urlunsplit((scheme, netloc, vhost if vhost == "/" else f"/{vhost}", "", ""))


def is_ours_or_stale(name: str, ours_prefix: str, pattern: re.Pattern[str]) -> bool:
    if name.startswith(ours_prefix):
        return True
    m = pattern.match(name)
    return bool(m) and time.time() - int(m.group(1), 16) > STALE_AFTER_S


def role_url(role: str, dbname: str) -> str:
    """``dbname`` as ``role`` (the test server trusts local connections: no password)."""
    parts = urlsplit(db_url(dbname))
    hostport = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{role}@{hostport}", parts.path, parts.query, ""))
