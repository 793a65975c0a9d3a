"""What a settlement needs: an ack at once, or a copy (retry or parking) before the ack."""

from __future__ import annotations

from pydantic import BaseModel

from consumers.errors import PermanentError, Retry
from consumers.runtime.batch import DONE, FAILED, BatchMessage
from consumers.runtime.copies import Handled, dispositions
from consumers.runtime.policy import Ack, Park, RetryLater, RetryRules
from consumers.runtime.spec import Delivery, Route


class Payload(BaseModel):
    n: int


async def _handler(ctx, payload):  # pragma: no cover - no batch runs here
    return None


RULES = RetryRules(max_attempts=3, delays=(1.0, 30.0))


def _item(message_id: str, outcome: str, error: BaseException | None = None,
          attempt: int = 1) -> BatchMessage:
    delivery = Delivery(message_id, "device.started", {}, attempt, b"{}")
    item = BatchMessage(delivery, Route("#", Payload, _handler), Payload(n=1), "q")
    item.outcome, item.error, item.message = outcome, error, f"message {message_id}"
    return item


def test_run_messages_are_acked_and_failed_ones_copied_in_their_order():
    done = _item("a", DONE)
    dead = _item("b", FAILED, Retry("webhook keeps failing", after=35.0))
    broken = _item("c", FAILED, PermanentError("address refused"))
    last = _item("d", FAILED, Retry("timeout"), attempt=3)  # its last attempt
    out = dispositions([done, dead, broken, last], [], RULES)
    assert [h.delivery.message_id for h in out.acked] == ["a"]
    assert isinstance(out.acked[0].disposition, Ack) and out.acked[0].message == "message a"
    assert out.acked_items == [done] and out.copied == [dead, broken, last]
    steps = [h.disposition for h in out.copies]
    # No delay outlasts the 35 s asked for: the longest one.
    assert isinstance(steps[0], RetryLater) and steps[0].delay == 30.0
    assert isinstance(steps[1], Park) and steps[1].attempts == 1  # permanent: at once
    assert isinstance(steps[2], Park) and steps[2].attempts == 3  # attempts ran out


def test_messages_settled_earlier_come_first_and_keep_their_disposition():
    park = Park(1, "rejected", "bad")
    rejected = Handled("q", "message r", Delivery("r", "k", {}, 1, b"x"), park)
    fine = Handled("q", "message s", Delivery("s", "k", {}, 1, b"{}"), Ack())
    out = dispositions([_item("a", DONE)], [rejected, fine], RULES)
    assert [h.delivery.message_id for h in out.acked] == ["s", "a"]
    assert out.copies == [rejected] and out.copied == []
