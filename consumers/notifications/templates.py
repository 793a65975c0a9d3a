"""Which notification an event makes, and on which channels: pure, table-driven.

Contract: :func:`render` maps an event type and its payload to a :class:`Notification`
(title, body, severity) using the template of the exact type, else of its family
(``system.*``), else a generic one, so every event gets a notification and no payload
can break rendering: a placeholder names payload keys (``{deviceName|deviceId}`` takes the
first present one) and a missing value renders as ``?``. :func:`select_channels` applies a
user's :class:`Preferences` (or the defaults) to a notification.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["info", "warning", "critical"]
Channel = Literal["in_app", "webhook", "email"]
CHANNELS: tuple[Channel, ...] = ("in_app", "webhook", "email")
_SEVERITY_RANK: dict[str, int] = {"info": 0, "warning": 1, "critical": 2}
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*(?:\|[A-Za-z_][A-Za-z0-9_]*)*)\}")
_MAX_VALUE = 200


@dataclass(frozen=True, slots=True)
class Template:
    title: str
    body: str
    severity: Severity = "info"


# The event types the seed's notification-service subscribed to, plus one per family.
TEMPLATES: dict[str, Template] = {
    "user.created": Template("Welcome", "Your account {email|username|userId} was created."),
    "user.updated": Template("Profile updated", "Your account details were changed."),
    "user.deleted": Template("Account deleted", "Account {userId} was deleted.", "warning"),
    "user.password_changed": Template(
        "Password changed",
        "Your password was changed. If this was not you, reset it now.",
        "warning",
    ),
    "device.created": Template("Device ready", "Device {deviceName|deviceId} was created."),
    "device.started": Template("Device started", "Device {deviceName|deviceId} is running."),
    "device.stopped": Template("Device stopped", "Device {deviceName|deviceId} was stopped."),
    "device.deleted": Template("Device deleted", "Device {deviceName|deviceId} was deleted."),
    "device.error": Template(
        "Device error", "Device {deviceName|deviceId} failed: {error|message|reason}.", "critical"
    ),
    "device.creation_failed": Template(
        "Device creation failed",
        "Device {deviceName|deviceId} could not be created: {error|reason|message}.",
        "critical",
    ),
    "device.connection_lost": Template(
        "Device disconnected",
        "Device {deviceName|deviceId} lost its connection.",
        "warning",
    ),
    "app.installed": Template(
        "App installed", "{appName|packageName|appId} was installed on {deviceName|deviceId}."
    ),
    "app.uninstalled": Template(
        "App removed", "{appName|packageName|appId} was removed from {deviceName|deviceId}."
    ),
    "billing.payment_success": Template(
        "Payment received", "We received your payment of {amount} {currency}."
    ),
    "billing.payment_failed": Template(
        "Payment failed",
        "Your payment of {amount} {currency} failed: {reason|error|message}.",
        "critical",
    ),
    "billing.balance_low": Template(
        "Low balance",
        "Your balance is {balance}, below {threshold}. Top up to keep your devices running.",
        "warning",
    ),
    "scheduler.task_completed": Template(
        "Task completed", "Task {taskName|taskId} completed."
    ),
    "scheduler.task_failed": Template(
        "Task failed", "Task {taskName|taskId} failed: {error|reason|message}.", "warning"
    ),
    "media.recording_started": Template(
        "Recording started", "Recording {recordingId} on {deviceName|deviceId} started."
    ),
    "media.recording_completed": Template(
        "Recording ready", "Recording {recordingId} on {deviceName|deviceId} is ready."
    ),
    "media.recording_failed": Template(
        "Recording failed",
        "Recording {recordingId} on {deviceName|deviceId} failed: {error|reason|message}.",
        "warning",
    ),
}

FAMILY_TEMPLATES: dict[str, Template] = {
    "system": Template("System notice", "{title|subject|type}: {message|description|text}.",
                       "warning"),
    "user": Template("Account notice", "Account event {event_type}."),
    "device": Template("Device notice", "Device {deviceName|deviceId}: {event_type}."),
    "app": Template("App notice", "{appName|packageName|appId}: {event_type}."),
    "billing": Template("Billing notice", "Billing event {event_type}."),
    "scheduler": Template("Scheduler notice", "Task {taskName|taskId}: {event_type}."),
    "media": Template("Media notice", "Media {recordingId|mediaId}: {event_type}."),
}

GENERIC = Template("Notification", "Event {event_type} happened.")


@dataclass(frozen=True, slots=True)
class Notification:
    """What a user is told about one event."""

    event_type: str
    title: str
    body: str
    severity: Severity
    template: str  # the key of the template used: a type, "family:<name>" or "generic"


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = value if isinstance(value, str) else str(value)
    text = " ".join(text.split())  # no line breaks from a payload into a title or a header
    return text if len(text) <= _MAX_VALUE else text[: _MAX_VALUE - 1] + "…"


def fill(text: str, values: Mapping[str, Any]) -> str:
    """``text`` with each ``{a|b}`` replaced by the first of ``a``, ``b`` present and not
    null in ``values``, or ``?``. Nothing else in ``text`` is interpreted."""
    pieces = _pieces(text)
    if len(pieces) == 1:  # no placeholder
        return text
    out = []
    for literal, keys in pieces:
        out.append(literal)
        if keys:
            out.append(_first(keys, values))
    return "".join(out)


def _first(keys: tuple[str, ...], values: Mapping[str, Any]) -> str:
    for key in keys:
        value = values.get(key)
        if value is not None and value != "":
            return _text(value)
    return "?"


@functools.lru_cache(maxsize=1024)
def _pieces(text: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``text`` split once (it is one of a few templates; filled once per event): each
    literal with the keys of the placeholder after it (none after the last)."""
    out = []
    start = 0
    for m in _PLACEHOLDER.finditer(text):
        out.append((text[start : m.start()], tuple(m.group(1).split("|"))))
        start = m.end()
    out.append((text[start:], ()))
    return tuple(out)


