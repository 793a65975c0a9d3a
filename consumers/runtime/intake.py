"""From deliveries to the work of a batch: the messages to run, and those rejected outright.

For each delivery: which of its headers the runtime trusts (``headers.came_back``), its
original routing key, its attempt number (``policy.attempt_of``), then its route and
validated payload (``dispatch.resolve``). A rejected message (no message id, no route, a body
that does not validate) never reaches a handler: its disposition is decided here (parked).
"""

from __future__ import annotations

from collections.abc import Sequence

from aiormq.abc import DeliveredMessage

from consumers.runtime import headers as hdr
from consumers.runtime.batch import BatchMessage
from consumers.runtime.copies import Handled
from consumers.runtime.dispatch import Rejected, resolve
from consumers.runtime.policy import RetryRules, attempt_of, decide
from consumers.runtime.spec import Delivery, Route


def intake(
    routes: Sequence[Route], rules: RetryRules, batch: Sequence[tuple[str, DeliveredMessage]]
) -> tuple[list[BatchMessage], list[Handled]]:
    """Route and validate ``batch`` (``(queue, message)`` pairs in delivery order): the valid
    items, and the rejected ones with their disposition."""
    items: list[BatchMessage] = []
    rejected: list[Handled] = []
    for queue, message in batch:
        props = message.header.properties
        # Our own retry headers count only on our own copies (see headers.came_back).
        trusted = hdr.came_back(message.exchange, queue, props.headers)
        headers = hdr.own_headers(props.headers, trusted=trusted)
        key = hdr.original_routing_key(headers, message.routing_key or "")
        attempt = attempt_of(headers, redelivered=bool(message.redelivered))
        delivery = Delivery(str(props.message_id), key, headers, attempt, message.body)
        found = resolve(routes, key, props.message_id, message.body)
        if isinstance(found, Rejected):
            rejected.append(Handled(queue, message, delivery, decide(attempt, found, rules)))
            continue
        items.append(BatchMessage(delivery, found.route, found.payload, queue, message=message))
    return items, rejected
