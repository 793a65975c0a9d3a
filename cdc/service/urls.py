"""The two connection strings, read and checked: the broker URL and the PostgreSQL DSN.

Both are checked when the settings are built, so a value that can never connect stops the
process at start (exit 2) with the reason, instead of failing on every reconnect. The
settings hand the relay's AMQP client the broker address :func:`amqp_address` parsed and
checked, so the rules of what a URL means live here only. Error messages never repeat the
value: it may hold a password.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

from psycopg import ProgrammingError
from psycopg.conninfo import conninfo_to_dict

#: Heartbeat (seconds) when the URL names none: the relay declares a broker dead after two
#: silent intervals (20 s). Zero (``?heartbeat=0``) turns heartbeats off.
DEFAULT_HEARTBEAT = 10
_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?"
)
_DOTTED_DIGITS_RE = re.compile(r"[0-9.]+")


@dataclass(frozen=True, slots=True)
class AmqpUrl:
    """The parts of an ``amqp://`` or ``amqps://`` URL the relay connects with."""

    tls: bool
    host: str
    port: int
    vhost: str
    user: str
    password: str = field(repr=False)  # never in a log line or a traceback
    heartbeat: int
    cafile: str | None


def parse_amqp_url(url: str) -> AmqpUrl:
    """Split a broker URL into its parts; ValueError says which part is wrong."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("amqp", "amqps"):
        shown = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise ValueError(f"must start with amqp:// or amqps:// (got {shown})")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("the port must be a number from 1 to 65535") from None
    if port == 0:
        raise ValueError("the port must be a number from 1 to 65535")
    if not parts.hostname:
        raise ValueError("names no host (amqp://user@host:5672/vhost)")
    query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    text = query.get("heartbeat", str(DEFAULT_HEARTBEAT))
    if not text.isdigit() or int(text) > 65535:
        raise ValueError("?heartbeat= must be whole seconds from 0 to 65535 (0 disables)")
    tls = parts.scheme == "amqps"
    cafile = query.get("cafile") or None
    if cafile is not None and not tls:
        raise ValueError("?cafile= needs an amqps:// URL")
    return AmqpUrl(
        tls=tls,
        host=parts.hostname,
        port=port or (5671 if tls else 5672),
        vhost=unquote(parts.path[1:]) if len(parts.path) > 1 else "/",
        user=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        heartbeat=int(text),
        cafile=cafile,
    )


def amqp_address(url: str) -> AmqpUrl:
    """A broker URL parsed, with its ``?cafile=`` readable; ValueError says what is wrong."""
    address = parse_amqp_url(url)
    if address.cafile is not None and not os.access(address.cafile, os.R_OK):
        raise ValueError(f"?cafile={address.cafile} is not a readable file")
    return address


def parse_dsn(dsn: str) -> dict[str, str]:
    """A libpq URL or ``key=value`` DSN as a dict; ValueError if libpq could not use it."""
    try:
        params = conninfo_to_dict(dsn.strip())
    except ProgrammingError as exc:
        # libpq's message quotes a fragment of the string, which may be the password.
        first = str(exc).splitlines()[0] if str(exc) else "unparseable"
        reason = "a fragment is missing its '='" if "missing" in first else "libpq rejects it"
        raise ValueError(
            f"is neither a postgresql:// URL nor a key=value DSN ({reason})"
        ) from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError("the port must be a number from 1 to 65535")
    return {k: str(v) for k, v in params.items() if v is not None}


def url_has_password(value: str) -> bool:
    """True if a broker URL or PostgreSQL DSN carries a password (so must not be a flag)."""
    text = value.strip()
    if text.startswith(("amqp://", "amqps://")):
        return bool(urlsplit(text).password)
    try:
        return bool(parse_dsn(text).get("password"))
    except ValueError:
        return "password" in text.lower() or bool(urlsplit(text).password)


def check_host(host: str) -> str:
    """A bind address: an IPv4/IPv6 address or a host name; ValueError otherwise."""
    text = host.strip()
    if _DOTTED_DIGITS_RE.fullmatch(text) or ":" in text:
        try:
            ipaddress.ip_address(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address") from None
        return text
    if not _HOSTNAME_RE.fullmatch(text):
        raise ValueError(f"{text!r} is neither an IP address nor a host name")
    return text
