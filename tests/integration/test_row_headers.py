"""An outbox row's ``headers`` cannot steer delivery, through the relay or around it.

- relay: ``CC``/``BCC`` (RabbitMQ sender-selected distribution) in a row's headers would copy
  the event to queues bound to other keys; the relay renames them (``outbox-CC``), so the
  event reaches only the queue its routing key binds;
- workers: a spoofed ``x-cdc-routing-key`` / ``x-cdc-attempt`` / ``x-delivery-count`` does
  not change billing's route nor its attempt count, whether it came through the relay
  (renamed there) or was published straight to the exchange (ignored by the worker: only
  its own copies, back through its retry queues or ``dlq replay``, are trusted).
"""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from harness.common import wait_for
from harness.rows import new_event
from psycopg import sql

pytestmark = pytest.mark.integration

SPOOF = {
    "x-cdc-routing-key": "user.updated",
    "x-cdc-attempt": 5,
    "x-cdc-origin-queue": "anything",
    "x-delivery-count": 9,
}


def test_cc_and_bcc_in_row_headers_do_not_copy_the_event_elsewhere(env):
    env.setup()
    env.broker.declare_exchange(env.exchange)
    mine = env.declare_queue("orders", ["orders.created"])
    other = env.declare_queue("secrets", ["secret.stuff"])
    relay = env.relay()
    relay.wait_streaming()
    headers = {"CC": ["secret.stuff"], "BCC": ["secret.stuff"], "tenant": "acme"}
    [row] = env.insert([new_event("orders.created", headers=headers)])
    control = env.insert([new_event("secret.stuff")])[0]  # the other queue does work

    [got] = env.drain(1, queue=mine, quiet=0.5, timeout=30)
    assert got.message_id == row["id"]
    assert got.headers["outbox-CC"] == ["secret.stuff"]
    assert got.headers["outbox-BCC"] == ["secret.stuff"]
    assert got.headers["tenant"] == "acme"
    assert "CC" not in got.headers and "BCC" not in got.headers
    assert [m.message_id for m in env.drain(1, queue=other, quiet=1.0, timeout=30)] == [
        control["id"]
    ]
    assert env.broker.queue_count(env.parking_queue) in (0, None)


def _billing_rows(env, domain, table: str, mid: str) -> int:
    return int(
        env.sql(
            sql.SQL("SELECT count(*) FROM {} WHERE message_id = %s").format(domain.table(table)),
            (mid,),
        )[0][0]
    )


def test_spoofed_runtime_headers_change_neither_route_nor_attempt_count(env, domain):
    env.setup()
    relay = env.relay()
    relay.wait_streaming()
    domain.start("billing")
    at = dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.UTC).isoformat()
    start = {"deviceId": "spoof-dev", "userId": "spoof-user", "plan": "pro", "startedAt": at}

    # Through the relay: the row's headers are renamed before they reach the broker.
    [via_relay] = env.insert([new_event("device.started", start, headers=SPOOF)])
    # Around the relay: straight to the exchange with the runtime's own header names.
    direct, bad = str(uuid.uuid4()), str(uuid.uuid4())
    domain.publish(
        [("device.started", direct, {**start, "deviceId": "spoof-dev-2"}),
         ("device.started", bad, {"userId": "no-device"})],  # fails validation: parked
        headers=SPOOF,
    )
    domain.wait_inbox("billing", 2, timeout=60)
    for mid in (via_relay["id"], direct):
        assert _billing_rows(env, domain, "device_events", mid) == 1, mid  # device route
        assert _billing_rows(env, domain, "user_plans", mid) == 0, mid  # not user.updated

    [parking] = domain.parked()
    wait_for(lambda: domain.parked()[parking] == 1, 30, "the invalid event parked")
    [parked] = env.broker.drain(parking, expected=1)
    assert parked.message_id == bad
    assert parked.headers["x-cdc-error-kind"] == "validation"
    assert parked.headers["x-cdc-attempt"] == 1  # counted from 1, not from the spoofed 5 + 9
    assert parked.headers["x-cdc-routing-key"] == "device.started"
    assert parked.headers["x-cdc-origin-queue"].endswith("billing-service.device-started")
