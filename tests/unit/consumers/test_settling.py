"""Settling: acks leave in the tracker's order, and an original waits for its copy's confirm.

The channel and the copier here only record what they are asked; the copier yields as the
real one does (it waits for the confirm), the channel's acks are queued at once, as the
real one's are."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from cdc.errors import SinkError
from consumers.errors import BrokerLost
from consumers.runtime.acks import AckTracker
from consumers.runtime.copies import Handled
from consumers.runtime.members import MemberCounts
from consumers.runtime.policy import Ack, RetryLater
from consumers.runtime.settling import Settling


class _Channel:
    def __init__(self) -> None:
        self.sent: list[tuple[int, bool]] = []
        self.closed: SinkError | None = None

    def ack(self, tag: int, multiple: bool) -> None:
        if self.closed is not None:
            raise self.closed
        self.sent.append((tag, multiple))


class _Copier:
    def __init__(self) -> None:
        self.confirm = asyncio.Event()
        self.fail: BaseException | None = None
        self.published: list[int] = []

    async def send_all(self, channel: Any, handled: list[Handled]) -> None:
        self.published += [h.message.delivery_tag for h in handled]
        await self.confirm.wait()
        if self.fail is not None:
            raise self.fail


def _setup(tags: int, hold: int) -> tuple[Settling, _Channel, _Copier, AckTracker]:
    tracker, channel, copier = AckTracker(hold), _Channel(), _Copier()
    for tag in range(1, tags + 1):
        tracker.delivered(tag)
    settling = Settling(tracker, MemberCounts(), copier, lambda: None)  # type: ignore[arg-type]
    settling.channel = channel  # type: ignore[assignment]
    return settling, channel, copier, tracker


def _handled(channel: _Channel, *tags: int, retry: bool = False) -> list[Handled]:
    step = RetryLater(1.0, 1, "failed") if retry else Ack()
    return [
        Handled("q", SimpleNamespace(delivery_tag=t), None, step)  # type: ignore[arg-type]
        for t in tags
    ]


async def _nothing() -> None:
    return None


def _broker_accepts(sent: list[tuple[int, bool]]) -> set[int]:
    """What the broker would have settled; fails where it would close the channel."""
    acked: set[int] = set()
    for tag, multiple in sent:
        assert tag not in acked, f"ack of {tag} after it was settled: {sent}"
        acked |= set(range(1, tag + 1)) - acked if multiple else {tag}
    return acked


def test_two_settlements_leave_in_the_trackers_order() -> None:
    settling, channel, _, _ = _setup(5, hold=1)
    # 3 and 4 finish behind an unfinished 1: acked alone. Then 1, 2 and 5 finish: one
    # multiple ack on 5, which must not reach the broker before the single ack of 4.
    settling.ack(_handled(channel, 3, 4))
    settling.ack(_handled(channel, 1, 2, 5))
    assert channel.sent == [(3, False), (4, False), (5, True)]
    assert _broker_accepts(channel.sent) == {1, 2, 3, 4, 5}


def test_an_ack_on_a_closed_or_missing_channel_ends_the_session() -> None:
    settling, channel, _, _ = _setup(2, hold=0)
    channel.closed = SinkError("broker connection lost")
    with pytest.raises(BrokerLost, match="broker connection lost"):
        settling.ack(_handled(channel, 1))
    settling.cancel()  # between sessions there is no channel to ack on
    with pytest.raises(BrokerLost, match="closed"):
        settling.ack(_handled(channel, 2))


async def test_an_original_is_acked_once_its_copy_is_confirmed_and_holds_those_behind() -> None:
    settling, channel, copier, _ = _setup(6, hold=1)
    released: list[str] = []

    async def confirmed() -> None:
        released.append("1")

    settling.copy_then_ack(None, _handled(channel, 1, retry=True), confirmed)
    settling.ack(_handled(channel, 2, 3, 4, 5, 6))
    await asyncio.sleep(0)
    assert copier.published == [1]
    assert channel.sent == [] and released == [] and len(settling) == 1
    copier.confirm.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert released == ["1"] and len(settling) == 0
    assert channel.sent == [(6, True)]  # one ack for all, none alone


async def test_a_failed_copy_is_raised_by_check_and_its_original_stays_unacked() -> None:
    settling, channel, copier, tracker = _setup(2, hold=0)
    copier.fail = BrokerLost("publishing channel is closed")
    copier.confirm.set()
    settling.copy_then_ack(None, _handled(channel, 1, retry=True), _nothing)
    for _ in range(5):
        await asyncio.sleep(0)
    with pytest.raises(BrokerLost):
        settling.check()
    settling.check()  # raised once
    assert channel.sent == [] and len(tracker) == 2


async def test_cancel_forgets_the_copies_in_flight() -> None:
    settling, channel, _, _ = _setup(1, hold=0)
    settling.copy_then_ack(None, _handled(channel, 1, retry=True), _nothing)
    await asyncio.sleep(0)
    settling.cancel()
    await asyncio.sleep(0)
    assert len(settling) == 0 and channel.sent == []
    settling.check()
