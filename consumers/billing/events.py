"""The payloads billing consumes, as pydantic models, liberal in what they accept.

The platform's services publish camelCase JSON (``deviceId``, ``userId``, ...); snake_case
is accepted too, numbers are taken where ids are strings, unknown fields are ignored. The
event time is the payload's own timestamp when it has one (``startedAt`` / ``stoppedAt`` /
``deletedAt`` / ``updatedAt``, or ``timestamp`` / ``occurredAt``), else the relay's
``created_at`` header (the outbox row's creation time): every copy of a message carries the
same one, so the time, like everything billing derives, does not depend on delivery.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, StringConstraints

from consumers.errors import PermanentError

Ident = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]
#: An hourly rate: never negative, bounded so a typo cannot overflow ``numeric(20,6)``.
Rate = Annotated[Decimal, Field(ge=0, le=Decimal("1e9"))]


def _alias(*names: str) -> Any:
    return Field(None, validation_alias=AliasChoices(*names))


class _BillingEvent(BaseModel):
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True, frozen=True)

    timestamp: datetime | None = _alias("timestamp", "occurredAt", "occurred_at", "eventTime")

    def _own_time(self) -> datetime | None:
        return None

    def event_time(self, headers: Mapping[str, Any]) -> datetime:
        """When it happened: the payload's time, else the relay's ``created_at`` header."""
        at = self._own_time() or self.timestamp
        if at is None:
            raw = headers.get("created_at")
            if isinstance(raw, bytes):
                raw = raw.decode("utf-8", "replace")
            if isinstance(raw, datetime):
                at = raw
            elif isinstance(raw, str):
                try:
                    at = datetime.fromisoformat(raw)
                except ValueError as exc:
                    raise PermanentError(f"created_at header {raw!r} is not ISO 8601") from exc
        if at is None:
            raise PermanentError(
                "the event has no time: put 'timestamp' in the payload or publish it "
                "through the relay (which adds the created_at header)"
            )
        return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


class DeviceStarted(_BillingEvent):
    """``device.started``: a session opens; the owner is required (it pays)."""

    device_id: Ident = Field(validation_alias=AliasChoices("deviceId", "device_id", "id"))
    user_id: Ident = Field(validation_alias=AliasChoices("userId", "user_id", "ownerId"))
    started_at: datetime | None = _alias("startedAt", "started_at")
    plan: Ident | None = _alias("plan", "planId", "plan_id", "tier")
    rate: Rate | None = _alias("ratePerHour", "rate_per_hour", "hourlyRate", "rate")

    def _own_time(self) -> datetime | None:
        return self.started_at


class DeviceStopped(_BillingEvent):
    """``device.stopped``: the open session closes (a ``duration`` field is not trusted)."""

    device_id: Ident = Field(validation_alias=AliasChoices("deviceId", "device_id", "id"))
    user_id: Ident | None = _alias("userId", "user_id")
    stopped_at: datetime | None = _alias("stoppedAt", "stopped_at")

    def _own_time(self) -> datetime | None:
        return self.stopped_at


class DeviceDeleted(_BillingEvent):
    """``device.deleted``: closes an open session; later events of the device are ignored."""

    device_id: Ident = Field(validation_alias=AliasChoices("deviceId", "device_id", "id"))
    user_id: Ident | None = _alias("userId", "user_id")
    deleted_at: datetime | None = _alias("deletedAt", "deleted_at")

    def _own_time(self) -> datetime | None:
        return self.deleted_at


class DeviceUpdated(_BillingEvent):
    """``device.updated``: may change the device's plan or hourly rate from its time on."""

    device_id: Ident = Field(validation_alias=AliasChoices("deviceId", "device_id", "id"))
    user_id: Ident | None = _alias("userId", "user_id")
    updated_at: datetime | None = _alias("updatedAt", "updated_at")
    plan: Ident | None = _alias("plan", "planId", "plan_id", "tier")
    rate: Rate | None = _alias("ratePerHour", "rate_per_hour", "hourlyRate", "rate")

    def _own_time(self) -> datetime | None:
        return self.updated_at


class UserUpdated(_BillingEvent):
    """``user.updated``: billing keeps the user's plan (tier), the fallback rate of devices."""

    user_id: Ident = Field(validation_alias=AliasChoices("userId", "user_id", "id"))
    updated_at: datetime | None = _alias("updatedAt", "updated_at")
    plan: Ident | None = _alias("plan", "planId", "plan_id", "tier")

    def _own_time(self) -> datetime | None:
        return self.updated_at
