"""The notifications worker's targets and delivery records, end to end (real broker,
PostgreSQL, an HTTP receiver and an SMTP server):

- a failing email does not make the retry POST the webhook again (each channel's record is
  committed on its own);
- webhook targets that are not allowed (metadata address, other scheme, a loopback address
  outside the allow-list) are parked as permanent errors that say why;
- an event's payload never chooses an email recipient.
"""

from __future__ import annotations

import uuid

import pytest
from harness.common import wait_for
from harness.fakes import SmtpSink, WebhookReceiver
from psycopg import sql

from consumers.notifications.signing import idempotency_key
from consumers.notifications.store import schema_ddl

pytestmark = pytest.mark.integration


def _mid() -> str:
    return str(uuid.uuid4())


def _prefs(env, domain, rows: list[tuple]) -> None:
    for stmt in schema_ddl(domain.schema):
        env.sql(stmt.encode())
    for row in rows:
        env.sql(
            sql.SQL(
                "INSERT INTO {} (user_id, in_app, webhook, webhook_url, email, email_address)"
                " VALUES (%s, %s, %s, %s, %s, %s)"
            ).format(domain.table("notification_preferences")),
            row,
        )


def _start(domain, receiver: WebhookReceiver, sink: SmtpSink, **extra):
    return domain.start_notifications(
        receiver.SECRET,
        smtp_host="127.0.0.1",
        smtp_port=sink.port,
        **extra,
    )


def test_an_email_failure_does_not_post_the_webhook_again(env, domain):
    receiver, sink = WebhookReceiver(), SmtpSink(fail_first=True)
    try:
        _prefs(env, domain, [("alice", True, True, receiver.url, True, "alice@example.test")])
        _start(domain, receiver, sink)
        mid = _mid()
        domain.publish([("device.error", mid, {"userId": "alice", "deviceId": "d1"})])
        domain.wait_inbox("notifications", 1, timeout=60)
        wait_for(lambda: len(sink.messages) >= 1, 10, "the email on the retry")

        assert sink.refused == 1  # attempt 1: webhook POSTed, email refused -> Retry
        posts = [r for r in receiver.requests if r.headers["X-CDC-Message-Id"] == mid]
        assert len(posts) == 1, f"webhook POSTed {len(posts)} times"
        assert posts[0].headers["Idempotency-Key"] == idempotency_key(mid, "webhook")
        assert [m["To"] for m in sink.messages] == ["alice@example.test"]
        deliveries = env.sql(
            sql.SQL("SELECT channel FROM {} WHERE message_id = %s ORDER BY 1").format(
                domain.table("notification_deliveries")
            ),
            (mid,),
        )
        assert [r[0] for r in deliveries] == ["email", "in_app", "webhook"]
        assert all(n == 0 for n in domain.parked().values()), domain.parked()
    finally:
        receiver.close()
        sink.close()


def test_refused_targets_are_parked_and_payloads_cannot_pick_recipients(env, domain):
    receiver, sink = WebhookReceiver(), SmtpSink()
    loopback_other = receiver.url.replace("127.0.0.1", "127.0.0.2")  # outside the allow-list
    try:
        _prefs(
            env,
            domain,
            [
                ("meta", False, True, "http://169.254.169.254/latest/meta-data/", False, None),
                ("ftp", False, True, "ftp://files.example.test/drop", False, None),
                ("loop", False, True, loopback_other, False, None),
                ("carol", True, False, None, True, "carol@example.test"),
            ],
        )
        # Users without a preferences row get in-app + email: there is no stored address
        # for them, so the payload's "email" must not become one.
        _start(domain, receiver, sink, notifications_default_channels='["in_app","email"]')
        meta, ftp, loop, carol, dave = (_mid() for _ in range(5))
        domain.publish([
            ("device.error", meta, {"userId": "meta", "deviceId": "d1"}),
            ("device.error", ftp, {"userId": "ftp", "deviceId": "d2"}),
            ("device.error", loop, {"userId": "loop", "deviceId": "d3"}),
            ("app.installed", carol, {"userId": "carol", "email": "evil@attacker.test"}),
            ("user.created", dave, {"userId": "dave", "email": "evil@attacker.test"}),
        ])
        domain.wait_inbox("notifications", 2, timeout=60)
        [parking] = domain.parked()
        wait_for(lambda: domain.parked()[parking] == 3, 30, "3 parked", interval=0.2)
        parked = {m.message_id: m.headers for m in env.broker.drain(parking, expected=3)}
        assert set(parked) == {meta, ftp, loop}
        reasons = {mid: h["x-cdc-error"] for mid, h in parked.items()}
        assert all(h["x-cdc-error-kind"] == "permanent" for h in parked.values())
        assert "169.254.169.254, a cloud metadata address" in reasons[meta]
        assert "scheme 'ftp'" in reasons[ftp]
        assert "127.0.0.2, loopback" in reasons[loop]
        assert "meta-data" not in reasons[meta]  # the URL's path stays out of the reason
        assert receiver.requests == []  # nothing reached any address

        wait_for(lambda: len(sink.messages) >= 1, 10, "carol's email")
        assert [m["To"] for m in sink.messages] == ["carol@example.test"]
        notes = env.sql(
            sql.SQL("SELECT message_id FROM {}").format(domain.table("notifications"))
        )
        assert {r[0] for r in notes} == {carol, dave}
    finally:
        receiver.close()
        sink.close()
