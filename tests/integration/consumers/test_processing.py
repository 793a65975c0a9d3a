"""The runtime against the real broker and database, through ``python -m consumers``.

One ledger worker per test (``tests/workers/ledger.py``); retry delays 0.2/0.4/0.8 s.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid

import pytest

pytestmark = pytest.mark.integration


def test_topology_is_declared_idempotently(ledger):
    w = ledger.start()
    assert ledger.broker.exchange_exists(ledger.exchange)
    assert ledger.broker.exchange_exists(ledger.retry_exchange)
    for q in [ledger.queue, *ledger.retry_queues, ledger.parking_queue]:
        assert ledger.broker.queue_count(q) == 0, q
    # a second start re-declares the same topology without error
    assert w.sigterm() == 0
    w2 = ledger.start()
    ledger.publish([ledger.entry("a", 5)])
    ledger.wait_rows(1)
    assert w2.sigterm() == 0


def test_duplicate_event_has_one_effect_and_is_counted(ledger):
    w = ledger.start()
    mid = str(uuid.uuid4())
    # same event twice in a row (likely one batch), then once more later (another batch)
    ledger.publish([ledger.entry("a", 7), ledger.entry("a", 7)], message_ids=[mid, mid])
    ledger.wait_rows(1)
    ledger.publish([ledger.entry("a", 7)], message_ids=[mid])
    ledger.wait_for(
        lambda: (w.metric("cdc_worker_duplicates_total") or 0) >= 2,
        20,
        lambda: f"duplicates counted\n{w.metrics()}",
    )
    assert ledger.rows() == [(mid, "a", 7, 1, w.pid)]
    assert ledger.inbox_ids() == [mid]
    assert w.metric("cdc_worker_processed_total", queue=ledger.queue) == 1
    assert w.metric("cdc_worker_duplicates_total", queue=ledger.queue) == 2
    # the consumer-acked lag: commit (here the AMQP timestamp, whole seconds) to ack
    age = w.metric("cdc_worker_event_age_seconds", queue=ledger.queue)
    assert age is not None and 0 <= age < 30, age
    assert ledger.broker.queue_count(ledger.queue) == 0
    assert w.sigterm() == 0


def test_poison_message_is_tried_n_times_with_growing_delays_then_parked(ledger):
    # steps wider than the latency slack below, so the gaps' order cannot flip under load
    ledger.use_retry_delays(0.2, 1.0, 2.0)
    w = ledger.start()
    other = ledger.other_service_queue()  # another service bound to every event
    [mid] = ledger.publish([ledger.entry("p", 1, fail="always")])
    ledger.wait_parked(1, timeout=30)
    tries = ledger.attempts()[mid]
    assert [a for a, _ in tries] == [1, 2, 3, 4], tries
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(tries)]
    # measured gaps follow the configured ladder (TTL expiry + one batch of latency)
    for gap, delay in zip(gaps, ledger.RETRY_DELAYS, strict=True):
        assert delay * 0.95 <= gap <= delay + 0.6, (gaps, ledger.RETRY_DELAYS)
    assert gaps[0] < gaps[1] < gaps[2], gaps
    [parked] = ledger.broker.drain(ledger.parking_queue, expected=1, quiet=0.3, timeout=15)
    h = parked.headers
    assert parked.message_id == mid
    assert h["x-cdc-attempt"] == 4
    assert h["x-cdc-error-kind"] == "exhausted"
    assert "asked to fail" in h["x-cdc-error"]
    assert h["x-cdc-routing-key"] == "ledger.entry"
    assert h["x-cdc-origin-queue"] == ledger.queue
    assert json.loads(parked.body) == ledger.entry("p", 1, fail="always")
    assert parked.delivery_mode == 2
    assert ledger.rows() == [] and ledger.inbox_ids() == []
    # every retry queue is empty again: the copy went back to its origin queue each time
    for q in ledger.retry_queues:
        assert ledger.broker.queue_count(q) == 0, q
    assert w.metric("cdc_worker_retried_total") == 3
    assert w.metric("cdc_worker_parked_total", reason="exhausted") == 1
    # the retries went back to the ledger's queue only: the other service saw the event once
    assert [m.message_id for m in ledger.broker.drain(other, quiet=0.3, timeout=10)] == [mid]
    assert w.sigterm() == 0


def test_transient_failure_succeeds_on_a_later_attempt(ledger):
    w = ledger.start()
    [mid] = ledger.publish([ledger.entry("t", 3, fail="times", fail_times=2)])
    ledger.wait_rows(1, timeout=20)
    assert ledger.rows() == [(mid, "t", 3, 3, w.pid)]  # the effect of attempt 3, once
    assert [a for a, _ in ledger.attempts()[mid]] == [1, 2, 3]
    assert ledger.broker.queue_count(ledger.parking_queue) == 0
    assert w.sigterm() == 0


# (A message without message_id is parked too, see tests/unit: aiormq, used here to publish,
# always fills one in, so it cannot be sent from this test.)
@pytest.mark.parametrize(
    ("routing_key", "body", "mid", "kind", "words"),
    [
        ("ledger.entry", {"key": "v", "amount": "lots"}, "auto", "validation", ["amount"]),
        ("ledger.entry", b"{not json", "auto", "validation", ["Invalid JSON"]),
        ("unrouted.thing", {"key": "v", "amount": 1}, "auto", "no-route", ["unrouted.thing"]),
        ("ledger.entry", {"key": "v", "amount": 1, "fail": "permanent"}, "auto", "permanent",
         ["PermanentError"]),
    ],
)
def test_permanent_errors_are_parked_at_once(ledger, routing_key, body, mid, kind, words):
    w = ledger.start()
    ids = ledger.publish([body], routing_key=routing_key, message_ids=None if mid else [None])
    # a good event after it shows the worker went on
    ledger.publish([ledger.entry("ok", 1)])
    ledger.wait_rows(1)
    [parked] = ledger.broker.drain(ledger.parking_queue, expected=1, quiet=0.3, timeout=15)
    h = parked.headers
    assert h["x-cdc-attempt"] == 1
    assert h["x-cdc-error-kind"] == kind
    for word in words:
        assert word in h["x-cdc-error"], h["x-cdc-error"]
    assert h["x-cdc-routing-key"] == routing_key
    assert h["x-cdc-origin-queue"] == ledger.queue
    if mid:
        assert parked.message_id == ids[0]
    # no retry happened: one attempt at most, nothing in the retry queues
    assert len(ledger.attempts().get(str(ids[0]), [])) <= 1
    time.sleep(0.3)
    assert all(ledger.broker.queue_count(q) == 0 for q in ledger.retry_queues)
    assert [r[1] for r in ledger.rows()] == ["ok"]
    assert w.metric("cdc_worker_parked_total", reason=kind) == 1
    assert w.sigterm() == 0


@pytest.mark.parametrize("db_only", [False, True], ids=["savepoints", "db-only"])
def test_failing_message_rolls_back_only_its_own_effects(ledger, db_only):
    # Failures in the middle of batches: the others commit, each exactly once. With
    # db_only the batch first runs pipelined without savepoints, then again with them after
    # a failure (an SQL error surfaces late in a pipeline: it must still hit only its message).
    bodies = [ledger.entry(f"k{i}", i) for i in range(400)]
    bad = {25, 26, 150, 399}
    for i in bad:
        bodies[i] = ledger.entry("bad", 0, fail="permanent")
    bad.add(300)
    bodies[300] = ledger.entry("sql", 0, fail="sql")
    bodies[200] = ledger.entry("late", 1, fail="times", fail_times=1)
    w = ledger.start(
        worker_batch_size=100, worker_prefetch=400, worker_max_attempts=2, ledger_db_only=db_only
    )
    ids = ledger.publish(bodies)
    ledger.wait_parked(len(bad))
    ledger.wait_rows(len(ids) - len(bad))
    time.sleep(0.3)
    got = [r[0] for r in ledger.rows()]
    assert len(got) == len(set(got))
    assert set(got) == set(ids) - {ids[i] for i in bad}
    assert sorted(ledger.inbox_ids()) == sorted(got)
    assert w.metric("cdc_worker_processed_total") == len(got)
    parked = ledger.broker.drain(ledger.parking_queue, expected=len(bad), quiet=0.3, timeout=15)
    by_id = {m.message_id: m.headers for m in parked}
    assert by_id[ids[300]]["x-cdc-error-kind"] == "exhausted"
    assert "division by zero" in by_id[ids[300]]["x-cdc-error"]
    assert by_id[ids[300]]["x-cdc-attempt"] == 2
    assert w.sigterm() == 0


def test_copies_confirmed_beside_later_batches_ack_each_message_once_in_order(ledger):
    # One message in five fails once: its retry copy's confirm no longer holds the batches
    # behind it, and the acks of those batches go out while copies are still unconfirmed.
    # An ack out of the tracker's order (a multiple one ahead of an earlier single one)
    # would make the broker close the channel: the worker would reconnect, and count it.
    n = 1500
    bodies = [
        ledger.entry(f"k{i}", i, **({"fail": "times", "fail_times": 1} if i % 5 == 0 else {}))
        for i in range(n)
    ]
    w = ledger.start(worker_batch_size=50, worker_prefetch=300)
    ids = ledger.publish(bodies)
    ledger.wait_rows(n, timeout=90)
    ledger.wait_for(
        lambda: ledger.broker.queue_count(ledger.queue) == 0
        and (w.healthz() or {}).get("unacked") == 0,
        20,
        lambda: f"every delivery acked\n{w.healthz()}",
    )
    attempts = {r[0]: r[3] for r in ledger.rows()}
    assert len(ledger.rows()) == n  # each effect once
    assert attempts == {mid: 2 if i % 5 == 0 else 1 for i, mid in enumerate(ids)}
    assert w.metric("cdc_worker_retried_total") == n // 5
    assert w.metric("cdc_worker_reconnects_total", side="broker") == 0
    assert ledger.broker.queue_count(ledger.parking_queue) == 0
    assert w.sigterm() == 0


def test_parked_messages_show_in_a_metric_and_healthz(ledger):
    w = ledger.start()
    ledger.publish([ledger.entry("x", 1, fail="permanent"), ledger.entry("y", 1, fail="permanent")])
    ledger.wait_parked(2)
    ledger.wait_for(
        lambda: w.metric("cdc_worker_parked_messages", queue=ledger.parking_queue) == 2,
        10,
        lambda: w.metrics(),
    )
    assert w.healthz()["state"] == "consuming"
    assert w.sigterm() == 0


def test_conflicting_existing_queue_is_a_config_error(ledger):
    # an existing classic queue of the same name (as the seed platform has them)
    ledger.broker.declare_queue(ledger.queue)
    w = ledger.start(wait=False)
    assert w.wait_exit(30) == 2
    assert "CDC_WORKER_QUEUE_TYPE" in w.log()
    # with the matching type the worker starts on that queue
    w2 = ledger.start(worker_queue_type="classic")
    ledger.publish([ledger.entry("c", 1)])
    ledger.wait_rows(1)
    assert w2.sigterm() == 0


def test_missing_parking_queue_is_redeclared_and_nothing_is_lost(ledger):
    w = ledger.start()
    ledger.broker.delete_queue(ledger.parking_queue)  # an operator deleted it under the worker
    [mid] = ledger.publish([ledger.entry("x", 1, fail="permanent")])
    # the copy is returned (no queue), the original is not acked, the session restarts,
    # re-declares the topology and parks it
    ledger.wait_parked(1, timeout=20)
    [parked] = ledger.broker.drain(ledger.parking_queue, expected=1, quiet=0.3, timeout=15)
    assert parked.message_id == mid
    assert (w.metric("cdc_worker_reconnects_total", side="broker") or 0) >= 1
    assert w.sigterm() == 0


def test_metrics_port_in_use_is_a_config_error(ledger):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        w = ledger.start(wait=False, metrics=False, worker_metrics_port=port)
        assert w.wait_exit(30) == 2
    assert "CDC_WORKER_METRICS_PORT" in w.log()
