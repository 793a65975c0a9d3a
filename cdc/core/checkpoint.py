"""The relay's durable checkpoint and the slot-health rule, sans-I/O.

One row of ``cdc.relay_checkpoint`` per slot (``cdc/sql/002_checkpoint.sql`` says what each
column means) is what tells "first start" from "my slot is gone". :func:`assess` turns that
row and what the relay sees now (slot, server identity, publication) into one verdict;
:func:`plan_write` is the periodic checkpoint rule: a candidate snapshot becomes the proven
one once the flushed LSN has reached the WAL position read just after it was taken.
``cdc/shell/checkpoint_store.py`` reads and writes the row; nothing here touches a socket.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import Enum

#: ``state`` values of a checkpoint row.
READY = "ready"
LOST = "lost"
RECOVERING = "recovering"


def normalize_snapshot(text: str) -> str:
    """Return ``pg_snapshot`` text that ``pg_snapshot``'s input accepts, same visibility.

    The snapshot a logical slot exports can have ``xmin`` above ``xmax`` (its builder takes
    xmin from the oldest running xid and xmax from the latest completed one), and
    ``pg_current_snapshot()`` prints it so, but the type refuses to read it back. Every xid
    below xmin counts as finished either way and no xid can sit between them in the xip
    list, so raising xmax to xmin changes nothing that the snapshot says.
    """
    parts = text.split(":")
    if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
        raise ValueError(f"not a pg_snapshot: {text!r}")
    xmin, xmax = int(parts[0]), int(parts[1])
    if xmin <= xmax:
        return text
    return f"{xmin}:{xmin}:{parts[2]}"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """One row of ``cdc.relay_checkpoint``; LSNs as integers, snapshots as their text."""

    slot_name: str
    outbox_table: str
    publication_name: str
    system_identifier: str
    timeline: int
    confirmed_lsn: int
    proven_snapshot: str
    base_snapshot: str
    state: str = READY
    lost_reason: str | None = None
    proven_at: datetime | None = None
    candidate_snapshot: str | None = None
    candidate_lsn: int | None = None
    backfill_mode: str = "none"
    backfill_since: datetime | None = None
    backfill_done: bool = True
    backfill_after_id: str | None = None
    backfill_rows_done: int = 0
    backfill_rows_total: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class SlotSeen:
    """The slot's row of ``pg_replication_slots`` (columns a server lacks are ``None``)."""

    plugin: str | None
    wal_status: str | None = None
    invalidation_reason: str | None = None  # PostgreSQL 17+
    conflicting: bool | None = None  # PostgreSQL 16+
    failover: bool | None = None  # PostgreSQL 17+


@dataclass(frozen=True, slots=True)
class Observed:
    """What the relay sees at a session start (or a periodic re-check)."""

    slot_name: str
    publication_name: str
    outbox_table: str
    slot: SlotSeen | None
    publication_exists: bool
    table_published: bool
    #: IDENTIFY_SYSTEM of the replication connection; ``None`` when not asked (re-checks).
    system_identifier: str | None = None
    timeline: int | None = None


