"""A retry bundle: several retry copies of one origin queue and one delay in one message (pure).

When several messages of a batch fail and wait the same delay before going back to the same
queue, the runtime publishes ONE copy carrying all of them (``copies``) instead of one copy
each: one quorum publish, TTL expiry, dead-lettering, delivery and ack per round trip instead
of one per message. The bundle is marked by the header :data:`BUNDLE_HEADER` (the format
version) and its body is the members, each faithfully encoded so that it comes back exactly
as its own retry copy would have (properties with AMQP-typed headers, routing key, body)::

    count: u32, then per member:
      routing key length: u32, routing key (UTF-8)
      content header length: u32, content header (AMQP content header frame payload)
      body length: u32, body

All integers are big-endian. :func:`decode` raises :class:`~consumers.errors.BadBundle` on
anything else; no I/O here.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from pamqp.commands import Basic
from pamqp.header import ContentHeader

from consumers.errors import BadBundle

#: Marks a retry bundle; the value is the body format's version.
BUNDLE_HEADER = "cdc-bundle"
VERSION = 1
#: A bundle's body stays below this (bytes); more members make another bundle.
MAX_BODY = 8 * 1024 * 1024

_U32 = struct.Struct(">I")


class Member(NamedTuple):
    """One message carried by a bundle, as its own retry copy would be."""

    routing_key: str
    properties: Basic.Properties
    body: bytes


def is_bundle(headers: Mapping[str, Any] | None) -> bool:
    """True if ``headers`` mark a retry bundle (any version: a wrong one fails to decode)."""
    return bool(headers) and BUNDLE_HEADER in headers  # type: ignore[operator]


def encode(members: Sequence[Member]) -> bytes:
    """The body of a bundle of ``members``."""
    return join([encode_member(m) for m in members])


def join(encoded: Sequence[bytes]) -> bytes:
    """The body of a bundle whose members are ``encoded`` (each from :func:`encode_member`,
    so a caller that sizes its bundles encodes each member once)."""
    return _U32.pack(len(encoded)) + b"".join(encoded)


def encode_member(member: Member) -> bytes:
    """``member`` as it sits in a bundle's body (its length is what it adds to the body)."""
    header = ContentHeader(0, len(member.body), member.properties).marshal()
    key = member.routing_key.encode()
    return b"".join(
        (_U32.pack(len(key)), key, _U32.pack(len(header)), header, _U32.pack(len(member.body)))
    ) + member.body


def decode(body: bytes, version: Any) -> list[Member]:
    """The members of a bundle whose :data:`BUNDLE_HEADER` is ``version``; raises
    :class:`BadBundle` if it is not a bundle this runtime wrote."""
    if version != VERSION:
        raise BadBundle(f"bundle format version {version!r}, this worker reads {VERSION}")
    view = memoryview(body)
    count, offset = _u32(view, 0)
    if not count:
        raise BadBundle("a bundle without members")
    members = []
    for n in range(count):
        try:
            key, offset = _chunk(view, offset)
            raw, offset = _chunk(view, offset)
            payload, offset = _chunk(view, offset)
            header = ContentHeader()
            header.unmarshal(raw)
            members.append(Member(key.decode(), header.properties, payload))
        except (BadBundle, ValueError, UnicodeDecodeError, struct.error) as exc:
            raise BadBundle(f"member {n + 1} of {count}: {exc}") from exc
    if offset != len(view):
        raise BadBundle(f"{len(view) - offset} bytes after the last of {count} members")
    return members


def _u32(view: memoryview, offset: int) -> tuple[int, int]:
    if offset + 4 > len(view):
        raise BadBundle(f"body ends at byte {len(view)}, a length was expected at {offset}")
    return _U32.unpack_from(view, offset)[0], offset + 4


def _chunk(view: memoryview, offset: int) -> tuple[bytes, int]:
    size, offset = _u32(view, offset)
    if offset + size > len(view):
        raise BadBundle(f"a {size}-byte field at byte {offset} runs past the body's end")
    return bytes(view[offset : offset + size]), offset + size
