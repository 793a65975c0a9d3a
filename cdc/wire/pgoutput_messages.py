"""The messages of the ``pgoutput`` logical replication protocol (versions 1 to 4), as values.

One frozen dataclass per message type, built by :func:`cdc.wire.pgoutput.decode`; tuple values
are left as the server sent them (see :data:`TupleData`). No I/O, no decoding here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Final, TypeAlias


class UnchangedToast:
    """Marker for a toasted value the server did not send because the UPDATE left it alone."""

    __slots__ = ()

    def __reduce__(self) -> str:
        # Pickle and copy hand back the module's singleton, so ``is UNCHANGED_TOAST`` holds.
        return "UNCHANGED_TOAST"

    def __repr__(self) -> str:
        return "UNCHANGED_TOAST"


UNCHANGED_TOAST: Final = UnchangedToast()


@dataclass(frozen=True, slots=True)
class BinaryValue:
    """A column value in its type's binary send format (``binary 'true'`` option)."""

    data: bytes


TupleData: TypeAlias = tuple[bytes | memoryview | UnchangedToast | BinaryValue | None, ...]


@dataclass(frozen=True, slots=True)
class Begin:
    """'B': a transaction starts; ``final_lsn`` is the LSN of its commit record."""

    final_lsn: int
    commit_time: datetime
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: int
    name: str


@dataclass(frozen=True, slots=True)
class Column:
    flags: int
    name: str
    type_oid: int
    type_modifier: int

    @property
    def is_key(self) -> bool:
        """Whether the column is part of the replica identity."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class Relation:
    """'R': the shape of a table, sent before its first change in a session or stream."""

    xid: int | None
    oid: int
    namespace: str
    name: str
    replica_identity: str
    columns: tuple[Column, ...]


@dataclass(frozen=True, slots=True)
class TypeMessage:
    """'Y': the name of a user-defined type used by a following Relation."""

    xid: int | None
    oid: int
    namespace: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    xid: int | None
    relation_oid: int
    new: TupleData


@dataclass(frozen=True, slots=True)
class Update:
    """'U': a row was updated; ``old`` (REPLICA IDENTITY FULL) or ``key`` (key changed)."""

    xid: int | None
    relation_oid: int
    old: TupleData | None
    key: TupleData | None
    new: TupleData


@dataclass(frozen=True, slots=True)
class Delete:
    """'D': a row was deleted; exactly one of ``old`` and ``key`` is set."""

    xid: int | None
    relation_oid: int
    old: TupleData | None
    key: TupleData | None


@dataclass(frozen=True, slots=True)
class Truncate:
    xid: int | None
    options: int
    relation_oids: tuple[int, ...]

    @property
    def cascade(self) -> bool:
        """TRUNCATE ... CASCADE."""
        return bool(self.options & 1)

    @property
    def restart_identity(self) -> bool:
        """TRUNCATE ... RESTART IDENTITY."""
        return bool(self.options & 2)


@dataclass(frozen=True, slots=True)
class LogicalMessage:
    xid: int | None
    flags: int
    lsn: int
    prefix: str
    content: bytes

    @property
    def transactional(self) -> bool:
        """Whether the message belongs to its transaction (else it was sent immediately)."""
        return bool(self.flags & 1)


@dataclass(frozen=True, slots=True)
class StreamStart:
    xid: int
    first_segment: bool


@dataclass(frozen=True, slots=True)
class StreamStop:
    """'E': the current block of an in-progress transaction ended."""


@dataclass(frozen=True, slots=True)
class StreamCommit:
    xid: int
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime


@dataclass(frozen=True, slots=True)
class StreamAbort:
    """'A': a streamed (sub)transaction aborted; abort_lsn/time only from v4 parallel."""

    xid: int
    subxid: int
    abort_lsn: int | None
    abort_time: datetime | None


@dataclass(frozen=True, slots=True)
class BeginPrepare:
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class Prepare:
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class CommitPrepared:
    flags: int
    commit_lsn: int
    end_lsn: int
    commit_time: datetime
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class RollbackPrepared:
    flags: int
    prepare_end_lsn: int
    rollback_end_lsn: int
    prepare_time: datetime
    rollback_time: datetime
    xid: int
    gid: str


@dataclass(frozen=True, slots=True)
class StreamPrepare:
    flags: int
    prepare_lsn: int
    end_lsn: int
    prepare_time: datetime
    xid: int
    gid: str


Message: TypeAlias = (
    Begin | Commit | Origin | Relation | TypeMessage | Insert | Update | Delete | Truncate
    | LogicalMessage | StreamStart | StreamStop | StreamCommit | StreamAbort | BeginPrepare
    | Prepare | CommitPrepared | RollbackPrepared | StreamPrepare
)  # fmt: skip
