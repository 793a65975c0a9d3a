"""An interrupted backfill resumes: `cdc setup --backfill pending` killed (SIGKILL) half-way,
then run again, publishes every pending row; only the batch in flight at the kill may come
twice (a batch is CDC_MAX_IN_FLIGHT rows)."""

from __future__ import annotations

import signal

import pytest
from conftest import Relay

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PENDING, BATCH = 10_000, 100


def test_killed_backfill_resumes_with_nothing_missing(env):
    env.create_seed_table()
    seeded = env.seed_poller_rows(PENDING, 500, 500)
    first = Relay(
        env.relay_env(max_in_flight=BATCH),
        env.tmp_path / "backfill-1.log",
        env.slot_active,
        name="backfill-1",
        argv=["-m", "cdc", "setup", "--backfill", "pending"],
    )
    env.relays.append(first)
    first.start()

    def half_way() -> bool:
        row = env.checkpoint() if first.alive() else None
        return bool(row and 2_000 <= row["backfill_rows_done"] <= 8_000)

    env.wait_for(half_way, 120, lambda: f"backfill half way\n{first.tail()}", interval=0.02)
    first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    first.wait_exit(10)
    stopped = env.checkpoint()
    assert stopped is not None and stopped["backfill_done"] is False
    done_at_kill = stopped["backfill_rows_done"]

    status = env.cdc("status")
    assert "NOT done" in status.stdout or "done=False" in status.stdout, status.stdout
    again = env.cdc("setup", "--backfill", "pending", env=env.relay_env(max_in_flight=BATCH),
                    timeout=240)  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "resumed backfill pending" in again.stderr

    expected = seeded["pending"] | seeded["failed"]
    msgs = env.drain(len(expected), quiet=2.0, timeout=120)
    copies: dict[str, int] = {}
    for m in msgs:
        copies[m.message_id] = copies.get(m.message_id, 0) + 1
    missing = expected - set(copies)
    assert not missing, f"{len(missing)} rows missing after the resume"
    assert set(copies) == expected, "rows the poller published were sent"
    twice = sum(1 for n in copies.values() if n > 1)
    assert twice <= BATCH, f"{twice} rows sent twice, more than one batch"
    row = env.checkpoint()
    assert row is not None and row["backfill_done"] is True
    print(
        f"\nbackfill killed at {done_at_kill}/{len(expected)} rows recorded; resumed: "
        f"0 missing, {twice} sent twice (bound: one batch of {BATCH})"
    )
