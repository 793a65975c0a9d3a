"""Attempt counting, the disposition of a message (ack, retry, park), broker names, and the
headers of copies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.errors import ConfigError, PermanentError, Retry
from consumers.runtime import headers as hdr
from consumers.runtime.dispatch import Rejected
from consumers.runtime.names import build_names
from consumers.runtime.policy import (
    Ack,
    Park,
    RetryLater,
    RetryRules,
    attempt_of,
    decide,
    delay_label,
    delays_used,
)
from consumers.runtime.prefetch import split_prefetch


@pytest.mark.parametrize(
    ("headers", "attempt"),
    [
        (None, 1),
        ({}, 1),
        ({"x-cdc-attempt": 1}, 2),
        ({"x-cdc-attempt": 3}, 4),
        ({"x-cdc-attempt": b"2"}, 3),  # a long string from another client
        ({"x-cdc-attempt": "junk"}, 1),
        ({"x-cdc-attempt": -5}, 1),
        # a quorum queue counts deliveries that ended without ack (a crashed worker)
        ({"x-delivery-count": 1}, 2),
        ({"x-cdc-attempt": 2, "x-delivery-count": 1}, 4),
        # x-death is the broker's; it never counts
        ({"x-death": [{"count": 7}]}, 1),
    ],
)
def test_attempt_is_counted_from_our_header_and_redeliveries(headers, attempt):
    assert attempt_of(headers) == attempt


DELAYS = (5.0, 10.0, 20.0)
RULES = RetryRules(4, DELAYS)
BOOM = RuntimeError("boom")  # any failure that is not PermanentError: retried
WHY = "RuntimeError: boom"


def test_a_handled_message_is_acked_with_no_copy():
    """Success and duplicate (the batch leaves no error): ack, whatever the attempt."""
    assert decide(1, None, RULES) == Ack()
    assert decide(9, None, RULES) == Ack()
    assert decide(1, None, RetryRules(1, ())) == Ack()


@pytest.mark.parametrize("kind", [hdr.KIND_NO_MESSAGE_ID, hdr.KIND_NO_ROUTE, hdr.KIND_VALIDATION])
@pytest.mark.parametrize("attempt", [1, 2, 4])
def test_a_rejected_message_is_parked_at_once_with_its_kind(kind, attempt):
    assert decide(attempt, Rejected(kind, "why not"), RULES) == Park(attempt, kind, "why not")


def test_default_ladder_is_three_growing_retries_then_park():
    steps = [decide(n, BOOM, RULES) for n in range(1, 5)]
    assert steps == [
        RetryLater(5.0, 1, WHY),
        RetryLater(10.0, 2, WHY),
        RetryLater(20.0, 3, WHY),
        Park(4, hdr.KIND_EXHAUSTED, WHY),
    ]


def test_retry_is_an_ordinary_failure_and_its_message_is_the_reason():
    assert decide(1, Retry("down"), RULES) == RetryLater(5.0, 1, "Retry: down")
    assert decide(4, Retry("down"), RULES) == Park(4, hdr.KIND_EXHAUSTED, "Retry: down")


def test_a_failure_that_names_its_duration_waits_a_long_enough_delay_in_use():
    """A dependency known to be down for 8 s (an open breaker): attempt 1 waits 10 s, not 5;
    for 25 s the longest delay in use (20 s); never shorter than the step's own delay, and
    the attempts still end in parking."""

    def after(seconds: float) -> Retry:
        return Retry("open", after=seconds)

    why = "Retry: open"
    assert decide(1, after(8), RULES) == RetryLater(10.0, 1, why)
    assert decide(1, after(25), RULES) == RetryLater(20.0, 1, why)
    assert decide(2, after(3), RULES) == RetryLater(10.0, 2, why)
    assert decide(4, after(25), RULES) == Park(4, hdr.KIND_EXHAUSTED, why)
    # only delays that have a queue: with 2 attempts only 5 s is in use
    assert decide(1, after(25), RetryRules(2, DELAYS)) == RetryLater(5.0, 1, why)


def test_permanent_failure_parks_at_once():
    failure = PermanentError("unknown plan")
    expected = Park(1, hdr.KIND_PERMANENT, "PermanentError: unknown plan")
    assert decide(1, failure, RULES) == expected
    assert decide(4, failure, RULES) == Park(4, hdr.KIND_PERMANENT, expected.reason)


def test_last_delay_repeats_and_extra_delays_are_unused():
    rules = RetryRules(6, (1.0, 2.0))
    assert [decide(n, BOOM, rules) for n in range(1, 7)] == [
        RetryLater(1.0, 1, WHY),
        RetryLater(2.0, 2, WHY),
        RetryLater(2.0, 3, WHY),
        RetryLater(2.0, 4, WHY),
        RetryLater(2.0, 5, WHY),
        Park(6, hdr.KIND_EXHAUSTED, WHY),
    ]
    assert delays_used(6, (1.0, 2.0)) == (1.0, 2.0)
    assert delays_used(2, DELAYS) == (5.0,)
    assert delays_used(1, DELAYS) == ()
    assert decide(1, BOOM, RetryRules(1, DELAYS)) == Park(1, hdr.KIND_EXHAUSTED, WHY)
    assert decide(1, BOOM, RetryRules(4, ())) == Park(1, hdr.KIND_EXHAUSTED, WHY)


def test_attempts_beyond_the_limit_park():
    # redeliveries after crashes can push the count past the limit
    assert decide(9, BOOM, RULES) == Park(9, hdr.KIND_EXHAUSTED, WHY)


@given(
    attempt=st.integers(1, 20),
    max_attempts=st.integers(1, 10),
    delays=st.lists(st.sampled_from([0.2, 1.0, 5.0, 30.0]), min_size=1, max_size=5),
    after=st.sampled_from([0.0, 0.5, 3.0, 60.0]),
)
def test_an_ordinary_failure_retries_in_a_declared_queue_until_the_attempts_run_out(
    attempt, max_attempts, delays, after
):
    """Every retry waits in a TTL queue the worker declares, at least its step's delay; the
    last attempt and any later one park, as exhausted."""
    rules = RetryRules(max_attempts, tuple(delays))
    step = decide(attempt, Retry("x", after=after), rules)
    if attempt >= max_attempts:
        assert step == Park(attempt, hdr.KIND_EXHAUSTED, "Retry: x")
    else:
        assert isinstance(step, RetryLater)
        assert step.attempts == attempt
        assert step.delay in delays_used(max_attempts, rules.delays)
        assert step.delay >= delays[min(attempt, len(delays)) - 1]


def test_delay_labels_and_names():
    assert [delay_label(d) for d in (5.0, 0.2, 10, 1.5)] == ["5s", "0.2s", "10s", "1.5s"]
    queues = (("billing-service.device-started", ("device.started",)),)
    names = build_names("p.", "billing-service", queues, 4, DELAYS)
    assert names.queues == (("p.billing-service.device-started", ("device.started",)),)
    assert names.retry_exchange == "p.billing-service.retry"
    assert [(q.name, q.ttl_ms) for q in names.retry_queues] == [
        ("p.billing-service.retry.5s", 5000),
        ("p.billing-service.retry.10s", 10000),
        ("p.billing-service.retry.20s", 20000),
    ]
    assert names.parking_queue == "p.billing-service.parked"
    assert names.retry_queue_for(10.0).name == "p.billing-service.retry.10s"
    with pytest.raises(KeyError):
        names.retry_queue_for(7.0)


RELAY_HEADERS = {
    "aggregate_type": "device",
    "aggregate_id": "d1",
    "commit_lsn": "0/1",
    "x-death": [{"count": 1}],
    "x-delivery-count": 2,
}


def test_retry_headers_carry_attempts_key_and_origin_and_drop_broker_ones():
    h = hdr.retry_headers(
        RELAY_HEADERS,
        attempts=3,
        routing_key="device.started",
        origin_queue="billing.q",
        retry_queue="billing.retry.5s",
    )
    assert h == {
        "aggregate_type": "device",
        "aggregate_id": "d1",
        "commit_lsn": "0/1",
        "x-cdc-attempt": 3,
        "x-cdc-routing-key": "device.started",
        "x-cdc-origin-queue": "billing.q",
        hdr.RETRY_QUEUE_HEADER: "billing.retry.5s",
    }
    # the retry exchange is a headers exchange, which ignores x-* keys when matching
    assert not hdr.RETRY_QUEUE_HEADER.startswith("x-")
    # after the next failure, the next attempt number follows from the copy's headers
    assert attempt_of(h) == 4


def test_parking_headers_say_why_how_often_and_from_where():
    long_error = "E" * 5000
    h = hdr.parking_headers(
        {**RELAY_HEADERS, hdr.RETRY_QUEUE_HEADER: "old"},
        attempts=4,
        routing_key="device.started",
        origin_queue="billing.q",
        kind=hdr.KIND_EXHAUSTED,
        error=long_error,
        consumer="billing",
        parked_at="2024-01-01T00:00:00+00:00",
    )
    assert h["x-cdc-attempt"] == 4
    assert h["x-cdc-routing-key"] == "device.started"
    assert h["x-cdc-origin-queue"] == "billing.q"
    assert h["x-cdc-error-kind"] == "exhausted"
    assert h["x-cdc-error"] == "E" * hdr.MAX_ERROR_CHARS
    assert h["x-cdc-consumer"] == "billing"
    assert "x-death" not in h and "x-delivery-count" not in h
    assert hdr.RETRY_QUEUE_HEADER not in h
    assert h["aggregate_id"] == "d1"


def test_replay_headers_reset_attempts_but_keep_routing():
    parked = hdr.parking_headers(
        RELAY_HEADERS,
        attempts=4,
        routing_key="device.started",
        origin_queue="billing.q",
        kind="exhausted",
        error="boom",
        consumer="billing",
        parked_at="t",
    )
    h = hdr.replay_headers(parked)
    assert attempt_of(h) == 1
    assert h["x-cdc-routing-key"] == "device.started"
    assert h["x-cdc-origin-queue"] == "billing.q"
    assert not any(k in h for k in ("x-cdc-error", "x-cdc-error-kind", "x-cdc-parked-at"))
    assert h["commit_lsn"] == "0/1"


def test_original_routing_key_prefers_our_header():
    assert hdr.original_routing_key({"x-cdc-routing-key": b"device.started"}, "q") == (
        "device.started"
    )
    assert hdr.original_routing_key({}, "device.stopped") == "device.stopped"
    assert hdr.original_routing_key(None, "k") == "k"


def test_describe_names_the_exception_type():
    assert hdr.describe(ValueError("bad rate")) == "ValueError: bad rate"
    assert hdr.describe(TimeoutError()) == "TimeoutError"


def test_committed_at_prefers_the_relays_commit_time():
    import datetime as dt

    ts = dt.datetime(2024, 5, 1, 12, 0, 0)
    assert hdr.committed_at({"commit_time": "2024-05-01T12:00:01.5+00:00"}, ts) == (
        dt.datetime(2024, 5, 1, 12, 0, 1, 500000, tzinfo=dt.UTC).timestamp()
    )
    assert hdr.committed_at({"commit_time": b"2024-05-01T12:00:01+00:00"}, None) == (
        dt.datetime(2024, 5, 1, 12, 0, 1, tzinfo=dt.UTC).timestamp()
    )
    # AMQP timestamps arrive naive, in UTC
    assert hdr.committed_at({"commit_time": "junk"}, ts) == ts.replace(tzinfo=dt.UTC).timestamp()
    assert hdr.committed_at({}, None) is None


# -- which deliveries the runtime's own headers are trusted on -------------------------------

SPOOFED = {
    "x-cdc-attempt": 3,
    "x-cdc-routing-key": "user.updated",
    "X-CDC-Origin-Queue": "svc.q",
    "x-cdc-error-kind": "permanent",
    "traceparent": "t",
}


@pytest.mark.parametrize(
    ("exchange", "queue", "headers", "trusted"),
    [
        ("", "svc.q", {"x-cdc-origin-queue": "svc.q"}, True),  # retry dead-letter or replay
        (None, "svc.q", {"x-cdc-origin-queue": b"svc.q"}, True),
        ("cloudphone.events", "svc.q", {"x-cdc-origin-queue": "svc.q"}, False),  # an event
        ("", "svc.q", {"x-cdc-origin-queue": "svc.other"}, False),  # another queue's copy
        ("", "svc.q", {}, False),
        ("", "svc.q", None, False),
    ],
)
def test_own_headers_are_trusted_only_on_own_copies(exchange, queue, headers, trusted):
    assert hdr.came_back(exchange, queue, headers) is trusted


def test_untrusted_delivery_loses_every_runtime_key():
    view = hdr.own_headers(SPOOFED, trusted=False)
    assert view == {"traceparent": "t"}
    assert hdr.original_routing_key(view, "device.started") == "device.started"
    assert attempt_of(view) == 1
    assert hdr.own_headers(SPOOFED, trusted=True) == SPOOFED
    assert hdr.own_headers(None, trusted=False) == {}


def test_delivery_count_counts_only_on_a_redelivery():
    spoofed = {"x-delivery-count": 9}
    assert attempt_of(spoofed, redelivered=False) == 1
    assert attempt_of(spoofed, redelivered=True) == 10


@pytest.mark.parametrize(
    ("total", "n", "shares"),
    [(256, 1, [256]), (256, 5, [52, 51, 51, 51, 51]), (64, 7, [10, 9, 9, 9, 9, 9, 9]),
     (5, 5, [1, 1, 1, 1, 1]), (12, 4, [3, 3, 3, 3])],
)
def test_prefetch_budget_is_split_across_consumers(total, n, shares):
    assert split_prefetch(total, n) == shares
    assert sum(shares) == total


def test_prefetch_smaller_than_the_queues_is_a_config_error():
    with pytest.raises(ConfigError, match=r"CDC_WORKER_PREFETCH=4 .* 5 queues"):
        split_prefetch(4, 5)
