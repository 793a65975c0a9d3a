"""A billing scenario for the integration tests: seed-like events and their expected effects.

``scenario(seed)`` makes the events of a few users and devices as the platform's services
would publish them (routing key, message id, camelCase payload with its own timestamp), and
``expected(events, ...)`` computes the records and balances straight from the set with the
pure metering (:func:`billing_model.meter`), which the worker must match
whatever order and duplicates the broker delivers.
"""

from __future__ import annotations

import datetime as dt
import random
import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from consumers.billing.metering import DeviceEvent, PlanChange, Pricing, UsageRecord
from harness.billing_model import meter

T0 = dt.datetime(2025, 10, 30, 5, 0, tzinfo=dt.UTC)
PRICING = Pricing({"basic": Decimal("30"), "pro": Decimal("90")}, Decimal("60"))
KINDS = {"device.started": "start", "device.stopped": "stop", "device.deleted": "delete",
         "device.updated": "update"}
TIME_FIELD = {"device.started": "startedAt", "device.stopped": "stoppedAt",
              "device.deleted": "deletedAt", "device.updated": "updatedAt",
              "user.updated": "updatedAt"}


@dataclass(frozen=True, slots=True)
class Event:
    message_id: str
    routing_key: str
    payload: dict[str, Any]


def _iso(minutes: float) -> str:
    return (T0 + dt.timedelta(minutes=minutes)).isoformat()


def scenario(seed: int, devices: int = 6, users: int = 3, sessions: int = 6) -> list[Event]:
    """Sessions of minutes per device, a plan change or two, a deleted device."""
    rng = random.Random(seed)
    out: list[Event] = []

    def add(key: str, payload: dict[str, Any]) -> None:
        out.append(Event(str(uuid.UUID(int=rng.getrandbits(128))), key, payload))

    for u in range(users):
        if u % 2 == 0:
            add("user.updated", {"userId": f"u{u}", "plan": "basic", "email": f"u{u}@x.test",
                                 "updatedAt": _iso(rng.uniform(-10, 40))})
    for d in range(devices):
        device, user = f"dev-{d}", f"u{d % users}"
        t = rng.uniform(0, 5)
        for _ in range(sessions):
            add("device.started", {"deviceId": device, "userId": user, "startedAt": _iso(t),
                                   "name": f"phone {d}"})
            t += rng.uniform(1, 8)
            add("device.stopped", {"deviceId": device, "stoppedAt": _iso(t),
                                   "duration": 999})  # a stated duration is not trusted
            t += rng.uniform(0, 3)
        if d % 3 == 1:
            add("device.updated", {"deviceId": device, "plan": "pro",
                                   "updatedAt": _iso(rng.uniform(5, 30))})
        if d == devices - 1:  # deleted while running: the delete closes the session
            add("device.started", {"deviceId": device, "userId": user, "startedAt": _iso(t)})
            add("device.deleted", {"deviceId": device, "deletedAt": _iso(t + 2.5)})
            add("device.started", {"deviceId": device, "userId": user, "startedAt": _iso(t + 5)})
    return out


def to_metering(events: list[Event]) -> list[DeviceEvent | PlanChange]:
    """The events as the metering sees them (the test's own reading of the payloads)."""
    out: list[DeviceEvent | PlanChange] = []
    for e in events:
        at = dt.datetime.fromisoformat(e.payload[TIME_FIELD[e.routing_key]])
        if e.routing_key == "user.updated":
            out.append(PlanChange(e.message_id, e.payload["userId"], at, e.payload["plan"]))
        else:
            out.append(
                DeviceEvent(
                    e.message_id,
                    e.payload["deviceId"],
                    KINDS[e.routing_key],  # type: ignore[arg-type]
                    at,
                    e.payload.get("userId"),
                    e.payload.get("plan"),
                )
            )
    return out


def expected(
    events: list[Event], initial: Decimal
) -> tuple[dict[str, UsageRecord], dict[str, Decimal]]:
    """Records by id, and the balance of every user with usage."""
    records, spent = meter(to_metering(events), PRICING)
    return records, {u: initial - s for u, s in spent.items()}


def delivery_order(events: list[Event], seed: int, duplicates: int) -> list[Event]:
    """``events`` shuffled, with ``duplicates`` of them delivered a second time."""
    rng = random.Random(seed)
    out = events + rng.sample(events, min(duplicates, len(events)))
    rng.shuffle(out)
    return out


def record_rows(records: dict[str, UsageRecord]) -> list[tuple[Any, ...]]:
    """The records as ``usage_records`` rows sorted by id, comparable with SELECT results."""
    return [
        (r.record_id, r.device_id, r.user_id, r.started_at, r.stopped_at, r.duration_seconds,
         r.rate, r.cost, r.closed_by)
        for r in sorted(records.values(), key=lambda r: r.record_id)
    ]
