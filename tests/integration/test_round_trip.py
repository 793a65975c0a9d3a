"""The round trip: device events written to ``event_outbox`` go through the real relay to
billing, whose ``billing.balance_low`` goes back into ``event_outbox`` in the same
transaction as the debit, through the relay again, to notifications, and ends as a stored
in-app notification (once, with the deterministic event id as its message id)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest
from harness.common import wait_for
from harness.rows import new_event
from psycopg import sql

from consumers.billing.metering import balance_low_id

pytestmark = pytest.mark.integration


def test_balance_low_goes_from_billing_through_the_outbox_to_a_notification(env, domain):
    env.setup()
    relay = env.relay()
    relay.wait_streaming()
    domain.start(
        "billing",
        billing_initial_balance="1",
        billing_low_balance_threshold="0.5",
        billing_default_rate="3600",  # 1 per second
    )
    domain.start("notifications")
    t0 = dt.datetime(2025, 10, 30, 5, 0, tzinfo=dt.UTC)
    rows = [
        new_event("device.started", {"deviceId": "rt-dev", "userId": "rt-user",
                                     "startedAt": t0.isoformat()}, aggregate_id="rt-dev"),
        new_event("device.stopped", {"deviceId": "rt-dev",
                                     "stoppedAt": (t0 + dt.timedelta(seconds=30)).isoformat()},
                  aggregate_id="rt-dev"),
    ]
    env.insert(rows)

    notes = domain.table("notifications")

    def stored() -> list[tuple[object, ...]]:
        try:
            return env.sql(
                sql.SQL(
                    "SELECT message_id, user_id, event_type, body FROM {} WHERE event_type = %s"
                ).format(notes),
                ("billing.balance_low",),
            )
        except Exception:
            return []

    got = wait_for(stored, 60, lambda: f"the balance_low notification\n{domain.tails()}\n"
                   f"{relay.tail(30)}")
    event_id = str(balance_low_id("rt-user", Decimal("0.5")))
    assert [(r[0], r[1], r[2]) for r in got] == [(event_id, "rt-user", "billing.balance_low")]
    assert "Your balance is -29" in str(got[0][3])
    # the outbox holds it once, next to the two device events
    outbox = env.sql(
        sql.SQL("SELECT id::text, event_type FROM {} ORDER BY created_at").format(
            env.table_ident()
        )
    )
    assert [e for _, e in outbox].count("billing.balance_low") == 1
    assert (event_id, "billing.balance_low") in outbox
    # the device events were notified too (device.* is a notifications family)
    wait_for(lambda: domain.inbox_count("notifications") >= 3, 30, "3 notifications")
