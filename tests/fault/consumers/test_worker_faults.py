"""Worker processes under SIGKILL, SIGTERM, replicas, and cut database/broker connections.

The ground truth is the ledger table: every published event must have exactly one row
(``count(*) == count(distinct message_id) == published``), whatever happened in between.
"""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = pytest.mark.integration


def _exactly_once(ledger, ids):
    rows = ledger.rows()
    got = [r[0] for r in rows]
    assert len(got) == len(set(got)), f"{len(got) - len(set(got))} doubled effects"
    missing = set(ids) - set(got)
    assert not missing, f"{len(missing)} of {len(ids)} effects lost"
    assert set(got) <= set(ids)
    assert sorted(ledger.inbox_ids()) == sorted(got)
    return rows


def _publish_in_background(ledger, bodies):
    out: dict[str, list] = {}

    def run() -> None:
        out["ids"] = ledger.publish(bodies)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.mark.parametrize("db_only", [False, True], ids=["savepoints", "db-only"])
def test_sigkill_mid_batch_then_restart_every_effect_once(ledger, db_only):
    n = 3000
    w = ledger.start(worker_prefetch=500, worker_batch_size=200, ledger_db_only=db_only)
    t, out = _publish_in_background(ledger, [ledger.entry(f"k{i}", i) for i in range(n)])
    ledger.wait_rows(600)
    w.sigkill()  # mid-stream: a batch is open, hundreds are prefetched and unacked
    t.join(60)
    killed_at = ledger.row_count()
    assert killed_at < n, "the kill came too late to prove anything"
    w2 = ledger.start(worker_prefetch=500, worker_batch_size=200, ledger_db_only=db_only)
    ledger.wait_rows(n, timeout=60)
    time.sleep(0.5)  # anything doubled would show up now
    rows = _exactly_once(ledger, out["ids"])
    assert len(rows) == n
    # redelivered messages are counted as attempts (quorum x-delivery-count), never re-applied
    assert {r[4] for r in rows} <= {w.pid, w2.pid}
    assert ledger.broker.queue_count(ledger.queue) == 0
    assert w2.sigterm() == 0


def test_two_replicas_share_the_queue_and_effects_stay_exact(ledger):
    n = 3000
    a = ledger.start(worker_prefetch=100, worker_batch_size=50)
    b = ledger.start(worker_prefetch=100, worker_batch_size=50)
    ids = ledger.publish([ledger.entry(f"k{i}", 1) for i in range(n)])
    # and the same events again: duplicates may land on either replica
    ledger.publish([ledger.entry(f"k{i}", 1) for i in range(0, n, 3)], message_ids=ids[::3])
    ledger.wait_rows(n)
    ledger.wait_for(lambda: ledger.broker.queue_count(ledger.queue) == 0, 30, "queue drained")
    time.sleep(0.5)
    rows = _exactly_once(ledger, ids)
    by_pid = {pid: sum(1 for r in rows if r[4] == pid) for pid in (a.pid, b.pid)}
    assert all(count > 0 for count in by_pid.values()), by_pid
    processed = [w.metric("cdc_worker_processed_total") for w in (a, b)]
    duplicates = [w.metric("cdc_worker_duplicates_total") for w in (a, b)]
    assert sum(processed) == n, processed
    assert sum(duplicates) == len(ids[::3]), duplicates
    assert a.sigterm() == 0 and b.sigterm() == 0


def test_sigterm_finishes_and_acks_in_flight_then_exits_0(ledger):
    w = ledger.start(worker_prefetch=10, worker_batch_size=5, worker_shutdown_timeout=15)
    ids = ledger.publish([ledger.entry(f"s{i}", 1, sleep_ms=100) for i in range(30)])
    ledger.wait_rows(1)
    t0 = time.monotonic()
    code = w.sigterm(timeout=20)
    took = time.monotonic() - t0
    assert code == 0, w.tail()
    # in flight were at most prefetch=10 messages of 0.1 s each
    assert took < 3.0, took
    done = {r[0] for r in _exactly_once(ledger, ids[: ledger.row_count()])}
    # nothing half-done: what is not in the ledger is still ready in the queue, none unacked
    ready = ledger.broker.queue_count(ledger.queue)
    assert len(done) + ready == len(ids), (len(done), ready)
    assert ledger.consumers() == 0
    # the rest is processed by the next start, once
    w2 = ledger.start()
    ledger.wait_rows(len(ids))
    _exactly_once(ledger, ids)
    assert w2.sigterm() == 0


def test_shutdown_timeout_bounds_a_stuck_drain(ledger):
    w = ledger.start(worker_prefetch=4, worker_batch_size=4, worker_shutdown_timeout=0.5)
    ledger.publish([ledger.entry(f"slow{i}", 1, sleep_ms=3000) for i in range(4)])
    ledger.wait_for(lambda: ledger.attempts(), 10, "a handler to start")
    t0 = time.monotonic()
    assert w.sigterm(timeout=10) == 4  # drain timed out: nothing acked, all redelivered
    assert time.monotonic() - t0 < 2.5
    assert ledger.rows() == []
    ledger.wait_for(lambda: ledger.broker.queue_count(ledger.queue) == 4, 10, "4 requeued")


def test_database_connection_killed_mid_stream(ledger):
    n = 3000
    w = ledger.start(worker_prefetch=300, worker_batch_size=100)
    t, out = _publish_in_background(ledger, [ledger.entry(f"d{i}", 1) for i in range(n)])
    ledger.wait_rows(300)
    killed = 0
    for _ in range(3):
        killed += len(
            ledger.sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (f"cdc-worker:{ledger.consumer}",),
            )
        )
        time.sleep(0.3)
    assert killed >= 1
    t.join(60)
    ledger.wait_rows(n, timeout=60)
    time.sleep(0.5)
    assert len(_exactly_once(ledger, out["ids"])) == n
    assert (w.metric("cdc_worker_reconnects_total", side="database") or 0) >= 1
    assert w.sigterm() == 0


def test_broker_connection_cut_mid_stream(ledger, tcp_proxy):
    n = 3000
    w = ledger.start(amqp_url=tcp_proxy.url(), worker_prefetch=300, worker_batch_size=100)
    t, out = _publish_in_background(ledger, [ledger.entry(f"b{i}", 1) for i in range(n)])
    ledger.wait_rows(300)
    assert tcp_proxy.cut() >= 1
    ledger.wait_for(
        lambda: (w.metric("cdc_worker_reconnects_total", side="broker") or 0) >= 1,
        20,
        lambda: w.tail(),
    )
    t.join(60)
    ledger.wait_rows(n, timeout=60)
    time.sleep(0.5)
    assert len(_exactly_once(ledger, out["ids"])) == n
    w.wait_state("consuming", 20)
    assert w.sigterm() == 0


def test_a_queue_deleted_under_the_worker_is_declared_again_and_consumed(ledger):
    # The broker cancels the consumer of a deleted queue: the worker must start a new
    # session (which declares the queue again) rather than sit on a channel with no consumer.
    w = ledger.start()
    first = ledger.publish([ledger.entry(f"a{i}", 1) for i in range(50)])
    ledger.wait_rows(50)
    ledger.broker.delete_queue(ledger.queue)
    ledger.wait_for(
        lambda: (w.metric("cdc_worker_reconnects_total", side="broker") or 0) >= 1,
        20,
        lambda: w.tail(),
    )
    ledger.wait_consuming(w)
    second = ledger.publish([ledger.entry(f"b{i}", 1) for i in range(50)])
    ledger.wait_rows(100, timeout=60)
    assert len(_exactly_once(ledger, first + second)) == 100
    assert w.sigterm() == 0
