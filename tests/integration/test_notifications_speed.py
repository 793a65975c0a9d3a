"""Webhooks at speed (real broker, PostgreSQL and HTTP receivers): the sends of the messages
in hand run concurrently outside the database transaction, a dead endpoint holds only its
own messages, a retry never POSTs again what was delivered, and a stop is quick.
"""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from harness.common import wait_for
from harness.fakes import WebhookReceiver
from psycopg import sql

from consumers.notifications.signing import idempotency_key
from consumers.notifications.store import schema_ddl

pytestmark = pytest.mark.integration


def _setup(env, domain, users: list[tuple[str, str]]) -> None:
    """Tables, and a webhook preference ``(user, url)`` each (in-app on)."""
    for stmt in schema_ddl(domain.schema):
        env.sql(stmt.encode())
    for user, url in users:
        env.sql(
            sql.SQL(
                "INSERT INTO {} (user_id, in_app, webhook, webhook_url) VALUES (%s, true, true, %s)"
            ).format(domain.table("notification_preferences")),
            (user, url),
        )


def _start(domain, secret: str, **extra):
    return domain.start(
        "notifications",
        webhook_secret=secret,
        webhook_allow_http="true",
        webhook_allowed_networks="127.0.0.0/8",
        **extra,
    )


def _records(env, domain) -> list[tuple[str, int]]:
    """Delivery records per channel."""
    return env.sql(
        sql.SQL("SELECT channel, count(*) FROM {} GROUP BY 1 ORDER BY 1").format(
            domain.table("notification_deliveries")
        )
    )


def _events(user: str, n: int) -> list[tuple[str, str, dict]]:
    return [
        ("device.started", str(uuid.uuid4()), {"userId": user, "deviceId": f"d{i}"})
        for i in range(n)
    ]


def test_webhooks_run_concurrently_over_reused_connections(env, domain):
    """60 events to an endpoint answering in 1 s: one at a time would take a minute."""
    receiver = WebhookReceiver(delay=1.0)
    try:
        _setup(env, domain, [("u1", receiver.url)])
        _start(domain, receiver.SECRET, webhook_timeout=10, webhook_concurrency=16)
        events = _events("u1", 60)
        started = time.monotonic()
        domain.publish(events)
        wait_for(lambda: len(receiver.accepted()) >= 60, 60, "60 webhooks")
        elapsed = time.monotonic() - started
        domain.wait_inbox("notifications", 60, timeout=30)
        assert set(receiver.accepted()) == {idempotency_key(m, "webhook") for _, m, _ in events}
        assert all(r.signature_ok for r in receiver.requests)
        assert len(receiver.requests) == 60  # each POSTed once
        # Bounded per endpoint, and actually concurrent up to that bound.
        assert 8 <= receiver.max_in_flight <= 16, receiver.max_in_flight
        assert elapsed < 20, f"{elapsed:.1f}s for 60 webhooks of 1 s each"
        notes = env.sql(sql.SQL("SELECT count(*) FROM {}").format(domain.table("notifications")))
        assert notes[0][0] == 60
    finally:
        receiver.close()


def test_a_timing_out_endpoint_does_not_delay_a_healthy_one(env, domain):
    """Ten events to an endpoint that never answers in time, interleaved with forty to a
    healthy one: the healthy ones arrive long before the dead ones time out, and the dead
    ones are retried (never written as done)."""
    healthy, dead = WebhookReceiver(), WebhookReceiver(delay=60)
    try:
        _setup(env, domain, [("good", healthy.url), ("bad", dead.url)])
        timeout = 8.0
        _start(domain, healthy.SECRET, webhook_timeout=timeout, worker_max_attempts=2)
        good, bad = _events("good", 40), _events("bad", 10)
        mixed = [e for pair in zip(bad, good[:10], strict=True) for e in pair] + good[10:]
        started = time.monotonic()
        domain.publish(mixed)
        wait_for(lambda: len(healthy.accepted()) >= 40, 60, "40 healthy webhooks")
        elapsed = time.monotonic() - started
        assert elapsed < timeout - 2, f"healthy webhooks took {elapsed:.1f}s"
        domain.wait_inbox("notifications", 40, timeout=30)
        assert domain.inbox_count("notifications") == 40  # the dead ones are not done
        assert {idempotency_key(m, "webhook") for _, m, _ in good} == set(healthy.accepted())
        # The dead endpoint's events fail after the timeout, are retried, then parked.
        wait_for(lambda: sum(n or 0 for n in domain.parked().values()) == 10, 90, "10 parked")
        assert domain.inbox_count("notifications") == 40
    finally:
        healthy.close()
        dead.close()


