"""From deliveries to the work of a batch: the messages to run, and those rejected outright.

For each delivery: which of its headers the runtime trusts (``headers.came_back``), its
original routing key, its attempt number (``policy.attempt_of``), then its route and
validated payload (``dispatch.resolve``). A rejected message (no message id, no route, a body
that does not validate, a retry bundle that cannot be decoded) never reaches a handler: its
disposition is decided here (parked).

A retry bundle (``bundle``) that came back from the worker's own retry queue is unpacked as
it is delivered (:func:`unpack`): each member becomes a delivery of its own, with the
bundle's delivery tag, redelivered flag and ``x-delivery-count``. A bundle-looking message
that did not come back (an outsider's) is an ordinary message and is never unpacked.
"""

from __future__ import annotations

from collections.abc import Sequence

from cdc.wire.deliveries import Delivered
from consumers.errors import BadBundle
from consumers.runtime import bundle
from consumers.runtime import headers as hdr
from consumers.runtime.batch import BatchMessage
from consumers.runtime.copies import Handled
from consumers.runtime.dispatch import Rejected, resolve
from consumers.runtime.policy import RetryRules, attempt_of, decide
from consumers.runtime.spec import Delivery, Route


def intake(
    routes: Sequence[Route], rules: RetryRules, batch: Sequence[tuple[str, Delivered]]
) -> tuple[list[BatchMessage], list[Handled]]:
    """Route and validate ``batch`` (``(queue, message)`` pairs in delivery order): the valid
    items, and the rejected ones with their disposition."""
    items: list[BatchMessage] = []
    rejected: list[Handled] = []
    for queue, message in batch:
        props = message.properties
        # Our own retry headers count only on our own copies (see headers.came_back).
        trusted = hdr.came_back(message.exchange, queue, props.headers)
        headers = hdr.own_headers(props.headers, trusted=trusted)
        key = hdr.original_routing_key(headers, message.routing_key)
        attempt = attempt_of(headers, redelivered=message.redelivered)
        delivery = Delivery(str(props.message_id), key, headers, attempt, message.body)
        found = (
            _undecodable(message)
            if trusted and bundle.is_bundle(headers)
            else resolve(routes, key, props.message_id, message.body)
        )
        if isinstance(found, Rejected):
            rejected.append(Handled(queue, message, delivery, decide(attempt, found, rules)))
            continue
        items.append(BatchMessage(delivery, found.route, found.payload, queue, message=message))
    return items, rejected


def unpack(queue: str, message: Delivered) -> list[Delivered]:
    """The deliveries ``message`` from ``queue`` stands for: the members of a retry bundle
    that came back, else ``message`` itself (an undecodable bundle too: intake parks it)."""
    props = message.properties
    headers = props.headers
    if not bundle.is_bundle(headers) or not hdr.came_back(message.exchange, queue, headers):
        return [message]
    try:
        members = bundle.decode(message.body, headers[bundle.BUNDLE_HEADER])  # type: ignore[index]
    except BadBundle:
        return [message]
    count = (headers or {}).get(hdr.DELIVERY_COUNT_HEADER)
    out = []
    for member in members:
        if count is not None:
            member.properties.headers = {
                **(member.properties.headers or {}),
                hdr.DELIVERY_COUNT_HEADER: count,
            }
        out.append(message._replace(
            exchange="", routing_key=member.routing_key, properties=member.properties,
            body=member.body,
        ))
    return out


def _undecodable(message: Delivered) -> Rejected:
    """Why a retry bundle that :func:`unpack` left whole cannot be handled."""
    headers = message.properties.headers or {}
    try:
        bundle.decode(message.body, headers.get(bundle.BUNDLE_HEADER))
    except BadBundle as exc:
        return Rejected(hdr.KIND_VALIDATION, f"retry bundle cannot be decoded: {exc}")
    return Rejected(hdr.KIND_VALIDATION, "retry bundle was not unpacked")
