"""The broker side: publish outbox events to RabbitMQ with confirms, mandatory and persistence.

:meth:`Publisher.deliver` returns only once the broker has confirmed the event, or has
confirmed its parked copy. A nack or a confirm timeout means the same message is published
again (with backoff); a returned (unroutable) message is parked with the reason. Losing the
connection raises :class:`SinkError`: the relay then restarts its session, and everything not
yet confirmed is streamed again from the slot, so nothing is skipped.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import aiormq
import orjson
from aiormq.abc import AbstractChannel, AbstractConnection
from pamqp.commands import Basic

from cdc.config import RelaySettings
from cdc.errors import SinkError
from cdc.metrics import Metrics
from cdc.outbox import Malformed, OutboxEvent

log = logging.getLogger(__name__)

_JSON = "application/json"
_PERSISTENT = 2
_RETRY_MAX_DELAY = 5.0


def _properties(event: OutboxEvent) -> Basic.Properties:
    return Basic.Properties(
        message_id=event.message_id,
        message_type=event.routing_key,
        content_type=_JSON,
        delivery_mode=_PERSISTENT,
        timestamp=event.timestamp,
        headers=event.headers,
    )


class Publisher:
    """One broker connection and one confirm-mode channel, owned by a relay session."""

    def __init__(self, settings: RelaySettings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None

    async def connect(self) -> None:
        """Connect, open a confirm channel and declare the exchange and the parking queue."""
        s = self._settings
        try:
            self._connection = await aiormq.connect(s.amqp_url.get_secret_value())
            channel = await self._connection.channel(
                publisher_confirms=True, on_return_raises=True
            )
            await channel.exchange_declare(s.exchange, exchange_type="topic", durable=True)
            await channel.queue_declare(s.parking_queue, durable=True)
        except (TimeoutError, aiormq.exceptions.AMQPError, OSError) as exc:
            await self.close()
            raise SinkError(f"cannot connect to the broker: {exc}") from exc
        self._channel = channel

    async def close(self) -> None:
        """Close the connection; pending confirms fail, and their events will be re-sent."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), timeout=2)
            except Exception as exc:
                log.debug("broker close failed: %s", exc)

    async def deliver(self, event: OutboxEvent) -> None:
        """Publish ``event`` and wait until it, or its parked copy, is confirmed."""
        try:
            await self._publish_confirmed(
                event.body, self._settings.exchange, event.routing_key, _properties(event)
            )
        except aiormq.exceptions.PublishError as returned:
            frame = returned.message.delivery if returned.message else None
            code = getattr(frame, "reply_code", "?")
            reason = f"unroutable: {code} {getattr(frame, 'reply_text', '')}".rstrip()
            await self._park_copy(event, reason)
        else:
            self._metrics.published.inc()

    async def park(self, bad: Malformed) -> None:
        """Park a row that could not become a message, with the reason, and wait for confirm."""
        body = orjson.dumps(bad.row)
        props = Basic.Properties(
            message_id=bad.message_id,
            message_type=bad.routing_key,
            content_type=_JSON,
            delivery_mode=_PERSISTENT,
            headers=self._parking_headers("malformed", bad.reason, bad.routing_key),
        )
        log.warning("parking malformed outbox row", extra={"id": bad.message_id, "why": bad.reason})
        await self._publish_confirmed(body, "", self._settings.parking_queue, props)
        self._metrics.parked.labels(kind="malformed").inc()

    async def _park_copy(self, event: OutboxEvent, reason: str) -> None:
        props = _properties(event)
        props.headers = {
            **event.headers,
            **self._parking_headers("unroutable", reason, event.routing_key),
        }
        log.warning(
            "parking unroutable event", extra={"id": event.message_id, "key": event.routing_key}
        )
        try:
            await self._publish_confirmed(event.body, "", self._settings.parking_queue, props)
        except aiormq.exceptions.PublishError as exc:
            raise SinkError(
                f"parking queue {self._settings.parking_queue!r} is missing; "
                "it is re-declared on reconnect"
            ) from exc
        self._metrics.parked.labels(kind="unroutable").inc()

    def _parking_headers(self, kind: str, reason: str, key: str | None) -> dict[str, Any]:
        return {
            "x-parked-kind": kind,
            "x-parked-reason": reason,
            "x-original-exchange": self._settings.exchange,
            "x-original-routing-key": key,
        }

    async def _publish_confirmed(
        self, body: bytes, exchange: str, key: str, props: Basic.Properties
    ) -> None:
        """Publish until acked; re-publish on nack or timeout, never give up on an event."""
        delay = 0.05
        while True:
            channel = self._channel
            if channel is None:
                raise SinkError("broker channel is closed")
            try:
                await channel.basic_publish(
                    body,
                    exchange=exchange,
                    routing_key=key,
                    properties=props,
                    mandatory=True,
                    timeout=self._settings.confirm_timeout,
                )
                return
            except aiormq.exceptions.PublishError:
                raise
            except aiormq.exceptions.DeliveryError:
                self._metrics.republished.labels(reason="nack").inc()
                log.warning("broker nacked a publish; publishing again", extra={"key": key})
            except TimeoutError:
                self._metrics.republished.labels(reason="timeout").inc()
                log.warning("no confirm in time; publishing again", extra={"key": key})
            except (aiormq.exceptions.AMQPError, OSError, RuntimeError) as exc:
                raise SinkError(f"broker connection lost: {exc!r}") from exc
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, _RETRY_MAX_DELAY)