def test_a_failed_post_is_retried_alone_and_nothing_delivered_is_sent_again(env, domain):
    """Every first POST answers 500: each event is retried, and the retry POSTs once more
    (same key); the in-app row is written once, after the webhook went through."""
    receiver = WebhookReceiver(fail_first=True)
    try:
        _setup(env, domain, [("u1", receiver.url)])
        _start(domain, receiver.SECRET, webhook_timeout=5)
        events = _events("u1", 30)
        domain.publish(events)
        domain.wait_inbox("notifications", 30, timeout=60)
        keys = [r.headers["Idempotency-Key"] for r in receiver.requests]
        assert sorted(keys) == sorted(
            idempotency_key(m, "webhook") for _, m, _ in events for _ in range(2)
        )
        assert sorted(r.status for r in receiver.requests) == [200] * 30 + [500] * 30
        assert _records(env, domain) == [("in_app", 30), ("webhook", 30)]
    finally:
        receiver.close()


def test_a_stop_finishes_what_is_in_hand_quickly_and_loses_nothing(env, domain):
    """SIGTERM with a backlog and webhooks of 0.5 s in flight: the worker stops taking
    work, finishes and acks what it holds, and exits 0 in about one webhook's time (it used
    to work through the whole prefetch). A new worker then does the rest."""
    receiver = WebhookReceiver(delay=0.5)
    try:
        _setup(env, domain, [("u1", receiver.url)])
        worker = _start(domain, receiver.SECRET, webhook_timeout=10, webhook_concurrency=8)
        events = _events("u1", 300)
        domain.publish(events)
        wait_for(lambda: len(receiver.accepted()) >= 10, 60, "the first webhooks")
        asked = time.monotonic()
        code = worker.sigterm(timeout=30)
        took = time.monotonic() - asked
        assert code == 0, worker.tail()
        assert took < 4, f"the stop took {took:.1f}s"
        done = domain.inbox_count("notifications")
        assert done < 300  # stopped before the end
        _start(domain, receiver.SECRET, webhook_timeout=10, webhook_concurrency=32)
        domain.wait_inbox("notifications", 300, timeout=120)
        assert set(receiver.accepted()) == {idempotency_key(m, "webhook") for _, m, _ in events}
        posts = [r.headers["Idempotency-Key"] for r in receiver.requests]
        assert len(posts) == len(set(posts)), "a delivered webhook was POSTed again"
    finally:
        receiver.close()


@pytest.mark.parametrize("killed", [False, True], ids=["running", "killed-mid-retries"])
def test_a_dead_endpoint_that_comes_back_gets_every_event_exactly_once(env, domain, killed):
    """Events to an endpoint that times out (its breaker opens, every event goes around the
    retry queue, several times), which then answers again: every event is delivered, its
    webhook recorded once and its in-app row written once; nothing is parked. ``killed``: the
    worker is SIGKILLed while the retry copies circulate (where a kill can fall between a
    copy's confirm and its original's ack) and a new one takes over: nothing lost, and the
    duplicate copies change nothing."""
    receiver = WebhookReceiver(delay=60)
    settings = dict(
        webhook_timeout=1, webhook_breaker_failures=2, webhook_breaker_seconds=1,
        worker_retry_delays="1", worker_max_attempts=30,
    )
    try:
        _setup(env, domain, [("u1", receiver.url)])
        worker = _start(domain, receiver.SECRET, **settings)
        events = _events("u1", 40)
        domain.publish(events)
        wait_for(lambda: len(receiver.requests) + receiver.in_flight >= 2, 30, "the first POSTs")
        time.sleep(4)  # timeouts, an open breaker, retries through the TTL queue
        assert domain.inbox_count("notifications") == 0
        if killed:
            worker.sigkill()
            _start(domain, receiver.SECRET, **settings)
            time.sleep(2)  # the new worker's own timeouts and retries
        receiver.delay = 0.0
        domain.wait_inbox("notifications", 40, timeout=90)
        keys = {idempotency_key(m, "webhook") for _, m, _ in events}
        wait_for(lambda: set(receiver.accepted()) == keys, 30, "every key accepted")
        rows = env.sql(
            sql.SQL(
                "SELECT channel, count(*), count(DISTINCT message_id) FROM {} GROUP BY 1 ORDER BY 1"
            ).format(domain.table("notification_deliveries"))
        )
        assert rows == [("in_app", 40, 40), ("webhook", 40, 40)]
        notes = env.sql(sql.SQL("SELECT count(*) FROM {}").format(domain.table("notifications")))
        assert notes[0][0] == 40
        assert sum(n or 0 for n in domain.parked().values()) == 0
    finally:
        receiver.close()


