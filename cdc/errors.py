"""The relay's exception hierarchy: one root, a few branches, messages that say what to do.

Library exceptions (psycopg, aiormq) are translated into these only at the I/O boundary,
so everything above the boundary reasons about *our* failure kinds.
"""

from __future__ import annotations


class CdcError(Exception):
    """Root of every error the relay raises on purpose."""


class ConfigError(CdcError):
    """The configuration is invalid; fix the named setting and start again."""


class RefusedError(CdcError):
    """A server refuses this configuration: login, database, vhost, privilege, TLS certificate.

    Retrying cannot help, so it is not retried: the process exits 3 and the message says
    what to fix (``cdc/service/refusals.py`` tells refusals from outages).
    """


class ProtocolError(CdcError):
    """Bytes from the server could not be decoded.

    Carries the byte ``offset`` inside the message and, when known, the WAL ``lsn`` of the
    message, so the report points at the exact place in the stream.
    """

    def __init__(self, message: str, *, offset: int, lsn: int | None = None) -> None:
        where = f"at byte offset {offset}"
        if lsn is not None:
            # PostgreSQL's X/Y form, as cdc.core.lsn.format_lsn writes it: written out here
            # because cdc.core.lsn imports this module (its parse errors are ConfigErrors).
            where += f" of the message at LSN {lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
        super().__init__(f"{message} ({where})")
        self.offset = offset
        self.lsn = lsn


class SourceError(CdcError):
    """PostgreSQL (the source) failed or refused; usually retried with backoff."""


class SetupError(SourceError):
    """The database is not set up for the relay (wal_level, privileges, table, publication).

    Not retried: an operator has to act, and the message says how.
    """


class SlotBusyError(SourceError):
    """The replication slot is active in another walsender (SQLSTATE 55006).

    The relay waits as a hot standby and retries.
    """


class SinkError(CdcError):
    """RabbitMQ (the sink) failed: connection lost, channel closed, confirms missing."""


class SlotLostError(SourceError):
    """The slot the relay streamed from is gone or unusable; events may have been skipped.

    Not retried and never repaired by creating a slot: ``cdc recover`` publishes what the
    checkpoint does not prove published and makes a new slot. Exit code 5.
    """

    def __init__(self, slot: str, reason: str) -> None:
        super().__init__(
            f"slot {slot!r} is lost: {reason}. Events committed after the last checkpoint "
            "may not have been published: run `cdc recover`"
        )
        self.slot = slot
        self.reason = reason
