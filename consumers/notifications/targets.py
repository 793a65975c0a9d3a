"""Which webhook URLs and email recipients a notification may go to (pure).

A webhook URL comes from data (a user's stored preferences) and the worker POSTs from
inside the deployment's network, so an unchecked URL could reach internal services or the
cloud metadata endpoint. Rules:

- the scheme is ``https``; ``http`` only when ``CDC_WEBHOOK_ALLOW_HTTP`` is set; the URL has
  a host and no user:password part;
- every address the host resolves to must be globally routable: loopback, private,
  shared (100.64/10), link-local (which holds 169.254.169.254), multicast, reserved,
  unspecified and the known metadata addresses are refused, IPv4-mapped IPv6 ones by their
  IPv4 address, unless an address falls in ``CDC_WEBHOOK_ALLOWED_NETWORKS``;
- the channel then connects to the address that was checked (``channels``), so a DNS answer
  that changes between the check and the connection cannot move the POST elsewhere.

An email recipient must be one address (``local@domain``, no spaces, commas, angle brackets
or line breaks): it goes into the ``To`` header and the SMTP envelope.

Every refusal is a :class:`~consumers.errors.PermanentError` whose message names the
target's scheme and host (never its path or query: they often hold a token) and the rule.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from consumers.errors import PermanentError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Cloud metadata services (named in refusals; most are not globally routable anyway).
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
_EMAIL = re.compile(r"[^@\s<>,;:\"\\]+@[^@\s<>,;:\"\\]+\.[^@\s<>,;:\"\\]+")


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """What the operator allows beyond the defaults (https, public addresses)."""

    allow_http: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """A checked webhook URL, split for the connection."""

    scheme: str
    host: str
    port: int
    path: str  # path and query, what the request line carries

    def where(self) -> str:
        """``scheme://host:port``: safe to log (no path, query or credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """``["127.0.0.1/32", "10.0.0.0/8"]`` -> networks; ValueError names a bad entry."""
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{item!r} is not an IP network (e.g. 10.0.0.0/8)") from exc
    return tuple(out)


def webhook_target(url: str, policy: TargetPolicy) -> WebhookTarget:
    """Check ``url``'s form (scheme, host, no credentials) and split it."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError as exc:
        raise PermanentError(f"webhook URL refused: not a valid URL ({exc})") from exc
    scheme, host = parts.scheme.lower(), parts.hostname
    where = f"{scheme}://{host or ''}"
    if scheme == "http" and not policy.allow_http:
        raise PermanentError(
            f"webhook {where} refused: plain http is not allowed (use https, or set "
            "CDC_WEBHOOK_ALLOW_HTTP=true)"
        )
    if scheme not in ("https", "http"):
        raise PermanentError(f"webhook URL refused: scheme {scheme!r} (only https)")
    if not host:
        raise PermanentError("webhook URL refused: no host")
    if parts.username is not None or parts.password is not None:
        raise PermanentError(f"webhook {where} refused: credentials in the URL")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return WebhookTarget(scheme, host, port or (443 if scheme == "https" else 80), path)


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` is not a public unicast address (None: it is)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address_problem(address.ipv4_mapped)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_reserved, "reserved"),
        (address.is_private, "private"),
    )
    for failed, name in checks:
        if failed:
            return name
    return None if address.is_global else "not globally routable"


def checked_address(
    target: WebhookTarget, addresses: Sequence[str], policy: TargetPolicy
) -> str:
    """The address to connect to: the first of ``addresses`` (the host's resolution), once
    every one of them is allowed. One refused address refuses the target, so an answer
    that mixes a public and an internal address cannot be used to reach the internal one."""
    if not addresses:
        raise PermanentError(f"webhook {target.where()} refused: the host has no address")
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])  # drop an IPv6 zone id
        problem = address_problem(address)
        if problem and not any(address in net for net in policy.allowed_networks):
            raise PermanentError(
                f"webhook {target.where()} refused: it resolves to {address}, {problem} "
                "(CDC_WEBHOOK_ALLOWED_NETWORKS lists networks to allow anyway)"
            )
    return addresses[0]


def email_recipient(address: str) -> str:
    """``address`` if it is one plain email address; else a PermanentError."""
    if not _EMAIL.fullmatch(address):
        raise PermanentError(f"email recipient refused: {address[:100]!r} is not one address")
    return address
