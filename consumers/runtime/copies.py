"""Carrying out a disposition that is a copy: the retry copy or the parked copy, confirmed.

:func:`policy.decide` says what becomes of a message; for :class:`~policy.RetryLater` and
:class:`~policy.Park` the runner publishes a copy here before it acks the original. A retry
copy goes to the worker's retry exchange, which routes it to the TTL queue of its delay (the
``cdc-retry-queue`` header) and, when that expires, back to the origin queue; a parked copy
goes to the parking queue through the default exchange. The copy keeps the body and the
properties, with the headers of ``headers.retry_headers`` / ``headers.parking_headers``.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import NamedTuple

from aiormq.abc import AbstractChannel, DeliveredMessage

from consumers.errors import BrokerLost
from consumers.runtime import headers as hdr
from consumers.runtime.metrics import WorkerMetrics
from consumers.runtime.names import Names
from consumers.runtime.policy import Ack, Disposition, Park
from consumers.runtime.republish import copy_properties, publish_confirmed
from consumers.runtime.spec import Delivery

log = logging.getLogger(__name__)


class Handled(NamedTuple):
    """A message the runner is done with, and its disposition (to carry out, then ack).

    A named tuple rather than a frozen dataclass: one is made for every message, and a
    frozen dataclass costs several times as much to build."""

    queue: str  # the origin queue it was consumed from
    message: DeliveredMessage
    delivery: Delivery
    disposition: Disposition


@dataclass(frozen=True, slots=True)
class Copier:
    """Publishes the copies of one worker's messages (its names, metrics, confirm timeout)."""

    worker: str
    names: Names
    metrics: WorkerMetrics
    confirm_timeout: float

    async def send(self, channel: AbstractChannel | None, handled: Handled) -> None:
        """Publish the copy ``handled``'s disposition asks for (none for :class:`Ack`) on
        ``channel`` (confirm mode) and wait for its confirm; a closed channel raises
        :class:`BrokerLost`."""
        step = handled.disposition
        if isinstance(step, Ack):
            return
        if channel is None:
            raise BrokerLost("publishing channel is closed")
        queue, message, delivery = handled.queue, handled.message, handled.delivery
        key, attempt = delivery.routing_key, delivery.attempt
        props = message.header.properties
        if isinstance(step, Park):
            headers = hdr.parking_headers(
                delivery.headers,
                attempts=attempt,
                routing_key=key,
                origin_queue=queue,
                kind=step.kind,
                error=step.reason,
                consumer=self.worker,
                parked_at=dt.datetime.now(dt.UTC).isoformat(),
            )
            exchange, routing_key = "", self.names.parking_queue
            counter = self.metrics.parked.labels(worker=self.worker, queue=queue, reason=step.kind)
            log.warning(
                "parking message",
                extra={
                    "id": props.message_id,
                    "kind": step.kind,
                    "attempt": attempt,
                    "why": step.reason,
                },
            )
        else:
            retry = self.names.retry_queue_for(step.delay)
            headers = hdr.retry_headers(
                delivery.headers,
                attempts=attempt,
                routing_key=key,
                origin_queue=queue,
                retry_queue=retry.name,
            )
            exchange, routing_key = self.names.retry_exchange, queue
            log.info(
                "retrying message in %gs",
                step.delay,
                extra={"id": props.message_id, "attempt": attempt, "why": step.reason},
            )
            counter = self.metrics.retried.labels(worker=self.worker, queue=queue)
        await publish_confirmed(
            channel,
            message.body,
            exchange,
            routing_key,
            copy_properties(props, headers),
            self.confirm_timeout,
        )
        counter.inc()
