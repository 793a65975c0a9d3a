"""Carrying out a disposition that is a copy: the retry copy or the parked copy, confirmed.

:func:`policy.decide` says what becomes of a message; for :class:`~policy.RetryLater` and
:class:`~policy.Park` the runner publishes a copy here before it acks the original. A retry
copy goes to the worker's retry exchange, which routes it to the TTL queue of its delay (the
``cdc-retry-queue`` header) and, when that expires, back to the origin queue; a parked copy
goes to the parking queue through the default exchange. The copy keeps the body and the
properties, with the headers of ``headers.retry_headers`` / ``headers.parking_headers``.

:meth:`Copier.send_all` carries the retry copies of several messages of one origin queue
and one delay in one copy, a retry bundle (``bundle``; at most ``bundle.MAX_BODY`` bytes of
members each): each member is exactly the retry copy it would have had on its own. Parked
copies are always one per message (the parking queue's format is unchanged).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from aiormq.abc import AbstractChannel
from pamqp.commands import Basic

from cdc.wire.deliveries import Delivered
from consumers.errors import BrokerLost
from consumers.runtime import bundle
from consumers.runtime import headers as hdr
from consumers.runtime.batch import FAILED, BatchMessage
from consumers.runtime.metrics import WorkerMetrics
from consumers.runtime.names import Names
from consumers.runtime.policy import Ack, Disposition, Park, RetryLater, RetryRules, decide
from consumers.runtime.republish import copy_properties, publish_confirmed
from consumers.runtime.spec import Delivery

log = logging.getLogger(__name__)


#: A retry copy ready for a bundle: its message id (for the log) and its encoded bytes.
Encoded = tuple[str | None, bytes]


class Handled(NamedTuple):
    """A message the runner is done with, and its disposition (to carry out, then ack).

    A named tuple rather than a frozen dataclass: one is made for every message, and a
    frozen dataclass costs several times as much to build."""

    queue: str  # the origin queue it was consumed from
    message: Delivered
    delivery: Delivery
    disposition: Disposition


class Dispositions(NamedTuple):
    """A settlement split by what it needs: acks now, or a copy first."""

    acked: list[Handled]  # the ``handled`` ones first, then those of the items
    copies: list[Handled]
    acked_items: list[BatchMessage]
    copied: list[BatchMessage]


def dispositions(
    items: Sequence[BatchMessage], handled: Sequence[Handled], rules: RetryRules
) -> Dispositions:
    """What becomes of each of ``items`` (run, or failed: ``policy.decide``) together with
    the ``handled`` ones, split into those acked at once and those that need a copy."""
    out = Dispositions([], [], [], [])
    for h in handled:
        (out.acked if isinstance(h.disposition, Ack) else out.copies).append(h)
    for i in items:
        step = decide(i.delivery.attempt, i.error if i.outcome == FAILED else None, rules)
        ack = isinstance(step, Ack)
        (out.acked if ack else out.copies).append(Handled(i.queue, i.message, i.delivery, step))
        (out.acked_items if ack else out.copied).append(i)
    return out


@dataclass(frozen=True, slots=True)
class Copier:
    """Publishes the copies of one worker's messages (its names, metrics, confirm timeout)."""

    worker: str
    names: Names
    metrics: WorkerMetrics
    confirm_timeout: float

    async def send_all(self, channel: AbstractChannel | None, handled: list[Handled]) -> None:
        """Publish the copies of ``handled`` and wait for every confirm: retry copies of one
        origin queue and delay in bundles when there are two or more, the others one each."""
        groups: defaultdict[tuple[str, float], list[Handled]] = defaultdict(list)
        single = []
        for h in handled:
            step = h.disposition
            if isinstance(step, RetryLater):
                groups[h.queue, step.delay].append(h)
            elif not isinstance(step, Ack):
                single.append(h)
        sends = [self.send(channel, h) for h in single]
        for (queue, delay), group in groups.items():
            if len(group) == 1:
                sends.append(self.send(channel, group[0]))
            else:
                sends += [self._bundle(channel, queue, delay, c) for c in chunks(self, group)]
        await asyncio.gather(*sends)

    def member(self, handled: Handled) -> bundle.Member:
        """The retry copy of ``handled`` (disposition :class:`RetryLater`) as a bundle member."""
        step = handled.disposition
        assert isinstance(step, RetryLater)
        delivery = handled.delivery
        headers = hdr.retry_headers(
            delivery.headers,
            attempts=delivery.attempt,
            routing_key=delivery.routing_key,
            origin_queue=handled.queue,
            retry_queue=self.names.retry_queue_for(step.delay).name,
        )
        props = copy_properties(handled.message.properties, headers)
        return bundle.Member(handled.queue, props, handled.message.body)

    async def _bundle(
        self,
        channel: AbstractChannel | None,
        queue: str,
        delay: float,
        members: list[Encoded],
    ) -> None:
        """Publish ``members`` (message id and encoded retry copy, to ``queue`` after
        ``delay``) as one bundle."""
        if channel is None:
            raise BrokerLost("publishing channel is closed")
        retry = self.names.retry_queue_for(delay)
        props = Basic.Properties(
            headers={
                bundle.BUNDLE_HEADER: bundle.VERSION,
                hdr.ORIGIN_QUEUE_HEADER: queue,
                hdr.RETRY_QUEUE_HEADER: retry.name,  # the retry exchange routes on it
            },
            delivery_mode=2,
            message_id=f"cdc-bundle-{uuid.uuid4()}",
        )
        log.info(
            "retrying %d messages in %gs, in one bundle",
            len(members),
            delay,
            extra={"ids": [message_id for message_id, _ in members]},
        )
        await publish_confirmed(
            channel,
            bundle.join([encoded for _, encoded in members]),
            self.names.retry_exchange,
            queue,
            props,
            self.confirm_timeout,
        )
        self.metrics.retried.labels(worker=self.worker, queue=queue).inc(len(members))

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
        props = message.properties
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
            copy = bundle.Member(routing_key, copy_properties(props, headers), message.body)
        else:
            copy = self.member(handled)
            exchange = self.names.retry_exchange
            log.info(
                "retrying message in %gs",
                step.delay,
                extra={"id": props.message_id, "attempt": attempt, "why": step.reason},
            )
            counter = self.metrics.retried.labels(worker=self.worker, queue=queue)
        await publish_confirmed(
            channel,
            copy.body,
            exchange,
            copy.routing_key,
            copy.properties,
            self.confirm_timeout,
        )
        counter.inc()


def chunks(copier: Copier, group: list[Handled]) -> list[list[Encoded]]:
    """The members of ``group`` (message id, encoded retry copy) in bundles of at most
    ``bundle.MAX_BODY`` bytes each."""
    out: list[list[Encoded]] = [[]]
    size = 0
    for handled in group:
        member = copier.member(handled)
        encoded = bundle.encode_member(member)
        if out[-1] and size + len(encoded) > bundle.MAX_BODY:
            out.append([])
            size = 0
        out[-1].append((member.properties.message_id, encoded))
        size += len(encoded)
    return out
