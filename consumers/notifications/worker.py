"""The notifications worker: ``python -m consumers notifications``.

One durable queue per event family of the seed (``notification-service.user``, bound
``user.#``, ... ``system.#``). For each event: render its template, pick the user's channels
(stored preferences, else ``CDC_NOTIFICATIONS_DEFAULT_CHANNELS``), POST the signed webhook
and send the email, then write the in-app row. The external sends are the worker's
``outside`` effects: they run concurrently for every message in hand (a chunk's
preferences, delivered channels and inbox state read in one round trip), outside any
database transaction, at most ``CDC_WEBHOOK_CONCURRENCY`` requests per endpoint, each
recorded as ``(message_id, channel)`` and committed right after the send on the
``store.DeliveryLog`` connection. A message whose sends all succeeded joins a database batch
that writes its in-app row, its in-app record and its inbox row in one transaction. A
failing send raises ``Retry``: nothing of that attempt is written but the records of the
sends that did succeed, and the runtime tries the event again later, skipping those
channels; the idempotency key (from the message id) is the same on every attempt, so the
receiver can drop a resend.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
import psycopg
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    field_validator,
)
from pydantic_settings import NoDecode

from consumers.config import ConsumerSettings
from consumers.errors import ConfigError, PermanentError
from consumers.notifications import channels, targets
from consumers.notifications.breaker import Breaker
from consumers.notifications.probes import (
    Probes,
    failed,
    failure_of,
    finished,
    first_error,
)
from consumers.notifications.signing import idempotency_key
from consumers.notifications.store import DeliveryLog, NotificationStore, schema_ddl
from consumers.notifications.templates import (
    CHANNELS,
    Channel,
    Notification,
    Preferences,
    render,
    select_channels,
)
from consumers.runtime.spec import Delivery, HandlerContext, QueueSpec, Route, WorkerSpec

log = logging.getLogger("consumers.notifications")

FAMILIES = ("user", "device", "app", "billing", "scheduler", "media", "system")


class NotificationSettings(ConsumerSettings):
    """The notifications worker's settings on top of the runtime's."""

    # Each message holds its prefetch slot while its webhook is in flight (the receiver's
    # latency, tens of ms): the share of the busiest queue (device) must cover rate x that.
    worker_prefetch: int = Field(
        2048, ge=1, le=65535, description="unacked messages the broker may push to this replica"
    )

    notifications_schema: str = Field("public", description="schema of the tables")
    notifications_default_channels: list[str] = Field(
        default_factory=lambda: ["in_app"],
        description="channels of a user with no preferences row (JSON list)",
    )
    webhook_url: str | None = Field(
        None, description="webhook endpoint of users without their own (default channels)"
    )
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key of webhooks")
    webhook_timeout: float = Field(
        5.0, gt=0, description="seconds per webhook POST, waiting for a connection included"
    )
    webhook_concurrency: int = Field(
        32, ge=1, le=1024, description="webhook requests in flight per endpoint (scheme://host:port)"
    )
    webhook_breaker_failures: int = Field(
        5,
        ge=0,
        description="failures in a row after which an endpoint's webhooks fail at once for "
        "CDC_WEBHOOK_BREAKER_SECONDS (0: never)",
    )
    webhook_breaker_seconds: float = Field(
        30.0, gt=0, description="seconds a failing endpoint is not tried before one probe"
    )
    webhook_allow_http: bool = Field(
        False, description="allow plain http:// webhook URLs (https only otherwise)"
    )
    webhook_allowed_networks: Annotated[tuple[str, ...], NoDecode] = Field(
        (),
        description="comma-separated networks webhooks may reach although not public "
        "(e.g. 10.20.0.0/16); loopback, private, link-local... are refused otherwise",
    )
    smtp_host: str = Field("127.0.0.1", description="SMTP server")
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_from: str = Field("notifications@cloudphone.local", description="From address")
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    smtp_timeout: float = Field(10.0, gt=0, description="seconds per SMTP exchange")
    smtp_connections: int = Field(
        4, ge=1, le=64, description="SMTP connections kept open and used at once"
    )

    @field_validator("webhook_allowed_networks", mode="before")
    @classmethod
    def _split_networks(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        targets.parse_networks(value)  # ValueError names the bad entry
        return value


SETTINGS = NotificationSettings
#: The seed's service name: queues ``notification-service.user`` ... (a
#: ``CDC_WORKER_QUEUE_PREFIX`` goes in front of every name).
SERVICE = "notification-service"

_UserId = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=255)]


class EventPayload(BaseModel):
    """Any JSON object; ``userId`` (if present) says whose notification it is."""

    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True, frozen=True)

    user_id: _UserId | None = Field(
        None, validation_alias=AliasChoices("userId", "user_id", "ownerId")
    )


def _defaults(settings: NotificationSettings) -> Preferences:
    unknown = set(settings.notifications_default_channels) - set(CHANNELS)
    if unknown:
        raise ConfigError(
            f"CDC_NOTIFICATIONS_DEFAULT_CHANNELS has unknown channels {sorted(unknown)}: "
            f"use {list(CHANNELS)}"
        )
    chosen = set(settings.notifications_default_channels)
    return Preferences(
        in_app="in_app" in chosen,
        webhook="webhook" in chosen,
        webhook_url=settings.webhook_url,
        email="email" in chosen,
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """What one event needs in the database once its external sends are done."""

    note: Notification
    user: str | None
    payload: Any
    in_app: bool  # write the in-app row and its record


def build(settings: NotificationSettings) -> WorkerSpec:
    """The notifications worker's queues, route and schema for ``settings``."""
    store = NotificationStore(settings.notifications_schema)
    deliveries = DeliveryLog(store, settings.dsn, settings.worker_inbox_table, "notifications")
    defaults = _defaults(settings)
    secret = (
        settings.webhook_secret.get_secret_value().encode() if settings.webhook_secret else None
    )
    if defaults.webhook and secret is None:
        raise ConfigError("webhooks are a default channel: set CDC_WEBHOOK_SECRET to sign them")
    policy = targets.TargetPolicy(
        allow_http=settings.webhook_allow_http,
        allowed_networks=targets.parse_networks(settings.webhook_allowed_networks),
    )
    if settings.webhook_url is not None:
        try:
            targets.webhook_target(settings.webhook_url, policy)
        except PermanentError as exc:
            raise ConfigError(f"CDC_WEBHOOK_URL: {exc}") from exc
    webhooks = channels.WebhookClient(
        secret or b"",
        settings.webhook_timeout,
        policy,
        per_endpoint=settings.webhook_concurrency,
        breaker=Breaker(settings.webhook_breaker_failures, settings.webhook_breaker_seconds),
    )
    smtp = channels.SmtpPool(
        channels.SmtpConfig(
            host=settings.smtp_host,
            port=settings.smtp_port,
            sender=settings.smtp_from,
            timeout=settings.smtp_timeout,
            starttls=settings.smtp_starttls,
            username=settings.smtp_username,
            password=(
                settings.smtp_password.get_secret_value() if settings.smtp_password else None
            ),
        ),
        settings.smtp_connections,
    )

    probes = Probes()

    async def send(
        channel: Channel, delivery: Delivery, note: Notification, user: str | None,
        target: str, payload: Any, probe: bool = False,
    ) -> None:
        key = idempotency_key(delivery.message_id, channel)
        if channel == "webhook":
            if secret is None:
                raise PermanentError(
                    "a webhook is due but CDC_WEBHOOK_SECRET is not set: set it and replay"
                )
            body = orjson.dumps(
                {
                    "id": key,
                    "messageId": delivery.message_id,
                    "eventType": note.event_type,
                    "userId": user,
                    "title": note.title,
                    "body": note.body,
                    "severity": note.severity,
                    "payload": payload,
                },
                option=orjson.OPT_SORT_KEYS,
            )
            await webhooks.post(
                channels.Webhook(target, body, key, note.event_type, delivery.message_id),
                probe=probe,
            )
        else:
            mail = channels.Email(
                to=targets.email_recipient(target),
                subject=note.title,
                text=note.body,
                idempotency_key=key,
                message_id=delivery.message_id,
                event_type=note.event_type,
            )
            await smtp.send(mail)
        # Committed now, whatever happens to the rest of this attempt.
        await deliveries.record(delivery.message_id, channel, user, target, key)

    def effects(plan: Plan, sends: list[Awaitable[None]]) -> Awaitable[Plan]:
        # Known at once (nothing to send, or every send refused before it began, as while
        # an endpoint's breaker is open): a finished future, which needs no task.
        if not sends:
            return finished(plan)
        refused = failure_of(sends)
        if refused is not None:
            return failed(refused)
        return run_sends(plan, sends)

    async def run_sends(plan: Plan, sends: list[Awaitable[None]]) -> Plan:
        if len(sends) == 1:  # the common case: no task of its own needed
            await sends[0]
            return plan
        # Every channel is tried even when another fails: what succeeded is recorded and
        # skipped next time; the first failure (a permanent one first) decides the retry.
        results = await asyncio.gather(*sends, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise first_error(errors)
        return plan

    async def outside(
        chunk: Sequence[tuple[Delivery, EventPayload]],
    ) -> list[Awaitable[Plan]]:
        users = list({model.user_id for _, model in chunk if model.user_id})
        found = await deliveries.lookup(users, [d.message_id for d, _ in chunk])
        out: list[Awaitable[Plan]] = []
        for delivery, model in chunk:
            payload = orjson.loads(delivery.body)
            note = render(delivery.routing_key, payload)
            user = model.user_id
            if delivery.message_id in found.seen:
                # Already handled: the runtime's inbox claim will count it as a duplicate.
                out.append(effects(Plan(note, user, payload, False), []))
                continue
            prefs = found.prefs.get(user, defaults) if user else defaults
            done = found.done.get(delivery.message_id, set())
            chosen = [c for c in select_channels(prefs, note) if c not in done]
            sends: list[Awaitable[None]] = []
            for channel in chosen:
                if channel == "webhook":
                    assert prefs.webhook_url is not None
                    refused = webhooks.refusal(prefs.webhook_url)
                    if refused is not None:  # failed already: no body to build and sign
                        sends.append(failed(refused))
                    elif webhooks.take_probe(prefs.webhook_url):
                        probe = send(channel, delivery, note, user, prefs.webhook_url, payload,
                                     probe=True)
                        sends.append(probes.start(probe, prefs.webhook_url))
                    else:
                        sends.append(
                            send(channel, delivery, note, user, prefs.webhook_url, payload)
                        )
                elif channel == "email":
                    # Only the stored address: the event's payload never picks a recipient.
                    assert prefs.email_address is not None
                    sends.append(
                        send(channel, delivery, note, user, prefs.email_address, payload)
                    )
            out.append(effects(Plan(note, user, payload, "in_app" in chosen), sends))
        return out

    def plan_of(delivery: Delivery) -> Plan:
        if not isinstance(delivery.prepared, Plan):
            raise RuntimeError("the notifications handler runs only after its outside effects")
        return delivery.prepared

    def in_app_row(
        delivery: Delivery, plan: Plan
    ) -> tuple[str, str | None, Notification, Any, str]:
        mid = delivery.message_id
        return (mid, plan.user, plan.note, plan.payload, idempotency_key(mid, "in_app"))

    async def handle(ctx: HandlerContext, model: EventPayload) -> None:
        # One message (the fallback when its batch failed): the same statement, one row.
        plan = plan_of(ctx.delivery)
        if plan.in_app:
            await store.store_in_app_many(ctx.conn, [in_app_row(ctx.delivery, plan)])

    async def handle_batch(
        conn: psycopg.AsyncConnection[Any], batch: Sequence[tuple[Delivery, EventPayload]]
    ) -> None:
        rows = []
        for delivery, _ in batch:
            plan = plan_of(delivery)
            if plan.in_app:
                rows.append(in_app_row(delivery, plan))
        await store.store_in_app_many(conn, rows)

    def drain() -> None:
        webhooks.drain()
        smtp.drain()

    async def close() -> None:
        await probes.close()
        await webhooks.close()
        await smtp.close()
        await deliveries.close()

    service = SERVICE
    return WorkerSpec(
        name="notifications",
        service=service,
        queues=tuple(QueueSpec(f"{service}.{family}", (f"{family}.#",)) for family in FAMILIES),
        routes=tuple(
            Route(f"{family}.#", EventPayload, handle, batch=handle_batch) for family in FAMILIES
        ),
        schema=schema_ddl(settings.notifications_schema),
        on_close=close,
        # The handler only writes rows: the sends happen before, in ``outside``.
        db_only=True,
        outside=outside,
        on_drain=drain,
    )
