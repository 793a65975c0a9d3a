"""Publishing from a snapshot, killed half-way (SIGKILL), then run again.

- `cdc setup --backfill pending` resumes after the last recorded batch: every pending row
  arrives, only the batch in flight at the kill may come twice (CDC_MAX_IN_FLIGHT rows).
- `cdc recover` left the checkpoint in state `recovering`: the next run does it again
  (a new slot, the same rows), so nothing is skipped; the first run's rows come twice.
"""

from __future__ import annotations

import signal

import pytest
from harness.processes import Relay

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

PENDING, BATCH = 10_000, 100


def start_cdc(env, name: str, *args: str) -> Relay:
    """``python -m cdc ARGS`` in the background with batches of BATCH rows."""
    proc = Relay(
        env.relay_env(max_in_flight=BATCH),
        env.tmp_path / f"{name}.log",
        env.slot_active,
        name=name,
        argv=["-m", "cdc", *args],
    )
    env.relays.append(proc)
    return proc.start()


def test_killed_backfill_resumes_with_nothing_missing(env):
    env.create_seed_table()
    seeded = env.seed_poller_rows(PENDING, 500, 500)
    first = start_cdc(env, "backfill-1", "setup", "--backfill", "pending")

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


def test_killed_recovery_is_done_again(env):
    env.create_seed_table()
    assert env.cdc("setup", "--backfill", "all").returncode == 0
    # Written after the slot, never streamed (no relay ran), then the slot is lost.
    written = env.seed_poller_rows(5_000, 0, 0)["pending"]
    env.sql("SELECT pg_drop_replication_slot(%s)", (env.slot,))
    first = start_cdc(env, "recover-1", "recover")

    def half_way() -> bool:
        return first.alive() and 1_000 <= (env.broker.queue_count(env.sink_queue) or 0) < 4_000

    env.wait_for(half_way, 120, lambda: f"recovery half way\n{first.tail()}", interval=0.02)
    first.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    first.wait_exit(10)
    row = env.checkpoint()
    assert row is not None and row["state"] == "recovering"

    again = env.cdc("recover", env=env.relay_env(max_in_flight=BATCH), timeout=240)
    assert again.returncode == 0, again.stderr
    assert "was interrupted" in again.stderr
    msgs = env.drain(len(written), quiet=2.0, timeout=120)
    got = {m.message_id for m in msgs}
    assert written <= got, f"{len(written - got)} rows lost"
    twice = len(msgs) - len(got)
    row = env.checkpoint()
    assert row is not None and row["state"] == "ready"
    print(f"\nrecovery killed half-way and run again: 0 of {len(written)} lost, "
          f"{twice} sent twice (the first run's)")
