"""``cdc recover``: a new slot, and from its snapshot every row the checkpoint cannot prove sent.

Steps, in this order:

1. No checkpoint row: nothing to recover (exit 3, "run `cdc setup`"). A healthy slot and
   state ``ready``: say so and change nothing.
2. State := ``recovering``, committed first: an interrupted recovery is redone, never
   skipped (the relay refuses to stream in that state).
3. The publication is made to hold the table again; the old slot, if any, is dropped
   (refused while a walsender holds it: another relay streams from it).
4. A new slot is created with its exported snapshot N2. From N2, every row that is neither
   proven published (``xid8 < xmin(proven)`` and after the cutover or covered) nor skipped
   by the operator's backfill choice is published with confirms (``x-cdc-source:
   recovery``). Rows committed after N2 come from the new slot's stream.
5. The row: proven := N2, state ``ready``, the new slot's system identity and position.

Duplicates: the rows that committed after the last proven checkpoint and had already been
published (at most about two checkpoint intervals of traffic, plus transactions that were
open across a checkpoint), sent again; consumers drop them by ``message_id``.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any

import psycopg

from cdc.config import RelaySettings
from cdc.core.checkpoint import Action, Checkpoint, assess
from cdc.core.horizon import to_recover
from cdc.core.lsn import format_lsn
from cdc.errors import SetupError, SlotBusyError
from cdc.shell import horizon_store as store
from cdc.shell import schema
from cdc.shell import slot as slots
from cdc.shell.metrics import Metrics
from cdc.shell.slot_create import current_identity, exported_slot
from cdc.shell.snapshot_publish import SnapshotRows, pin_session, publish_rows, table_layout

Conn = psycopg.Connection[tuple[Any, ...]]


def slot_problem(conn: Conn, settings: RelaySettings, checkpoint: Checkpoint) -> str | None:
    """Why the slot cannot be streamed from (the relay's own verdict), or ``None``."""
    seen = slots.observe(conn, settings, current_identity(settings))
    if seen.slot is not None and seen.slot.plugin != "pgoutput":
        raise SetupError(
            f"slot {settings.slot_name} uses plugin {seen.slot.plugin!r}, not pgoutput: "
            "it is not this relay's; choose another CDC_SLOT_NAME"
        )
    verdict = assess(checkpoint, seen)
    return None if verdict.action is Action.STREAM else verdict.reason


def _drop_old_slot(conn: Conn, settings: RelaySettings) -> None:
    row = conn.execute(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s", (settings.slot_name,)
    ).fetchone()
    if row is None:
        return
    if row[0] is not None:
        raise SlotBusyError(
            f"slot {settings.slot_name} is in use by process {row[0]} (another relay streams "
            "from it): stop that relay, then run `cdc recover` again"
        )
    try:
        conn.execute("SELECT pg_drop_replication_slot(%s)", (settings.slot_name,))
    except psycopg.errors.UndefinedObject:
        pass  # gone meanwhile: nothing to drop
    except psycopg.errors.ObjectInUse as exc:
        raise SlotBusyError(
            f"slot {settings.slot_name} was taken while recovering ({exc}): stop the relay "
            "that holds it, then run `cdc recover` again"
        ) from exc


def recover(settings: RelaySettings) -> list[str]:
    """Run the recovery described in the module docstring; returns what it did."""
    with slots.connect(settings) as conn:
        checkpoint = store.load(conn, settings)
        if checkpoint is None:
            raise SetupError(f"nothing to recover for slot {settings.slot_name}: run `cdc setup`")
        problem = slot_problem(conn, settings, checkpoint)
        if problem is None:
            return [f"slot {settings.slot_name} is healthy: nothing to recover"]
        started = time.monotonic()
        store.mark_recovering(conn, settings)
        schema.ensure_publication(conn, settings)
        _drop_old_slot(conn, settings)
        with exported_slot(settings) as (created, reader):
            pin_session(reader)
            layout, table = table_layout(reader, settings)
            horizon = store.horizon(conn, settings, checkpoint)
            rows = SnapshotRows(layout, table, to_recover(horizon))
            sent = asyncio.run(
                publish_rows(
                    settings,
                    Metrics(),
                    layout,
                    functools.partial(rows.fetch, reader),
                    source="recovery",
                    snapshot=created.base_snapshot,
                )
            )
        store.finish_recovery(
            conn,
            settings,
            snapshot=created.base_snapshot,
            system_identifier=created.system_identifier,
            timeline=created.timeline,
            confirmed_lsn=format_lsn(created.consistent_lsn),
        )
    seconds = time.monotonic() - started
    return [
        f"slot {settings.slot_name} was lost: {problem}",
        f"created slot {settings.slot_name} at {format_lsn(created.consistent_lsn)} "
        f"(snapshot {created.base_snapshot})",
        f"recovered: published {sent} rows the checkpoint did not prove published "
        f"in {seconds:.1f}s; `cdc relay` streams from the new slot",
    ]
