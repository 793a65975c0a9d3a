"""The notifications worker with the real broker, PostgreSQL, a real HTTP receiver that
verifies the HMAC signature itself, and a real SMTP server (aiosmtpd).

- alice: in-app + webhook + email (warning and up); her device.error is published twice
  and the receiver fails the first POST: one in-app row, one accepted webhook (the retry
  carries the same idempotency key and a valid signature), one email;
- bob: no preferences row (defaults: in-app only); an unknown device.* type gets the
  family template;
- carol: email only, device.* muted;
- a system event without a user: an in-app notification with no user_id.
"""

from __future__ import annotations

import json
import uuid

import pytest
from harness.common import wait_for
from psycopg import sql

from consumers.notifications.signing import idempotency_key
from consumers.notifications.store import schema_ddl

pytestmark = pytest.mark.integration


def _mid() -> str:
    return str(uuid.uuid4())


def test_channels_preferences_retries_and_duplicates(env, domain, webhook_receiver, smtp_sink):
    for stmt in schema_ddl(domain.schema):
        env.sql(stmt.encode())
    prefs = domain.table("notification_preferences")
    env.sql(
        sql.SQL(
            "INSERT INTO {} (user_id, in_app, webhook, webhook_url, email, email_address,"
            " email_min_severity, muted) VALUES"
            " ('alice', true, true, %s, true, 'alice@example.test', 'warning', '{{}}'),"
            " ('carol', false, false, NULL, true, 'carol@example.test', 'info', '{{device.*}}')"
        ).format(prefs),
        (webhook_receiver.url,),
    )
    domain.start_notifications(
        webhook_receiver.SECRET,
        smtp_host="127.0.0.1",
        smtp_port=smtp_sink.port,
        smtp_from="notify@cloudphone.test",
    )
    error_id, low_id, created_id, reboot_id, muted_id, app_id, started_id, system_id = (
        _mid() for _ in range(8)
    )
    domain.publish([
        ("device.error", error_id, {"userId": "alice", "deviceId": "d1", "error": "adb lost"}),
        ("device.error", error_id, {"userId": "alice", "deviceId": "d1", "error": "adb lost"}),
        ("billing.balance_low", low_id, {"userId": "alice", "balance": 4.5, "threshold": 10}),
        ("device.started", started_id, {"userId": "alice", "deviceId": "d1"}),  # info: no email
        ("user.created", created_id, {"userId": "bob", "email": "bob@example.test"}),
        ("device.rebooted", reboot_id, {"userId": "bob", "deviceId": "d2"}),
        ("device.error", muted_id, {"userId": "carol", "deviceId": "d3"}),
        ("app.installed", app_id, {"userId": "carol", "appName": "Maps", "deviceId": "d3"}),
        ("system.maintenance", system_id, {"title": "Upgrade", "message": "down at 2am"}),
    ])
    domain.wait_inbox("notifications", 8, timeout=60)

    notes = {
        r[0]: r[1:]
        for r in env.sql(
            sql.SQL(
                "SELECT message_id, user_id, event_type, title, body, template FROM {}"
            ).format(domain.table("notifications"))
        )
    }
    assert set(notes) == {error_id, low_id, started_id, created_id, reboot_id, system_id}
    assert notes[system_id] == (None, "system.maintenance", "System notice",
                                "Upgrade: down at 2am.", "family:system")
    assert notes[error_id][:3] == ("alice", "device.error", "Device error")
    assert notes[error_id][3] == "Device d1 failed: adb lost."
    assert notes[reboot_id][4] == "family:device"
    assert notes[low_id][3].startswith("Your balance is 4.5, below 10.")

    # webhook: alice's three events, each accepted once; every request was signed right
    accepted = webhook_receiver.accepted()
    assert set(accepted) == {idempotency_key(m, "webhook") for m in (error_id, low_id, started_id)}
    assert all(r.signature_ok for r in webhook_receiver.requests)
    keys = [r.headers["Idempotency-Key"] for r in webhook_receiver.requests]
    assert sorted(keys) == sorted(k for k in accepted for _ in range(2))  # 500 then 200 each
    hook = json.loads(accepted[idempotency_key(error_id, "webhook")].body)
    assert hook["messageId"] == error_id and hook["eventType"] == "device.error"
    assert hook["payload"]["error"] == "adb lost"

    # email: alice's error and low balance (warning+), carol's app; nothing for bob
    wait_for(lambda: len(smtp_sink.messages) >= 3, 10, "3 emails")
    by_to = sorted((m["To"], m["Subject"]) for m in smtp_sink.messages)
    assert by_to == [
        ("alice@example.test", "Device error"),
        ("alice@example.test", "Low balance"),
        ("carol@example.test", "App installed"),
    ]
    for m in smtp_sink.messages:
        key = m["X-Idempotency-Key"]
        assert m["Message-ID"] == f"<{key}@cloudphone.test>"
        assert key == idempotency_key(m["X-CDC-Message-Id"], "email")

    deliveries = env.sql(
        sql.SQL("SELECT message_id, channel FROM {} ORDER BY 1, 2").format(
            domain.table("notification_deliveries")
        )
    )
    assert sorted(deliveries) == sorted(
        [(error_id, c) for c in ("email", "in_app", "webhook")]
        + [(low_id, c) for c in ("email", "in_app", "webhook")]
        + [(started_id, "in_app"), (started_id, "webhook")]
        + [(created_id, "in_app"), (reboot_id, "in_app"), (app_id, "email")]
        + [(system_id, "in_app")]
    )
    assert all(n == 0 for n in domain.parked().values()), domain.parked()


def test_a_second_copy_held_behind_a_failed_first_goes_on_once_its_retry_is_confirmed(
    env, domain, webhook_receiver
):
    # Two copies of one event, back to back: the second waits while the first is in hand.
    # The first's POST fails (the receiver fails every first POST) and its retry copy is
    # confirmed beside later batches; then the second must start at once, not when some
    # later batch happens to come (here none does before the 20 s retry returns).
    for stmt in schema_ddl(domain.schema):
        env.sql(stmt.encode())
    env.sql(
        sql.SQL(
            "INSERT INTO {} (user_id, in_app, webhook, webhook_url) VALUES"
            " ('alice', true, true, %s)"
        ).format(domain.table("notification_preferences")),
        (webhook_receiver.url,),
    )
    domain.start_notifications(webhook_receiver.SECRET, worker_retry_delays="20")
    mid = _mid()
    payload = {"userId": "alice", "deviceId": "d1", "error": "adb lost"}
    domain.publish([("device.error", mid, payload), ("device.error", mid, payload)])
    key = idempotency_key(mid, "webhook")
    wait_for(lambda: key in webhook_receiver.accepted(), 10, "the second copy's webhook")
    domain.wait_inbox("notifications", 1, timeout=10)
    assert [r.status for r in webhook_receiver.requests] == [500, 200]
