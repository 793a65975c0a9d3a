"""Concurrent writers: only committed work is published, exactly once, in commit order.

Four writer threads commit >= 12,000 events in transactions of 1..500 rows, mixed with aborted
transactions, transactions with a rolled-back savepoint, and two-phase ones (COMMIT PREPARED
and ROLLBACK PREPARED). One more prepared transaction stays pending through the whole run:
its rows must not appear while it is only prepared, and must appear after COMMIT PREPARED.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

WRITERS = 4
EVENTS_PER_WRITER = 3000
KINDS = {
    "commit": 0.55,
    "rollback": 0.12,
    "savepoint": 0.15,
    "2pc_commit": 0.12,
    "2pc_rollback": 0.06,
}


def test_concurrent_writers_exactly_once_in_commit_order(env):
    env.setup()
    relay = env.relay(metrics=True)
    relay.wait_streaming()

    held = [env.event("held.event", {"txn": "held", "seq": i}) for i in range(5)]
    held_gid = env.prepare(held, "held")

    t0 = time.monotonic()
    work = env.workload(
        writers=WRITERS, events_per_writer=EVENTS_PER_WRITER, max_txn=500, kinds=KINDS
    ).start()
    work.join(timeout=150)
    write_s = time.monotonic() - t0
    kinds = work.kinds_seen()
    assert set(kinds) == set(KINDS), f"every transaction kind ran: {kinds}"
    committed = work.committed_ids
    dropped = work.dropped_ids
    assert len(committed) >= 10_000 and dropped

    # The database agrees with what the writers think they committed.
    rows = env.fetch_rows()
    assert set(rows) == committed, "test bug: writers' bookkeeping differs from the table"
    assert not dropped & set(rows)

    msgs = env.drain(len(committed), quiet=2.0, timeout=120)
    stream_s = time.monotonic() - t0
    got = {m.message_id for m in msgs}
    assert not got & dropped, f"{len(got & dropped)} aborted/rolled-back rows were published"
    assert not got & {r["id"] for r in held}, "a prepared, uncommitted transaction was published"
    env.check_exactly_once(msgs, rows)
    ntxn = work.check_commit_order(msgs)
    print(
        f"{len(committed)} events in {ntxn} committed transactions ({kinds}); "
        f"{len(dropped)} aborted rows; written in {write_s:.1f}s, all received after "
        f"{stream_s:.1f}s"
    )

    # Now commit the transaction that stayed prepared all along: it arrives, last.
    last_lsn = max(m.commit_lsn for m in msgs)
    env.finish_prepared(held_gid, commit=True)
    late = env.drain(len(held), quiet=1.0, timeout=30)
    rows = env.fetch_rows()
    env.check_exactly_once(late, {r["id"]: rows[r["id"]] for r in held})
    assert [m.message_id for m in late] == [r["id"] for r in held]
    assert len({m.commit_lsn for m in late}) == 1
    assert late[0].commit_lsn > last_lsn

    # Nothing was parked, nothing republished, and the metrics saw every event.
    assert (env.broker.queue_count(env.parking_queue) or 0) == 0
    total = len(committed) + len(held)
    env.wait_for(
        lambda: relay.metric("cdc_events_published_total") == total,
        10,
        lambda: (
            f"cdc_events_published_total == {total} "
            f"(is {relay.metric('cdc_events_published_total')})"
        ),
    )
    assert relay.alive()


def test_a_publish_linger_keeps_every_event_once_in_commit_order(env):
    """CDC_PUBLISH_LINGER holds publishes back to share a write: paced writers' transactions
    still arrive exactly once, in commit order, and the slot confirms up to the end."""
    env.setup()
    relay = env.relay(metrics=True, publish_linger=0.05)
    relay.wait_streaming()
    work = env.workload(
        writers=2, events_per_writer=1500, max_txn=20, rate_per_writer=1000
    ).start()
    work.join(timeout=60)
    rows = env.fetch_rows()
    assert set(rows) == work.committed_ids and len(rows) == 3000
    msgs = env.drain(len(rows), quiet=1.0, timeout=60)
    env.check_exactly_once(msgs, rows)
    assert work.check_commit_order(msgs) > 100  # transactions, checked in order
    lsn = env.parse_lsn(env.sql("SELECT pg_current_wal_insert_lsn()::text")[0][0])
    env.wait_for(lambda: env.confirmed_flush_lsn() >= lsn, 15, "the slot to confirm the end")
    assert relay.state() == "streaming"
