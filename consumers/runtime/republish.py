"""Confirmed publishing of the copies the runtime makes: retries, parked messages, replays.

:func:`publish_confirmed` returns only once the broker has confirmed the copy. A nack or a
confirm timeout publishes again; a returned message (``mandatory``: no queue took it) means
the topology is missing and raises :class:`Unroutable`; a lost channel raises
:class:`BrokerLost`. Callers ack the original only after this returns, so a crash in between
leaves two copies (the inbox absorbs the duplicate) and never none.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Mapping
from typing import Any

import aiormq
from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from consumers.errors import BrokerLost, Unroutable

log = logging.getLogger(__name__)

_PERSISTENT = 2
_MAX_DELAY = 5.0


class _AbsentId(str):
    """An empty message id that stays absent on the wire.

    aiormq gives a publish without ``message_id`` a random one (it matches returned
    messages by id); pamqp leaves an empty string out of the frame. This value is truthy
    for the first and empty for the second, so a copy of a message that had no id has none.
    """

    __slots__ = ()

    def __bool__(self) -> bool:
        return True


#: ``message_id`` of a copy whose original had none.
ABSENT_ID: str = _AbsentId("")


def copy_properties(source: Basic.Properties, headers: Mapping[str, Any]) -> Basic.Properties:
    """The properties of a received message with new ``headers``, persistent.

    ``expiration`` and ``user_id`` are not copied: a per-message TTL would fight the retry
    queues' TTL, and the broker rejects a user id that is not the connection's. Every other
    property is kept as it was, an absent ``message_id`` included (:data:`ABSENT_ID`).
    """
    return Basic.Properties(
        content_type=source.content_type,
        content_encoding=source.content_encoding,
        headers=dict(headers),
        delivery_mode=_PERSISTENT,
        priority=source.priority,
        correlation_id=source.correlation_id,
        reply_to=source.reply_to,
        message_id=ABSENT_ID if source.message_id is None else source.message_id,
        timestamp=source.timestamp,
        message_type=source.message_type,
        app_id=source.app_id,
    )


async def publish_confirmed(
    channel: AbstractChannel,
    body: bytes,
    exchange: str,
    routing_key: str,
    properties: Basic.Properties,
    timeout: float,
) -> None:
    """Publish (mandatory, persistent) and wait for the broker's confirm; see module doc.

    A copy without ``message_id`` cannot be matched to a ``basic.return`` (the client
    library matches returns by id), so before publishing one to a queue by name (the
    default exchange) the queue is checked to exist: a missing one raises
    :class:`Unroutable` instead of a silent loss.
    """
    delay = 0.05
    if properties.message_id == "" and not exchange:
        await _check_queue(channel, routing_key)
    while True:
        try:
            await channel.basic_publish(
                body,
                exchange=exchange,
                routing_key=routing_key,
                properties=properties,
                mandatory=True,
                timeout=timeout,
            )
            return
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(
                f"no queue took the copy sent to exchange {exchange!r} with key {routing_key!r}"
            ) from exc
        except aiormq.exceptions.DeliveryError:
            log.warning("broker nacked a copy; publishing again", extra={"key": routing_key})
        except TimeoutError:
            log.warning("no confirm in time; publishing again", extra={"key": routing_key})
        except (aiormq.exceptions.AMQPError, OSError, RuntimeError) as exc:
            raise BrokerLost(f"broker connection lost while publishing: {exc!r}") from exc
        await asyncio.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, _MAX_DELAY)


async def _check_queue(channel: AbstractChannel, queue: str) -> None:
    try:
        await channel.queue_declare(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity as exc:
        raise Unroutable(f"no queue {queue!r} for a copy without message_id") from exc
    except (aiormq.exceptions.AMQPError, OSError, RuntimeError) as exc:
        raise BrokerLost(f"broker connection lost while checking {queue!r}: {exc!r}") from exc
