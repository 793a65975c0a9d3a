"""Declaring a worker's broker topology, idempotently (every declare is safe to repeat).

See ``names`` for what exists and why. Worker queues, retry queues and the parking queue are
durable, of ``CDC_WORKER_QUEUE_TYPE`` (quorum by default). Quorum retry queues dead-letter
*at least once* (the broker keeps an expired message until the origin queue has it), which
needs ``x-overflow: reject-publish``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel

from consumers.config import ConsumerSettings
from consumers.connect import AMQP_ERRORS
from consumers.errors import TopologyConflict
from consumers.runtime.headers import RETRY_QUEUE_HEADER
from consumers.runtime.names import Names


def queue_arguments(settings: ConsumerSettings) -> dict[str, Any]:
    """``x-queue-type`` of every queue the runtime declares."""
    return {"x-queue-type": settings.worker_queue_type}


def retry_queue_arguments(settings: ConsumerSettings, ttl_ms: int) -> dict[str, Any]:
    """Arguments of a TTL queue whose expired messages go back through the default exchange."""
    args: dict[str, Any] = {
        **queue_arguments(settings),
        "x-message-ttl": ttl_ms,
        "x-dead-letter-exchange": "",
    }
    if settings.worker_queue_type == "quorum":
        args["x-dead-letter-strategy"] = "at-least-once"
        args["x-overflow"] = "reject-publish"
    return args


async def declare(channel: AbstractChannel, settings: ConsumerSettings, names: Names) -> None:
    """Declare the events exchange, the worker queues and bindings, retries and parking.

    Raises :class:`TopologyConflict` when the broker has a same-named queue or exchange with
    other arguments (say a classic queue of the seed where a quorum queue is declared):
    retrying cannot fix that, an operator must.
    """
    try:
        await _declare(channel, settings, names)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise TopologyConflict(
            f"the broker refused the worker's topology: {exc}. A queue or exchange of that "
            "name exists with other arguments: set CDC_WORKER_QUEUE_TYPE to its type, or "
            "drain and delete it so the worker can declare it"
        ) from exc


async def _declare(channel: AbstractChannel, settings: ConsumerSettings, names: Names) -> None:
    events = await channel.declare_exchange(
        settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True
    )
    for name, patterns in names.queues:
        queue = await channel.declare_queue(
            name, durable=True, arguments=queue_arguments(settings)
        )
        for pattern in patterns:
            await queue.bind(events, routing_key=pattern)
    retry = await channel.declare_exchange(
        names.retry_exchange, aio_pika.ExchangeType.HEADERS, durable=True
    )
    for rq in names.retry_queues:
        queue = await channel.declare_queue(
            rq.name, durable=True, arguments=retry_queue_arguments(settings, rq.ttl_ms)
        )
        await queue.bind(retry, arguments={"x-match": "all", RETRY_QUEUE_HEADER: rq.name})
    await channel.declare_queue(
        names.parking_queue, durable=True, arguments=queue_arguments(settings)
    )


async def watch_depth(
    connection: Any, queue: str, depth: Callable[[int], None], every: float
) -> None:
    """Report ``queue``'s depth to ``depth`` every ``every`` seconds (a passive declare reads
    it), on a channel of its own, until cancelled or the connection goes."""
    with contextlib.suppress(*AMQP_ERRORS):
        channel = await connection.channel(publisher_confirms=False)
        raw = await channel.get_underlay_channel()
        while True:
            ok = await raw.queue_declare(queue, passive=True)
            depth(int(ok.message_count or 0))
            await asyncio.sleep(every)
