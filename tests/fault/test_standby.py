"""Hot standby: a second relay on the same slot waits, then takes over when the first dies.

Relay A streams; relay B, started on the same slot, must report ``standby`` on /healthz (the
slot is active in A's walsender: SQLSTATE 55006 means wait and retry, not crash) and must not
disturb A. Writers keep committing; A is SIGKILLed; B must be streaming within 10 s, and no
event is lost.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TAKEOVER_LIMIT_S = 10.0


def test_standby_takes_over_after_sigkill(env):
    env.setup()
    a = env.relay(metrics=True)
    a.wait_streaming()
    active_pid = env.slot_info()["active_pid"]
    b = env.relay(metrics=True)
    b.wait_state("standby", timeout=30)
    health = b.healthz()
    assert health["slot"] == env.slot, health

    work = env.workload(writers=2, events_per_writer=1500, max_txn=30, rate_per_writer=300)
    work.start()
    env.wait_for(lambda: env.sink_count() > 300, 30, "A to publish")
    # B stays a standby and A keeps the slot for a while (several standby poll intervals)
    t_end = time.monotonic() + 2.0
    while time.monotonic() < t_end:
        assert b.state() == "standby", b.healthz()
        assert a.state() == "streaming"
        assert env.slot_info()["active_pid"] == active_pid
        time.sleep(0.1)
    assert b.alive() and a.alive()

    depth = env.sink_count()
    t0 = time.monotonic()
    a.sigkill()
    b.wait_streaming(timeout=TAKEOVER_LIMIT_S + 20)
    takeover = time.monotonic() - t0
    env.wait_for(lambda: env.sink_count() > depth + 50, 30, "B to publish")
    first_event_s = time.monotonic() - t0
    new_pid = env.slot_info()["active_pid"]
    assert new_pid is not None and new_pid != active_pid

    work.join(timeout=90)
    rows = env.fetch_rows()
    assert set(rows) == work.committed_ids
    env.wait_sink_count(len(rows), timeout=60)
    msgs = env.drain(len(rows), quiet=1.5, timeout=60)
    dups = env.check_exactly_once(msgs, rows, allow_duplicates=True)
    print(
        f"takeover: standby streaming {takeover:.2f}s after SIGKILL of the active relay, "
        f"publishing again after {first_event_s:.2f}s; {len(rows)} events, "
        f"{sum(n - 1 for n in dups.values())} duplicates"
    )
    assert takeover < TAKEOVER_LIMIT_S, f"takeover took {takeover:.1f}s"
    assert b.alive() and b.state() == "streaming"
