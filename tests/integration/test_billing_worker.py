"""The billing worker through the real broker: a shuffled, duplicated event set ends in the
tables the pure metering computes from the set; with two replicas as well. Each event
arrives on its own seed queue (``billing-service.device-started`` ...), so starts and stops
reach the worker in no particular order on top of the shuffle."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from harness.billing_scenario import PRICING, delivery_order, expected, record_rows, scenario
from psycopg import sql

from consumers.billing.metering import balance_low_id

pytestmark = pytest.mark.integration
INITIAL = Decimal("60")
THRESHOLD = Decimal("15")


def _pricing() -> dict[str, object]:
    """The billing settings of the scenario (balances, threshold, rates)."""
    return dict(
        billing_initial_balance=INITIAL,
        billing_low_balance_threshold=THRESHOLD,
        billing_default_rate=PRICING.default_rate,
        billing_plan_rates=json.dumps({k: str(v) for k, v in PRICING.rates.items()}),
    )


def _assert_tables_of_the_set(env, domain, events) -> dict[str, Decimal]:
    """usage_records and balances are those the pure metering computes from ``events``."""
    records, balances = expected(events, INITIAL)
    got = env.sql(
        sql.SQL(
            "SELECT record_id, device_id, user_id, started_at, stopped_at, duration_seconds,"
            " rate, cost, closed_by FROM {} ORDER BY record_id"
        ).format(domain.table("usage_records"))
    )
    assert got == record_rows(records)
    assert dict(env.sql(sql.SQL("SELECT user_id, balance FROM {}").format(
        domain.table("balances")))) == balances
    return balances


@pytest.mark.parametrize("replicas", [1, 2])
def test_any_delivery_order_gives_the_tables_of_the_event_set(env, domain, replicas):
    env.setup()
    events = scenario(seed=12)
    for _ in range(replicas):
        domain.start(
            "billing",
            **_pricing(),
            worker_batch_size=20,
            # replicas wait for each other's batches: a longer bound and more attempts keep
            # a busy shared machine from parking an event that only lost lock races
            billing_lock_timeout=1,
            worker_max_attempts=12,
        )
    order = delivery_order(events, seed=20 + replicas, duplicates=25)
    domain.publish([(e.routing_key, e.message_id, e.payload) for e in order])
    domain.wait_inbox("billing", len(events))

    balances = _assert_tables_of_the_set(env, domain, events)
    # the outbox: one billing.balance_low per user below the threshold, with the fixed id
    alerts = env.sql(
        sql.SQL("SELECT id::text, aggregate_id, payload FROM {} WHERE event_type = %s").format(
            env.table_ident()
        ),
        ("billing.balance_low",),
    )
    users = [a[1] for a in alerts]
    below = {u for u, b in balances.items() if b < THRESHOLD}
    assert below and set(balances) - below, f"the scenario needs both kinds: {balances}"
    # Every user below it was alerted, once; a user above it can only have been alerted by a
    # transient overcount (a stop that arrived before the stop/start between them).
    assert below <= set(users) and len(users) == len(set(users)), (users, balances)
    for event_id, user, payload in alerts:
        assert event_id == str(balance_low_id(user, THRESHOLD))
        assert payload["userId"] == user
    assert all(n == 0 for n in domain.parked().values()), domain.parked()
    for w in domain.workers:
        assert w.alive(), w.tail()
        assert w.sigterm() == 0


def test_a_payload_without_device_id_is_parked_and_nothing_is_billed(env, domain):
    env.setup()
    domain.start("billing")
    domain.publish([
        ("device.started", "00000000-0000-4000-8000-000000000001", {"userId": "u1"}),
        ("device.stopped", "00000000-0000-4000-8000-000000000002", ["not", "an", "object"]),
    ])
    parking = next(iter(domain.parked()))

    def parked() -> int:
        return domain.env.broker.queue_count(parking) or 0

    from harness.common import wait_for

    wait_for(lambda: parked() >= 2, 30, lambda: f"2 parked\n{domain.tails()}")
    assert env.sql(sql.SQL("SELECT count(*) FROM {}").format(
        domain.table("device_events")))[0][0] == 0


def test_a_backlog_in_batches_with_duplicates_and_a_bad_event_mid_batch(env, domain):
    """The batch handler's path through the broker: a backlog (so batches are full) with
    duplicates and one event that fails in the handler in the middle of it. The failing
    batch runs again event by event: the bad event alone is parked, the rest is exact."""
    import aio_pika
    from harness.common import wait_for

    env.setup()
    options = dict(_pricing(), worker_batch_size=60, worker_prefetch=300)
    first = domain.start("billing", **options)  # declares the queues
    assert first.sigterm() == 0
    events = scenario(seed=30)
    order = delivery_order(events, seed=31, duplicates=25)
    half = len(order) // 2
    domain.publish([(e.routing_key, e.message_id, e.payload) for e in order[:half]])
    bad = "00000000-0000-4000-8000-0000000000bd"

    async def publish_bad(ch: aio_pika.abc.AbstractChannel) -> None:
        # no time in the payload and a created_at header that is not one: PermanentError
        # from the handler, after the model validated
        ex = await ch.get_exchange(env.exchange, ensure=False)
        await ex.publish(
            aio_pika.Message(json.dumps({"deviceId": "dev-0", "userId": "u0"}).encode(),
                             message_id=bad, headers={"created_at": "yesterday"},
                             delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            "device.started", mandatory=True, timeout=30,
        )

    env.broker._run(publish_bad)
    domain.publish([(e.routing_key, e.message_id, e.payload) for e in order[half:]])
    w = domain.start("billing", **options)
    domain.wait_inbox("billing", len(events))
    wait_for(lambda: sum(n or 0 for n in domain.parked().values()) >= 1, 30,
                      lambda: f"the bad event parked\n{domain.tails()}")

    _assert_tables_of_the_set(env, domain, events)
    assert env.sql(sql.SQL("SELECT count(*) FROM {} WHERE message_id = %s").format(
        domain.table("device_events")), (bad,))[0][0] == 0
    assert sum(n or 0 for n in domain.parked().values()) == 1
    assert w.metric("cdc_worker_duplicates_total") == 25
    assert w.metric("cdc_worker_parked_total") == 1
    # batched: far fewer transactions than messages
    batches = w.metric("cdc_worker_batch_messages_count")
    assert batches is not None and batches * 5 < len(order), batches
    assert w.sigterm() == 0
