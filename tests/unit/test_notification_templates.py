"""Notification templates, channel choice and webhook signatures (pure)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from consumers.notifications.signing import idempotency_key, sign, verify
from consumers.notifications.templates import (
    GENERIC,
    TEMPLATES,
    Preferences,
    fill,
    render,
    select_channels,
)

# Every event type the seed's notification-service subscribes to (system.* as an example).
SEED_TYPES = [
    "user.created", "user.updated", "user.deleted", "user.password_changed",
    "device.created", "device.started", "device.stopped", "device.deleted", "device.error",
    "device.creation_failed", "device.connection_lost",
    "app.installed", "app.uninstalled",
    "billing.payment_success", "billing.payment_failed", "billing.balance_low",
    "scheduler.task_completed", "scheduler.task_failed",
    "media.recording_started", "media.recording_completed", "media.recording_failed",
]
FULL_PAYLOAD = {
    "userId": "u1", "email": "a@b.test", "deviceId": "dev-1", "deviceName": "Pixel 7",
    "error": "adb timeout", "appName": "Maps", "amount": 10, "currency": "CNY",
    "reason": "card declined", "balance": 4.5, "threshold": 10.0, "taskName": "backup",
    "recordingId": "rec-9",
}


@pytest.mark.parametrize("event_type", SEED_TYPES)
def test_every_seed_event_type_has_its_own_template_and_renders_fully(event_type):
    note = render(event_type, FULL_PAYLOAD)
    assert note.template == event_type and event_type in TEMPLATES
    assert "?" not in note.title + note.body, note
    assert note.title and note.body


def test_values_fill_placeholders_with_fallbacks():
    assert render("device.error", {"deviceId": "d-1", "message": "boom"}).body == (
        "Device d-1 failed: boom."
    )
    low = render("billing.balance_low", {"balance": 4.5, "threshold": 10.0})
    assert low.body.startswith("Your balance is 4.5, below 10.") and low.severity == "warning"


def test_missing_values_and_hostile_payloads_cannot_break_rendering():
    note = render("device.error", {})
    assert note.body == "Device ? failed: ?."
    # Format syntax in values is not interpreted; line breaks are flattened; long values cut.
    out = fill("{a} {b} {c}", {"a": "{b.__class__}", "b": "x\r\nBcc: evil", "c": "z" * 500})
    assert out.startswith("{b.__class__} x Bcc: evil z")
    assert len(out) < 250
    assert fill("{unknown}, {a|b} and {not-a-name}", {"b": 0}) == "?, 0 and {not-a-name}"


def test_system_events_use_the_family_template_and_unknown_types_the_generic_one():
    note = render("system.maintenance", {"title": "Upgrade", "message": "down at 2am"})
    assert note.template == "family:system" and note.body == "Upgrade: down at 2am."
    device = render("device.rebooted", {"deviceId": "d9"})
    assert device.template == "family:device" and "d9" in device.body
    other = render("order.shipped", {"x": 1})
    assert other.template == "generic" and other.title == GENERIC.title
    assert "order.shipped" in other.body


def test_channels_follow_preferences():
    note = render("device.error", FULL_PAYLOAD)  # critical
    info = render("device.started", FULL_PAYLOAD)  # info
    assert select_channels(Preferences(), note) == ("in_app",)
    everything = Preferences(
        webhook=True, webhook_url="http://h/x", email=True, email_address="a@b.test",
        email_min_severity="warning",
    )
    assert select_channels(everything, note) == ("in_app", "webhook", "email")
    assert select_channels(everything, info) == ("in_app", "webhook")
    # no stored address: the channel is left out (a payload never supplies one)
    no_address = Preferences(in_app=False, email=True, webhook=True)
    assert select_channels(no_address, note) == ()
    muted = Preferences(muted=frozenset({"device.*"}))
    assert select_channels(muted, note) == ()
    assert select_channels(muted, render("app.installed", {})) == ("in_app",)
    assert select_channels(Preferences(muted=frozenset({"device.error"})), note) == ()


def test_signature_is_hmac_sha256_of_the_body_and_verify_rejects_tampering():
    secret, body = b"s3cret", b'{"a":1}'
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    assert sign(secret, body) == expected
    assert verify(secret, body, expected)
    assert not verify(secret, body + b" ", expected)
    assert not verify(b"other", body, expected)
    assert not verify(secret, body, None)
    assert not verify(secret, body, expected.removeprefix("sha256="))


def test_idempotency_keys_are_stable_per_message_and_channel():
    key = idempotency_key("7f0c7c1e-0000-4000-8000-000000000001", "webhook")
    assert key == idempotency_key("7f0c7c1e-0000-4000-8000-000000000001", "webhook")
    assert key != idempotency_key("7f0c7c1e-0000-4000-8000-000000000001", "email")
    assert key != idempotency_key("7f0c7c1e-0000-4000-8000-000000000002", "webhook")


def test_idempotency_keys_are_the_uuid5_of_channel_and_message_id():
    """Keys must not change across versions: they are the RFC 4122 UUIDv5 text."""
    import uuid

    from consumers.notifications.signing import DELIVERY_NAMESPACE

    for mid in ("7f0c7c1e-0000-4000-8000-000000000001", "m", "", "caf\u00e9-\U0001f600"):
        for channel in ("webhook", "email", "in_app"):
            expected = str(uuid.uuid5(DELIVERY_NAMESPACE, f"{channel}\x00{mid}"))
            assert idempotency_key(mid, channel) == expected


def test_placeholders_anywhere_and_the_same_template_with_other_values() -> None:
    text = "{a}{b|c}-{a} end {c}"
    assert fill(text, {"a": 1, "c": "z"}) == "1z-1 end z"
    assert fill(text, {"b": "y"}) == "?y-? end ?"  # split once, filled afresh each time
    assert fill("no placeholder", {"a": 1}) == "no placeholder"
    assert fill("", {}) == ""
    assert fill("{a|b}", {"a": "", "b": None}) == "?"
