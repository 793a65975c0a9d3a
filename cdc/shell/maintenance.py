"""The relay's background upkeep, off the hot path: backfill progress gauges, periodic prune.

Every ``CDC_STATUS_INTERVAL`` seconds the checkpoint row's backfill counts are copied to
``cdc_backfill_rows_done`` / ``cdc_backfill_rows_total`` (a backfill runs in `cdc setup`,
possibly while this relay streams). When ``CDC_PRUNE_OLDER_THAN`` is set, a prune runs
every ``CDC_PRUNE_INTERVAL`` seconds (the first one after one interval). Blocking database
work runs in a worker thread on its own short-lived connection; a failure is logged and
tried again next time, it never stops the relay.
"""

from __future__ import annotations

import asyncio
import logging
import time

import psycopg

from cdc.config import RelaySettings
from cdc.errors import CdcError
from cdc.shell import horizon_store as store
from cdc.shell import slot as slots
from cdc.shell.metrics import Metrics
from cdc.shell.prune import prune

log = logging.getLogger(__name__)


def refresh_backfill(settings: RelaySettings, metrics: Metrics) -> None:
    """Copy the checkpoint row's backfill counts to the gauges (0/0 without a row)."""
    with slots.connect(settings) as conn:
        checkpoint = store.load(conn, settings)
    done = checkpoint.backfill_rows_done if checkpoint else 0
    total = checkpoint.backfill_rows_total if checkpoint else 0
    metrics.backfill_done.set(done)
    metrics.backfill_total.set(total)


async def run(settings: RelaySettings, metrics: Metrics) -> None:
    """Loop until cancelled."""
    older_than = settings.prune_after
    next_prune = time.monotonic() + settings.prune_interval
    while True:
        # Sleep first: a relay refused at start (bad password, no database) exits at once,
        # and its one error line must not be preceded by this task's own complaint.
        await asyncio.sleep(min(settings.status_interval, settings.prune_interval))
        try:
            await asyncio.to_thread(refresh_backfill, settings, metrics)
            if older_than is not None and time.monotonic() >= next_prune:
                next_prune = time.monotonic() + settings.prune_interval
                result = await asyncio.to_thread(prune, settings, older_than)
                metrics.pruned.inc(result.deleted)
                log.info("%s", result.summary(settings.prune_older_than))
        except (CdcError, OSError, psycopg.Error) as exc:
            # The relay streams on; a database hiccup here is retried next time.
            log.warning("background upkeep failed (tried again later): %s", exc)
