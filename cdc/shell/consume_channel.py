"""A consuming channel on the relay's own AMQP connection (``broker.ConfirmChannel``).

The workers read their queues through this rather than through aiormq: aiormq reads each
frame with its own awaits, decodes it into pamqp objects and starts a task per delivered
message, which was about a third of a worker's CPU per message. Here the frames of a
delivery are put together as they arrive (``cdc.wire.deliveries``) and handed to
``on_delivery`` in the same call; acks are encoded by hand and written once per event-loop
turn, with whatever else is buffered.

Contract: everything :class:`~cdc.shell.broker.ConfirmChannel` promises (handshake,
heartbeats, :attr:`closed` with the reason), plus :meth:`consume` (a queue with its own
prefetch), :meth:`ack` and :meth:`cancel`. ``on_delivery`` runs for each message in the
order the broker sent them. Nothing is published on this channel.
"""

from __future__ import annotations

from collections.abc import Callable

from pamqp import commands

from cdc.errors import SinkError
from cdc.service.urls import AmqpUrl
from cdc.shell import broker_connect
from cdc.shell.broker import ConfirmChannel
from cdc.wire import amqp as wire
from cdc.wire.deliveries import DELIVER, Delivered, DeliveryReader, ack_frame

_CHANNEL = 1
_BROKER_CANCEL = 0x003C001E  # Basic.Cancel sent by the broker


def _unused(*_args: object) -> None:
    """Publish callbacks of a channel that publishes nothing."""


class ConsumeChannel(ConfirmChannel):
    """See the module docstring."""

    def __init__(self, on_delivery: Callable[[Delivered], None]) -> None:
        super().__init__(
            confirm_timeout=30.0, on_ack=_unused, on_returned=_unused, on_republish=_unused
        )
        self._on_delivery = on_delivery
        self._deliveries = DeliveryReader()

    async def consume(self, queue: str, prefetch: int, tag: str) -> None:
        """Start consumer ``tag`` of ``queue`` holding at most ``prefetch`` unacked messages
        (its own limit: quorum queues have no channel-wide one). Its deliveries can reach
        ``on_delivery`` before this returns."""
        await self.call(commands.Basic.Qos(prefetch_count=prefetch), commands.Basic.QosOk)
        consume = commands.Basic.Consume(queue=queue, consumer_tag=tag)
        await self.call(consume, commands.Basic.ConsumeOk)

    def ack(self, delivery_tag: int, multiple: bool) -> None:
        """Ack ``delivery_tag`` (and every earlier one, if ``multiple``): written at the end of
        this loop turn. Raises the reason if the channel is closed."""
        if self.closed.done():
            raise self.error()
        self._queue(ack_frame(_CHANNEL, delivery_tag, multiple))

    async def cancel(self, consumer_tag: str) -> None:
        """Stop the consumer: nothing is delivered to it after this returns."""
        await self.call(commands.Basic.Cancel(consumer_tag=consumer_tag), commands.Basic.CancelOk)

    def _on_method(self, channel: int, payload: bytes) -> None:
        which = wire.method_id(payload)
        if which == DELIVER:
            self._deliveries.start(payload)
        elif which == _BROKER_CANCEL:
            # The queue was deleted (or its leader lost, for some queue types): a new
            # session declares it again and consumes anew.
            self._fail(SinkError("the broker cancelled a consumer (its queue is gone?)"))
        else:
            super()._on_method(channel, payload)

    def _on_content(self, kind: int, payload: bytes) -> None:
        if not self._deliveries.active:
            super()._on_content(kind, payload)
            return
        delivered = self._deliveries.content(kind, payload)
        if delivered is not None:
            self._on_delivery(delivered)


async def open_consume_channel(
    address: AmqpUrl, on_delivery: Callable[[Delivered], None]
) -> ConsumeChannel:
    """Connect to ``address`` and open a :class:`ConsumeChannel` (SinkError on failure,
    RefusedError when the broker refuses the login, the vhost or the TLS certificate)."""
    channel = ConsumeChannel(on_delivery)
    await broker_connect.open_channel(address, channel)
    return channel