def test_a_probe_does_not_hold_its_event_and_delivers_it_when_the_endpoint_is_back(env, domain):
    """An endpoint that never answers, breaker open: its probe (the first POST after the
    cooldown) runs on its own, and the event it carries goes back to the retry queue at
    once instead of being held for the probe's whole timeout (which would hold every later
    event's multiple ack). While that probe is in flight, the worker mostly holds nothing
    unacked and POSTs nothing else. When the endpoint answers again, the next probe
    delivers the event and records it: the event's next attempt does not POST it again."""
    receiver = WebhookReceiver(delay=60)
    timeout = 4.0
    try:
        _setup(env, domain, [("u1", receiver.url)])
        worker = _start(
            domain, receiver.SECRET, webhook_timeout=timeout, webhook_breaker_failures=1,
            webhook_breaker_seconds=1, worker_retry_delays="1", worker_max_attempts=50,
        )
        events = _events("u1", 1)
        domain.publish(events)
        # First contact holds the event for the timeout (nothing is known of the endpoint);
        # the retry after it is the probe.
        wait_for(lambda: receiver.started >= 2, 30, "the probe's POST")
        probe_started = time.monotonic()
        unacked = []
        while time.monotonic() - probe_started < timeout - 1:
            health = worker.healthz()
            if health is not None:
                unacked.append(health["unacked"])
            time.sleep(0.05)
        assert receiver.started == 2, "nothing POSTed while the probe is in flight"
        assert len(unacked) >= 10, unacked
        assert unacked.count(0) >= len(unacked) / 2, f"the probe's event was held: {unacked}"
        receiver.delay = 0.0  # back; the probe in flight still times out
        domain.wait_inbox("notifications", 1, timeout=60)
        key = idempotency_key(events[0][1], "webhook")
        assert list(receiver.accepted()) == [key]
        assert len(receiver.requests) == 1, "delivered once, by the second probe"
        assert receiver.started == 3
        assert _records(env, domain) == [("in_app", 1), ("webhook", 1)]
    finally:
        receiver.close()


def test_failed_events_of_a_batch_wait_in_one_retry_bundle_and_each_is_delivered_once(env, domain):
    """Events of one batch to an endpoint that refuses connections all fail at once and wait
    the same delay: ONE copy (a retry bundle) waits in the retry queue for all of them. When
    it comes back after the endpoint is fixed, each event is delivered exactly once."""
    receiver = WebhookReceiver()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    dead = f"http://127.0.0.1:{closed.getsockname()[1]}/hooks"
    n = 20
    try:
        _setup(env, domain, [("u1", dead)])
        settings = dict(
            webhook_breaker_failures=1000, worker_retry_delays="8", worker_max_attempts=5
        )
        _start(domain, receiver.SECRET, **settings).sigkill()  # its queues stay
        events = _events("u1", n)
        domain.publish(events)  # all in the queue before the next worker starts: one batch
        _start(domain, receiver.SECRET, **settings)
        retry = domain._names[-1].retry_queue_for(8).name
        wait_for(lambda: (env.broker.queue_count(retry) or 0) >= 1, 30, "a retry copy")
        time.sleep(1)  # any further copy of the same batch would be there by now
        assert env.broker.queue_count(retry) == 1
        env.sql(
            sql.SQL("UPDATE {} SET webhook_url = %s").format(
                domain.table("notification_preferences")
            ),
            (receiver.url,),
        )
        domain.wait_inbox("notifications", n, timeout=60)
        keys = {idempotency_key(m, "webhook") for _, m, _ in events}
        wait_for(lambda: set(receiver.accepted()) == keys, 30, "every key accepted")
        assert len(receiver.requests) == n  # each POSTed once once the endpoint answers
        rows = env.sql(
            sql.SQL(
                "SELECT channel, count(*), count(DISTINCT message_id) FROM {} GROUP BY 1 ORDER BY 1"
            ).format(domain.table("notification_deliveries"))
        )
        assert rows == [("in_app", n, n), ("webhook", n, n)]
        assert sum(v or 0 for v in domain.parked().values()) == 0
    finally:
        closed.close()
        receiver.close()
