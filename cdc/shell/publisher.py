"""The broker side: outbox items become confirmed, mandatory, persistent AMQP messages.

:meth:`Publisher.publish` encodes one item and hands it to the confirm channel
(:mod:`cdc.shell.broker`) with a :class:`~cdc.core.confirms.ConfirmToken`, without
waiting; ``on_confirm`` is called with the transactions of every item the broker has
confirmed, in batches. An event the broker returns as unroutable is published again,
confirmed, to the parking queue with the reason, and counts as confirmed only then; a row
that cannot become a message is parked the same way. A nack or a missing confirm means
publishing again (inside the channel). Losing the connection completes
:attr:`Publisher.closed` with a :class:`SinkError`: the relay then restarts its session,
and everything not yet confirmed is streamed again from the slot.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from typing import Any

import orjson

from cdc.config import RelaySettings
from cdc.core.confirms import ConfirmToken, Kind
from cdc.core.outbox import Malformed, OutboxEvent
from cdc.core.watermark import Txn
from cdc.errors import SinkError
from cdc.shell import broker_connect
from cdc.shell.broker import ConfirmChannel
from cdc.shell.metrics import Metrics
from cdc.wire import amqp as wire

log = logging.getLogger(__name__)

_JSON = "application/json"
_PERSISTENT = 2
# A content header frame is its property block plus 7 bytes of frame header, 12 of class,
# weight and body size, and the end byte; the whole frame must fit the negotiated frame_max.
_HEADER_FRAME_OVERHEAD = 20
_new_token = tuple.__new__


class Publisher:
    """One broker connection and one confirm-mode channel, owned by a relay session."""

    def __init__(
        self,
        settings: RelaySettings,
        metrics: Metrics,
        on_confirm: Callable[[list[Txn]], None],
        on_blocked: Callable[[bool], None] | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._on_confirm = on_confirm
        self._on_blocked = on_blocked
        self._exchange = settings.exchange
        self._channel: ConfirmChannel | None = None
        self._frame_max = 0

    async def connect(self) -> None:
        """Connect, open a confirm channel and declare the exchange and the parking queue."""
        s = self._settings
        self._channel = await broker_connect.connect(
            s.broker_address(),
            confirm_timeout=s.confirm_timeout,
            on_ack=self._acked,
            on_returned=self._returned,
            on_republish=lambda reason: self._metrics.republished.labels(reason=reason).inc(),
            on_blocked=self._on_blocked,
            linger=s.publish_linger,
        )
        self._frame_max = self._channel.frame_max
        try:
            await self._channel.declare_exchange(s.exchange, "topic")
            await self._channel.declare_queue(s.parking_queue)
        except SinkError:
            await self.close()
            raise

    @property
    def closed(self) -> asyncio.Future[None]:
        """Completes with the SinkError that ended the connection."""
        if self._channel is None:
            raise SinkError("the publisher is not connected")
        return self._channel.closed

    async def wait_writable(self) -> None:
        """Wait while the socket buffer is full or the broker blocks publishers."""
        if self._channel is None:
            raise SinkError("the publisher is not connected")
        await self._channel.wait_writable()

    async def close(self) -> None:
        """Close the connection; unconfirmed events will be re-sent by the next session."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close()

    def publish(self, txn: Txn, item: OutboxEvent | Malformed) -> None:
        """Send ``item`` now; ``on_confirm`` gets ``txn`` once it (or its parked copy) is in."""
        channel = self._channel
        if channel is None:
            raise SinkError("the publisher is not connected")
        if type(item) is OutboxEvent:
            key = item.routing_key
            message_id = item.message_id or uuid.uuid4().hex
            props = wire.properties_block(
                content_type=_JSON,
                delivery_mode=_PERSISTENT,
                headers=item.headers,
                message_id=message_id,
                message_type=key,
                timestamp=item.timestamp,
            )
            if len(props) + _HEADER_FRAME_OVERHEAD > self._frame_max:
                # The broker would close the connection (FRAME_ERROR) on every attempt.
                item = self._oversized(item, len(props) + _HEADER_FRAME_OVERHEAD)
            else:
                frames = wire.publish_frames(
                    1, self._exchange, key, props, item.body, self._frame_max
                )
                # As ConfirmToken(...) but without its __new__, a Python function.
                token = _new_token(ConfirmToken, (txn, item, Kind.EVENT))
                channel.publish(frames, token, self._exchange, key, message_id)
                return
        assert isinstance(item, Malformed)
        self._park_malformed(txn, item)

    def _park_malformed(self, txn: Txn, item: Malformed) -> None:
        log.warning("parking malformed row", extra={"id": item.message_id, "why": item.reason})
        headers = self._parking_headers(Kind.MALFORMED, item.reason, item.routing_key)
        body = orjson.dumps(item.row)
        self._park(txn, item, Kind.MALFORMED, item.message_id, item.routing_key, headers, body)

    def _oversized(self, event: OutboxEvent, size: int) -> Malformed:
        """The malformed form of an event whose content header cannot fit one frame."""
        reason = (
            f"content header of {size} bytes exceeds the broker's frame_max of "
            f"{self._frame_max} bytes (negotiated); make the row's headers smaller"
        )
        row: dict[str, str | None] = {
            "id": event.message_id,
            "event_type": event.routing_key,
            "payload": str(event.body, "utf-8", "replace"),
            "headers": orjson.dumps(event.headers).decode(),
        }
        return Malformed(event.message_id, event.routing_key, reason, row)

    def _park(
        self,
        txn: Txn,
        item: OutboxEvent | Malformed,
        kind: Kind,
        message_id: str | None,
        message_type: str | None,
        headers: dict[str, Any],
        body: bytes | memoryview,
        timestamp: Any = None,
    ) -> None:
        assert self._channel is not None
        queue = self._settings.parking_queue
        message_id = message_id or uuid.uuid4().hex
        props = wire.properties_block(
            content_type=_JSON,
            delivery_mode=_PERSISTENT,
            headers=headers,
            message_id=message_id,
            message_type=message_type,
            timestamp=timestamp,
        )
        size = len(props) + _HEADER_FRAME_OVERHEAD
        if size > self._frame_max and isinstance(item, OutboxEvent):
            # An unroutable event whose headers fit, but not with the parking headers added.
            self._park_malformed(txn, self._oversized(item, size))
            return
        frames = wire.publish_frames(1, "", queue, props, body, self._frame_max)
        self._channel.publish(frames, ConfirmToken(txn, item, kind), "", queue, message_id)

    def _parking_headers(self, kind: Kind, reason: str, key: str | None) -> dict[str, Any]:
        return {
            "x-parked-kind": kind.value,
            "x-parked-reason": reason,
            "x-original-exchange": self._exchange,
            "x-original-routing-key": key,
        }

    def _acked(self, tokens: list[ConfirmToken]) -> None:
        txns = []
        published = 0
        event = Kind.EVENT
        for txn, _, kind in tokens:
            txns.append(txn)
            if kind is event:
                published += 1
            else:
                self._metrics.parked.labels(kind=kind.value).inc()
        if published:
            self._metrics.published.inc(published)
        self._on_confirm(txns)

    def _returned(self, token: ConfirmToken, reason: str) -> None:
        txn, item, kind = token
        if kind is not Kind.EVENT or not isinstance(item, OutboxEvent):
            assert self._channel is not None
            self._channel.fail(
                SinkError(
                    f"parking queue {self._settings.parking_queue!r} is missing; "
                    "it is re-declared on reconnect"
                )
            )
            return
        key = item.routing_key
        log.warning("parking unroutable event", extra={"id": item.message_id, "key": key})
        headers = {**item.headers, **self._parking_headers(Kind.UNROUTABLE, reason, key)}
        self._park(
            txn, item, Kind.UNROUTABLE, item.message_id, key, headers, item.body, item.timestamp
        )