class Action(Enum):
    """What the relay does after :func:`assess`."""

    STREAM = "stream"
    CREATE = "create"  # first start, no slot: create it and insert the row
    ADOPT = "adopt"  # first start, a slot made without a checkpoint: insert the row
    LOST = "lost"  # exit 5: only `cdc recover` gets the missing events out
    NOT_SET_UP = "not_set_up"  # exit 3: the message says what to run


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of :func:`assess`; ``timeline`` set means "record this timeline"."""

    action: Action
    reason: str = ""
    timeline: int | None = None


def invalidation(slot: SlotSeen) -> str | None:
    """Why the server invalidated ``slot``, or ``None`` if it did not."""
    if slot.invalidation_reason:
        return slot.invalidation_reason
    if slot.wal_status == "lost":
        return "wal_status is lost (the WAL it needs was removed, see max_slot_wal_keep_size)"
    if slot.conflicting:
        return "conflicting with recovery (rows it needs were removed on the primary)"
    return None


def _publication_problem(seen: Observed) -> str | None:
    if not seen.publication_exists:
        return f"publication {seen.publication_name!r} does not exist"
    if not seen.table_published:
        return (
            f"publication {seen.publication_name!r} no longer contains {seen.outbox_table} "
            "(was the table renamed, dropped or recreated?)"
        )
    return None


def _first_start(seen: Observed) -> Verdict:
    problem = _publication_problem(seen)
    if problem is not None:
        return Verdict(Action.NOT_SET_UP, f"{problem}: run `cdc setup`")
    if seen.slot is None:
        return Verdict(Action.CREATE)
    if seen.slot.plugin != "pgoutput":
        return Verdict(
            Action.NOT_SET_UP,
            f"slot {seen.slot_name!r} uses plugin {seen.slot.plugin!r}, not pgoutput: "
            "drop it or choose another CDC_SLOT_NAME",
        )
    why = invalidation(seen.slot)
    if why is not None:
        return Verdict(
            Action.NOT_SET_UP,
            f"slot {seen.slot_name!r} was made without a checkpoint and is invalidated ({why}): "
            f"drop it (SELECT pg_drop_replication_slot('{seen.slot_name}')), then run "
            "`cdc setup --backfill ...` to publish the rows it missed",
        )
    return Verdict(Action.ADOPT)


def assess(checkpoint: Checkpoint | None, seen: Observed) -> Verdict:
    """Decide whether the relay may stream; every "lost" reason names what went wrong.

    Without a row this is a first start (create or adopt the slot). With one, a missing or
    invalidated slot, another plugin, another database system, a timeline change on a
    slot that is not a failover slot, or a publication that no longer carries the table
    all mean events may have been skipped: the slot is lost.
    """
    if checkpoint is None:
        return _first_start(seen)
    if checkpoint.state == RECOVERING:
        return Verdict(Action.LOST, "a `cdc recover` was interrupted before it finished")
    if checkpoint.state == LOST:
        return Verdict(Action.LOST, checkpoint.lost_reason or "the slot was marked lost")
    slot = seen.slot
    if slot is None:
        return Verdict(
            Action.LOST,
            "the slot does not exist (dropped, or the server failed over to a standby "
            "that does not have it)",
        )
    why = invalidation(slot)
    if why is not None:
        return Verdict(Action.LOST, f"the slot is invalidated: {why}")
    if slot.plugin != "pgoutput":
        return Verdict(Action.LOST, f"the slot uses plugin {slot.plugin!r}, not pgoutput")
    sysid = seen.system_identifier
    if sysid is not None and sysid != checkpoint.system_identifier:
        return Verdict(
            Action.LOST,
            f"database system identifier is {sysid}, the checkpoint was written on "
            f"{checkpoint.system_identifier} (another cluster, or one rebuilt from a backup)",
        )
    timeline = None
    if seen.timeline is not None and seen.timeline != checkpoint.timeline:
        if not slot.failover:
            return Verdict(
                Action.LOST,
                f"timeline changed from {checkpoint.timeline} to {seen.timeline} and the slot "
                "is not a failover slot",
            )
        timeline = seen.timeline
    problem = _publication_problem(seen)
    if problem is not None:
        return Verdict(Action.LOST, problem)
    return Verdict(Action.STREAM, timeline=timeline)


@dataclass(frozen=True, slots=True)
class CheckpointWrite:
    """One periodic update of the row: ``proven_snapshot`` set means promote it."""

    confirmed_lsn: int
    proven_snapshot: str | None
    candidate_snapshot: str
    candidate_lsn: int


def plan_write(
    *,
    confirmed_lsn: int,
    candidate_snapshot: str | None,
    candidate_lsn: int | None,
    flushed: int,
    new_snapshot: str,
    new_lsn: int,
) -> CheckpointWrite:
    """The checkpoint rule: what to write given the row's candidate and the flushed LSN.

    Every transaction visible in the candidate snapshot committed below ``candidate_lsn``
    (the insert LSN is read after the snapshot), so once ``flushed`` (every commit up to
    it broker-confirmed) reaches it, the candidate is proven, and the snapshot and insert
    LSN just read (in that order) become the next candidate. A candidate not reached yet
    is kept rather than replaced: a relay lagging by more than one interval still proves
    something every few intervals instead of chasing a fresh candidate forever.
    ``confirmed_lsn`` never moves back.
    """
    confirmed = max(confirmed_lsn, flushed)
    if candidate_snapshot is None or candidate_lsn is None:
        return CheckpointWrite(confirmed, None, new_snapshot, new_lsn)
    if flushed >= candidate_lsn:
        return CheckpointWrite(confirmed, candidate_snapshot, new_snapshot, new_lsn)
    return CheckpointWrite(confirmed, None, candidate_snapshot, candidate_lsn)
