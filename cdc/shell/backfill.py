"""``cdc setup --backfill pending|all|since=<ISO time>``: the cutover from a polling relay.

Creates the slot with its exported snapshot (the cutover boundary B), writes the checkpoint
row (base B, mode, not done, rows_total), and publishes from B, in id order, the rows the
mode selects; everything committed after B comes from the slot's stream, so no row is
missed and none is sent by both. After every confirmed batch the row records the batch's
last id and the rows done, so an interrupted backfill is resumed by running the same
command again: it continues after that id, selecting the rows visible in B with
``pg_visible_in_snapshot`` (the exported snapshot died with the first run). A slot set up
without a backfill gets one the same way, from its recorded base snapshot. Progress
(done/total, rate, ETA) goes to stderr every few seconds.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from datetime import datetime
from typing import Any, TextIO

import psycopg

from cdc.config import RelaySettings
from cdc.core.horizon import BackfillMode, backfill_rows
from cdc.core.lsn import format_lsn
from cdc.core.progress import ProgressReport
from cdc.errors import ConfigError, SetupError
from cdc.shell import horizon_store as store
from cdc.shell import schema, slot_guard
from cdc.shell import slot as slots
from cdc.shell.metrics import Metrics
from cdc.shell.slot_create import exported_slot
from cdc.shell.snapshot_publish import (
    SESSION_SETTINGS,
    Batch,
    SnapshotRows,
    pin_session,
    publish_rows,
    table_layout,
)

Conn = psycopg.Connection[tuple[Any, ...]]


def run(
    settings: RelaySettings, mode: BackfillMode, since: datetime | None, out: TextIO = sys.stderr
) -> list[str]:
    """Set up (or resume) a backfill and publish it; returns what it did."""
    with slots.connect(settings) as conn:
        slots.check_server(conn)
        schema.ensure_table(conn, settings)
        schema.ensure_publication(conn, settings)
        if mode == "pending" and not store.has_status_column(conn, settings):
            raise ConfigError(
                f"{settings.outbox_table} has no status column, so no row is marked "
                "published: use --backfill all or --backfill since=<ISO time>"
            )
        checkpoint = store.load(conn, settings)
        if checkpoint is None:
            return _fresh(conn, settings, mode, since, out)
        # As plain `cdc setup`: a lost slot is refused (exit 5, run `cdc recover` first).
        slot_guard.open_slot(settings)
        was_mode, was_since = store.backfill_mode(checkpoint), checkpoint.backfill_since
        base, after = checkpoint.base_snapshot, checkpoint.backfill_after_id
        if was_mode == "none":
            # Set up without a backfill (or adopted): the base snapshot is the boundary.
            sent = _from_base(conn, settings, mode, since, base, None, 0, None, out)
            return [f"slot {settings.slot_name} had no backfill: published {sent} rows "
                    f"visible in its base snapshot {base}"]  # fmt: skip
        if (was_mode, was_since) != (mode, since):
            was = was_mode + (f"={was_since.isoformat()}" if was_since else "")
            raise SetupError(
                f"slot {settings.slot_name} was set up with backfill {was}; a backfill can "
                "only be resumed with the same mode (run the same command again)"
            )
        n, total = checkpoint.backfill_rows_done, checkpoint.backfill_rows_total
        if checkpoint.backfill_done:
            return [f"backfill {mode} of {n} rows already done; kept slot {settings.slot_name}"]
        sent = _from_base(conn, settings, mode, since, base, after, n, total, out)
        return [f"resumed backfill {mode} of slot {settings.slot_name} after id "
                f"{after}: published {sent} more rows"]  # fmt: skip


def _fresh(
    conn: Conn, settings: RelaySettings, mode: BackfillMode, since: datetime | None, out: TextIO
) -> list[str]:
    exists = conn.execute(
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s", (settings.slot_name,)
    ).fetchone()
    if exists and exists[0]:
        raise SetupError(
            f"slot {settings.slot_name} already exists without a checkpoint: a backfill needs "
            "the snapshot of a slot it creates. Stop the relay, drop the slot "
            f"(SELECT pg_drop_replication_slot('{settings.slot_name}')), then run this again"
        )
    with exported_slot(settings) as (created, reader):
        pin_session(reader)
        layout, table = table_layout(reader, settings)
        rows = SnapshotRows(layout, table, backfill_rows(mode, since, None))
        total = rows.count(reader)
        store.insert_backfill(
            conn, settings,
            system_identifier=created.system_identifier, timeline=created.timeline,
            confirmed_lsn=created.consistent_lsn, base_snapshot=created.base_snapshot,
            mode=mode, since=since, rows_total=total,
        )  # fmt: skip
        _show(out, f"created slot {settings.slot_name} at {format_lsn(created.consistent_lsn)} "
                   f"(snapshot {created.base_snapshot}); `cdc relay` may start now; "
                   f"backfill {mode}: {total} rows to publish")  # fmt: skip
        sent = _publish(conn, settings, rows, reader, created.base_snapshot, None, 0, total, out)
    return [f"backfill {mode}: published {sent} rows from before slot {settings.slot_name}"]


def _from_base(
    conn: Conn,
    settings: RelaySettings,
    mode: BackfillMode,
    since: datetime | None,
    base: str,
    after_id: str | None,
    done_before: int,
    total: int | None,
    out: TextIO,
) -> int:
    """Publish the rows visible in the recorded base snapshot (the exported one is gone).

    ``total`` None: a backfill that starts now on a slot set up without one; the row
    records its mode and count first.
    """
    options = " ".join(f"-c {name}={value.replace(' ', '')}" for name, value in SESSION_SETTINGS)
    url = settings.dsn()
    with psycopg.connect(url, autocommit=True, options=options) as reader:
        layout, table = table_layout(reader, settings)
        rows = SnapshotRows(layout, table, backfill_rows(mode, since, base))
        if total is None:
            total = rows.count(reader)
            store.start_backfill(conn, settings, mode, since, total)
        return _publish(conn, settings, rows, reader, base, after_id, done_before, total, out)


def _publish(
    conn: Conn,
    settings: RelaySettings,
    rows: SnapshotRows,
    reader: Conn,
    snapshot: str,
    after_id: str | None,
    done_before: int,
    total: int,
    out: TextIO,
) -> int:
    report = ProgressReport("backfill", total, done_before, time.monotonic())
    last = [after_id]

    def on_batch(batch: Batch) -> None:
        last[0] = batch.last_id
        done = done_before + batch.sent
        store.record_backfill(conn, settings, batch.last_id, done, done=False)
        _show(out, report.update(done, time.monotonic()))

    sent = asyncio.run(
        publish_rows(
            settings, Metrics(), rows.layout, functools.partial(rows.fetch, reader),
            source="backfill", snapshot=snapshot, after_id=after_id, on_batch=on_batch,
        )
    )
    store.record_backfill(conn, settings, last[0], done_before + sent, done=True)
    _show(out, report.update(done_before + sent, time.monotonic(), final=True))
    return sent


def _show(out: TextIO, line: str | None) -> None:
    if line is not None:
        print(line, file=out, flush=True)