def template_for(event_type: str) -> tuple[str, Template]:
    """The template of ``event_type``: its own, its family's, or the generic one."""
    if event_type in TEMPLATES:
        return event_type, TEMPLATES[event_type]
    family = event_type.partition(".")[0]
    if family in FAMILY_TEMPLATES:
        return f"family:{family}", FAMILY_TEMPLATES[family]
    return "generic", GENERIC


def render(event_type: str, payload: Mapping[str, Any]) -> Notification:
    """The notification for one event (never fails: missing values render as ``?``)."""
    key, template = template_for(event_type)
    values = {**payload, "event_type": event_type}
    return Notification(
        event_type=event_type,
        title=fill(template.title, values),
        body=fill(template.body, values),
        severity=template.severity,
        template=key,
    )


@dataclass(frozen=True, slots=True)
class Preferences:
    """A user's channel choices; ``muted`` holds event types or ``family.*`` patterns."""

    in_app: bool = True
    webhook: bool = False
    email: bool = False
    webhook_url: str | None = None
    email_address: str | None = None
    email_min_severity: Severity = "info"
    muted: frozenset[str] = field(default_factory=frozenset)

    def mutes(self, event_type: str) -> bool:
        family = event_type.partition(".")[0]
        return event_type in self.muted or f"{family}.*" in self.muted or "*" in self.muted


def select_channels(prefs: Preferences, note: Notification) -> tuple[Channel, ...]:
    """The channels ``note`` goes to, in sending order (in-app first: it cannot fail
    outside the transaction). An external channel without a stored address is left out:
    the event's payload never supplies one."""
    if prefs.mutes(note.event_type):
        return ()
    chosen: list[Channel] = []
    if prefs.in_app:
        chosen.append("in_app")
    if prefs.webhook and prefs.webhook_url:
        chosen.append("webhook")
    if (
        prefs.email
        and prefs.email_address
        and _SEVERITY_RANK[note.severity] >= _SEVERITY_RANK[prefs.email_min_severity]
    ):
        chosen.append("email")
    return tuple(chosen)
