"""The billing worker: ``python -m consumers billing``.

Consumes the five events the seed's billing-service subscribed to, one durable queue each,
named as in the seed (``billing-service.device-started``, ...). Every handler stores the event
once and recomputes what it changes (:mod:`consumers.billing.store`), so replicas may take
events in any order: the tables are a function of the set of events, not of their order.
The device routes also share a batch handler: the runtime hands it all device events of a
micro-batch at once (one locked read, one write); the per-message handlers are the fallback
the runtime uses when a batch fails, so a bad event is retried or parked on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import psycopg
from pydantic import Field

from consumers.billing import events as ev
from consumers.billing.metering import DeviceEvent, Kind, PlanChange, Pricing
from consumers.billing.store import Alert, BillingStore, schema_ddl
from consumers.config import ConsumerSettings
from consumers.runtime.spec import Delivery, HandlerContext, QueueSpec, Route, WorkerSpec

log = logging.getLogger("consumers.billing")

DEFAULT_PLAN_RATES = {
    "free": Decimal("0"),
    "basic": Decimal("0.60"),
    "standard": Decimal("1.20"),
    "pro": Decimal("2.40"),
    "enterprise": Decimal("4.80"),
}


class BillingSettings(ConsumerSettings):
    """The billing worker's settings (``CDC_BILLING_*``) on top of the runtime's."""

    billing_schema: str = Field("public", description="schema of billing's tables")
    billing_low_balance_threshold: Decimal = Field(
        Decimal("10"), description="billing.balance_low is written when a balance falls below"
    )
    billing_initial_balance: Decimal = Field(
        Decimal("100"), description="balance of a user before any usage"
    )
    billing_default_rate: Decimal = Field(
        Decimal("1.20"), ge=0, description="hourly rate of a device with no known plan"
    )
    billing_lock_timeout: float = Field(
        0.2, gt=0, le=60,
        description="seconds a replica waits for another's device/user lock before retrying",
    )
    billing_plan_rates: dict[str, Decimal] = Field(
        default_factory=lambda: dict(DEFAULT_PLAN_RATES),
        description="hourly rate per plan, JSON object",
    )


SETTINGS = BillingSettings
#: The seed's service name: queues ``billing-service.device-started`` ... (a
#: ``CDC_WORKER_QUEUE_PREFIX`` goes in front of every name).
SERVICE = "billing-service"

_QUEUES = (
    ("device-started", "device.started"),
    ("device-stopped", "device.stopped"),
    ("device-updated", "device.updated"),
    ("device-deleted", "device.deleted"),
    ("user-updated", "user.updated"),
)


_KINDS: dict[type[Any], Kind] = {
    ev.DeviceStarted: "start",
    ev.DeviceStopped: "stop",
    ev.DeviceUpdated: "update",
    ev.DeviceDeleted: "delete",
}


def _device_event(delivery: Delivery, model: Any, kind: Kind) -> DeviceEvent:
    return DeviceEvent(
        message_id=delivery.message_id,
        device_id=model.device_id,
        kind=kind,
        at=model.event_time(delivery.headers),
        user_id=model.user_id,
        plan=getattr(model, "plan", None),
        rate=getattr(model, "rate", None),
    )


def _logged(alerts: Sequence[Alert]) -> None:
    for alert in alerts:
        log.info("billing.balance_low for %s at %s", alert.user_id, alert.balance)


def build(settings: BillingSettings) -> WorkerSpec:
    """The billing worker's queues, routes and schema for ``settings``."""
    store = BillingStore(
        settings.billing_schema,
        settings.outbox_table,
        Pricing(settings.billing_plan_rates, settings.billing_default_rate),
        initial_balance=settings.billing_initial_balance,
        threshold=settings.billing_low_balance_threshold,
    )

    def device_handler(kind: Kind) -> Any:
        async def handle(ctx: HandlerContext, model: Any) -> None:
            _logged(await store.device_event(ctx.conn, _device_event(ctx.delivery, model, kind)))

        return handle

    async def device_batch(
        conn: psycopg.AsyncConnection[Any], messages: Sequence[tuple[Delivery, Any]]
    ) -> None:
        # One call for every device event of a runtime batch (all four device routes).
        events = [_device_event(d, model, _KINDS[type(model)]) for d, model in messages]
        _logged(await store.device_events(conn, events))

    async def user_updated(ctx: HandlerContext, model: ev.UserUpdated) -> None:
        if model.plan is None:
            return  # nothing billing keeps changed
        change = PlanChange(
            message_id=ctx.delivery.message_id,
            user_id=model.user_id,
            at=model.event_time(ctx.delivery.headers),
            plan=model.plan,
        )
        _logged(await store.plan_change(ctx.conn, change))

    routes = (
        Route("device.started", ev.DeviceStarted, device_handler("start"), device_batch),
        Route("device.stopped", ev.DeviceStopped, device_handler("stop"), device_batch),
        Route("device.updated", ev.DeviceUpdated, device_handler("update"), device_batch),
        Route("device.deleted", ev.DeviceDeleted, device_handler("delete"), device_batch),
        Route("user.updated", ev.UserUpdated, user_updated),
    )
    service = SERVICE
    return WorkerSpec(
        name="billing",
        service=service,
        queues=tuple(QueueSpec(f"{service}.{suffix}", (key,)) for suffix, key in _QUEUES),
        routes=routes,
        schema=schema_ddl(settings.billing_schema, settings.billing_lock_timeout),
        db_only=True,  # effects are rows only: no savepoints unless a batch fails
        # billing.balance_low rows: INSERT ... RETURNING id needs SELECT too (`--check`)
        extra={"outbox_privileges": ("INSERT", "SELECT")},
    )
