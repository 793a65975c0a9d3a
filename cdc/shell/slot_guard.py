"""Acting on the slot-health verdict: at a session start, at ``cdc setup``, and periodically.

:func:`open_slot` is the only path by which the relay or ``cdc setup`` gets a slot to
stream from: it reads the checkpoint row, looks at the slot, the publication and the
server (IDENTIFY_SYSTEM), and then streams, creates the slot (first start only), adopts a
slot made without a checkpoint, or refuses. Once a row exists nothing here ever creates a
slot: a lost one is recorded in the row and raised as :class:`SlotLostError` (exit 5).
:func:`tick` is the periodic task's body: the same check without IDENTIFY_SYSTEM, then one
checkpoint write. Blocking; the relay calls these in a thread.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg

from cdc.config import RelaySettings
from cdc.core.checkpoint import Action, Checkpoint, assess
from cdc.core.lsn import parse_lsn
from cdc.errors import SetupError, SlotLostError, SourceError
from cdc.shell import checkpoint_store as store
from cdc.shell import slot as slots
from cdc.shell.slot_create import create_slot, current_identity


@dataclass(frozen=True, slots=True)
class Opened:
    """A slot ready to stream: what was done to get it and where it resumes."""

    action: Action  # STREAM (kept), CREATE or ADOPT
    start_lsn: int


@contextlib.contextmanager
def _translated(what: str) -> Iterator[None]:
    """psycopg errors of a check become the relay's: privileges a SetupError (exit 3),
    anything else a SourceError (retried)."""
    try:
        yield
    except psycopg.errors.InsufficientPrivilege as exc:
        raise SetupError(f"{what}: {exc} (grant the role access to {store.TABLE})") from exc
    except psycopg.Error as exc:
        raise SourceError(f"{what} failed: {exc}".strip()) from exc


def _lost(conn: slots.Conn, settings: RelaySettings, reason: str) -> SlotLostError:
    store.mark_lost(conn, settings.slot_name, reason)
    return SlotLostError(settings.slot_name, reason)


def _slot_lsn(conn: slots.Conn, settings: RelaySettings) -> int:
    row = conn.execute(
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (settings.slot_name,),
    ).fetchone()
    return parse_lsn(row[0]) if row and row[0] else 0


def setup(settings: RelaySettings) -> list[str]:
    """Idempotent `cdc setup`: checks, table, publication, slot. Returns what it did."""
    done = slots.prepare(settings)
    opened = open_slot(settings)
    verb = {Action.CREATE: "created", Action.ADOPT: "adopted"}.get(opened.action, "kept")
    done.append(f"{verb} slot {settings.slot_name}")
    if opened.action is Action.CREATE and slots.has_rows(settings):
        done.append(
            f"{settings.outbox_table} already had rows: they are not published "
            "(the slot starts after them)"
        )
    return done


def open_slot(settings: RelaySettings) -> Opened:
    """Check the slot against the checkpoint and make it ready to stream, or refuse.

    Raises :class:`SetupError` (exit 3) when ``cdc setup`` has not run, and
    :class:`SlotLostError` (exit 5) when the slot is lost.
    """
    with _translated("slot check"), slots.connect(settings) as conn:
        row = store.read(conn, settings.slot_name)
        identity = current_identity(settings)
        verdict = assess(row, slots.observe(conn, settings, identity))
        if verdict.action is Action.NOT_SET_UP:
            raise SetupError(verdict.reason)
        if verdict.action is Action.LOST:
            raise _lost(conn, settings, verdict.reason)
        if verdict.action is Action.CREATE:
            created = create_slot(settings)
            store.insert(
                conn,
                store.first_row(
                    settings, created.system_identifier, created.timeline,
                    created.consistent_lsn, created.base_snapshot,
                ),
            )
            return Opened(Action.CREATE, created.consistent_lsn)
        start = _slot_lsn(conn, settings)
        if verdict.action is Action.ADOPT:
            # Made by a version without checkpoints: the cutover boundary is "now".
            snapshot = store.current_snapshot(conn)
            store.insert(
                conn,
                store.first_row(
                    settings, identity.system_identifier, identity.timeline, start, snapshot
                ),
            )
        elif verdict.timeline is not None:
            store.set_timeline(conn, settings.slot_name, verdict.timeline)
        return Opened(verdict.action, start)


def _check(conn: slots.Conn, settings: RelaySettings) -> Checkpoint | None:
    row = store.read(conn, settings.slot_name)
    verdict = assess(row, slots.observe(conn, settings))
    if verdict.action is Action.LOST:
        raise _lost(conn, settings, verdict.reason)
    return row


def tick(settings: RelaySettings, flushed: int) -> None:
    """One periodic slot check and checkpoint write; :class:`SlotLostError` if lost.

    A database error is a :class:`SourceError`: the caller tries again next time.
    """
    with _translated("checkpoint"), slots.connect(settings) as conn:
        if _check(conn, settings) is not None:
            store.write_checkpoint(conn, settings.slot_name, flushed)


def recheck(settings: RelaySettings) -> None:
    """After the stream failed with a setup-like error: raise :class:`SlotLostError` if the
    checkpoint says the slot is lost (e.g. the publication was dropped mid-stream)."""
    with _translated("slot check"), slots.connect(settings) as conn:
        _check(conn, settings)
