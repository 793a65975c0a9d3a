"""The notifications worker: ``python -m consumers notifications``.

One durable queue per event family of the seed (``notification-service.user``, bound
``user.#``, ... ``system.#``). For each event: render its template, pick the user's channels
(stored preferences, else ``CDC_NOTIFICATIONS_DEFAULT_CHANNELS``), write the in-app row,
then POST the signed webhook and send the email, recording each ``(message_id, channel)``
delivery: the in-app one in the handler's transaction, a webhook or email one committed at
once on its own connection (``store.DeliveryLog``). A failing send raises ``Retry``: the
transaction (and the in-app row) rolls back and the runtime tries the event again later,
skipping the channels whose record was committed; the idempotency key (from the message id)
is the same on every attempt, so the receiver can drop a resend.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

import orjson
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
from consumers.runtime.spec import HandlerContext, QueueSpec, Route, WorkerSpec

log = logging.getLogger("consumers.notifications")

FAMILIES = ("user", "device", "app", "billing", "scheduler", "media", "system")


class NotificationSettings(ConsumerSettings):
    """The notifications worker's settings on top of the runtime's."""

    notifications_schema: str = Field("public", description="schema of the tables")
    notifications_default_channels: list[str] = Field(
        default_factory=lambda: ["in_app"],
        description="channels of a user with no preferences row (JSON list)",
    )
    webhook_url: str | None = Field(
        None, description="webhook endpoint of users without their own (default channels)"
    )
    webhook_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key of webhooks")
    webhook_timeout: float = Field(5.0, gt=0, description="seconds per webhook POST")
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


def build(settings: NotificationSettings) -> WorkerSpec:
    """The notifications worker's queues, route and schema for ``settings``."""
    store = NotificationStore(settings.notifications_schema)
    deliveries = DeliveryLog(store, settings.database_url.get_secret_value())
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
    smtp = channels.SmtpConfig(
        host=settings.smtp_host,
        port=settings.smtp_port,
        sender=settings.smtp_from,
        timeout=settings.smtp_timeout,
        starttls=settings.smtp_starttls,
        username=settings.smtp_username,
        password=settings.smtp_password.get_secret_value() if settings.smtp_password else None,
    )

    async def send(
        channel: Channel, ctx: HandlerContext, note: Notification, user: str | None,
        target: str, payload: Any,
    ) -> None:
        key = idempotency_key(ctx.delivery.message_id, channel)
        if channel == "webhook":
            if secret is None:
                raise PermanentError(
                    "a webhook is due but CDC_WEBHOOK_SECRET is not set: set it and replay"
                )
            body = orjson.dumps(
                {
                    "id": key,
                    "messageId": ctx.delivery.message_id,
                    "eventType": note.event_type,
                    "userId": user,
                    "title": note.title,
                    "body": note.body,
                    "severity": note.severity,
                    "payload": payload,
                },
                option=orjson.OPT_SORT_KEYS,
            )
            hook = channels.Webhook(target, body, key, note.event_type, ctx.delivery.message_id)
            await channels.post_webhook(hook, secret, settings.webhook_timeout, policy)
        else:
            mail = channels.Email(
                to=targets.email_recipient(target),
                subject=note.title,
                text=note.body,
                idempotency_key=key,
                message_id=ctx.delivery.message_id,
                event_type=note.event_type,
            )
            await channels.send_email(mail, smtp)
        # Committed now, whatever happens to this attempt's transaction afterwards.
        await deliveries.record(ctx.delivery.message_id, channel, user, target, key)

    async def handle(ctx: HandlerContext, model: EventPayload) -> None:
        payload = orjson.loads(ctx.delivery.body)
        note = render(ctx.delivery.routing_key, payload)
        user = model.user_id
        prefs, done = await store.lookup(ctx.conn, user, ctx.delivery.message_id)
        prefs = prefs or defaults
        for channel in select_channels(prefs, note):
            if channel in done:
                continue  # delivered by an earlier attempt that committed
            if channel == "in_app":
                await store.store_in_app(ctx.conn, ctx.delivery.message_id, user, note, payload)
                await store.record_delivery(
                    ctx.conn, ctx.delivery.message_id, "in_app", user, None,
                    idempotency_key(ctx.delivery.message_id, "in_app"),
                )
            elif channel == "webhook":
                assert prefs.webhook_url is not None
                await send(channel, ctx, note, user, prefs.webhook_url, payload)
            else:
                # Only the stored address: the event's payload never picks a recipient.
                assert prefs.email_address is not None
                await send(channel, ctx, note, user, prefs.email_address, payload)

    service = SERVICE
    return WorkerSpec(
        name="notifications",
        service=service,
        queues=tuple(QueueSpec(f"{service}.{family}", (f"{family}.#",)) for family in FAMILIES),
        routes=tuple(Route(f"{family}.#", EventPayload, handle) for family in FAMILIES),
        schema=schema_ddl(settings.notifications_schema),
        on_close=deliveries.close,
    )
