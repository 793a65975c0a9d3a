"""Acks of messages that finish out of order, and the per-endpoint webhook breaker."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from consumers.notifications.breaker import Breaker
from consumers.runtime.acks import AckTracker


def _tracker(n: int, hold: int = 0) -> AckTracker:
    t = AckTracker(hold)
    for tag in range(1, n + 1):
        t.delivered(tag)
    return t


def test_in_order_batches_are_one_multiple_ack_each():
    t = _tracker(6)
    assert t.settle([1, 2, 3]) == [(3, True)]
    assert t.settle([4, 5, 6]) == [(6, True)]
    assert len(t) == 0


def test_a_finished_tag_behind_an_unfinished_one_is_acked_alone_at_once():
    t = _tracker(5)
    assert t.settle([3, 4]) == [(3, False), (4, False)]  # 1 and 2 still running
    assert t.settle([1]) == [(1, True)]
    # 2 and 5 finish: one multiple ack on 5 covers 2 (3 and 4 were acked already)
    assert t.settle([2, 5]) == [(5, True)]
    assert len(t) == 0


def test_every_tag_is_acked_exactly_once_and_multiple_never_covers_an_unfinished_one():
    t = _tracker(5)
    acks = t.settle([2, 5]) + t.settle([1]) + t.settle([3, 4])
    covered: list[int] = []
    for tag, multiple in acks:
        covered += [x for x in range(1, tag + 1) if x not in covered] if multiple else [tag]
    assert sorted(covered) == [1, 2, 3, 4, 5]


def test_finished_tags_behind_the_front_wait_for_its_multiple_ack_up_to_hold():
    t = _tracker(6, hold=2)
    assert t.settle([3, 4]) == []  # 1 and 2 still running: 3 and 4 wait
    assert t.settle([1]) == [(1, True)]
    assert t.settle([2]) == [(4, True)]  # one ack for 2, 3 and 4
    assert len(t) == 2


def test_more_than_hold_finished_behind_the_front_are_all_acked_alone_at_once():
    t = _tracker(8, hold=2)
    assert t.settle([3, 4]) == []
    assert t.settle([6]) == [(3, False), (4, False), (6, False)]  # 3 waiting: too many
    assert t.settle([5]) == []  # waits again, alone
    assert t.settle([1, 2]) == [(5, True)]
    assert t.settle([7, 8]) == [(8, True)]
    assert len(t) == 0


def test_tags_behind_a_front_awaiting_its_copys_confirm_wait_however_many():
    t = _tracker(10, hold=2)
    t.confirming([2])  # its retry copy is on its way to the broker
    assert t.settle([1, 3, 4, 5, 6, 7, 8, 9, 10]) == [(1, True)]  # no ack alone
    assert t.settle([2]) == [(10, True)]  # confirmed: one ack for the rest
    assert len(t) == 0


def test_once_the_confirmed_front_moves_on_a_slow_one_behind_it_releases_the_rest():
    t = _tracker(8, hold=2)
    t.confirming([1])
    assert t.settle([3, 4, 5, 6]) == []  # 1 awaits its confirm, 2 is slow
    assert t.settle([1]) == [(1, True), (3, False), (4, False), (5, False), (6, False)]
    assert t.settle([2, 7, 8]) == [(8, True)]
    assert len(t) == 0


def _finish_in_random_chunks(
    t: AckTracker, n: int, rnd: random.Random, hold: int | None, marks: float = 0.0
) -> None:
    """Finish tags 1..n in random order and chunks, marking a ``marks`` share of the tags
    not finished yet as awaiting a confirm before each chunk. Every ack must name a tag not
    acked before and settle only finished ones; with ``hold``, at most that many finished
    tags may wait; in the end every tag is acked."""
    order = list(range(1, n + 1))
    rnd.shuffle(order)
    finished: set[int] = set()
    acked: set[int] = set()
    while order:
        k = rnd.randint(1, len(order))
        chunk, order = order[:k], order[k:]
        t.confirming(x for x in order if rnd.random() < marks)
        finished.update(chunk)
        for tag, multiple in t.settle(chunk):
            # the broker settles every still-unacked tag up to ``tag`` on a multiple ack
            newly = {x for x in range(1, tag + 1) if x not in acked} if multiple else {tag}
            assert tag not in acked  # the tag named is never one acked before
            assert newly <= finished  # nothing unfinished is acked
            acked |= newly
        if hold is not None:
            assert len(finished - acked) <= hold  # at most ``hold`` wait for the front
    assert acked == set(range(1, n + 1))
    assert len(t) == 0


@given(
    st.integers(min_value=1, max_value=60),
    st.integers(min_value=0, max_value=8),
    st.randoms(use_true_random=False),
)
def test_any_finishing_order_acks_each_tag_once_and_only_when_finished(
    n, hold, rnd: random.Random
):
    _finish_in_random_chunks(_tracker(n, hold), n, rnd, hold)


@given(st.integers(min_value=1, max_value=40), st.randoms(use_true_random=False))
def test_confirming_tags_never_make_an_ack_early_or_twice(n, rnd: random.Random):
    # More than ``hold`` may wait behind a front awaiting its confirm.
    _finish_in_random_chunks(_tracker(n, hold=2), n, rnd, None, marks=0.3)


def test_clear_forgets_the_channel():
    t = _tracker(3)
    t.clear()
    assert t.settle([1, 2]) == [] and len(t) == 0


def test_breaker_opens_after_failures_in_a_row_then_lets_one_probe_through():
    b = Breaker(failures=3, cooldown=10)
    e = "http://dead:80"
    for now in (0, 1):
        assert b.admit(e, now) is None
        b.failed(e, now)
    assert b.admit(e, 2) is None
    b.failed(e, 2)  # third failure in a row: open until 12
    assert b.is_open(e, 3)
    assert b.admit(e, 3) == 9
    assert b.admit("http://other:80", 3) is None  # per endpoint
    assert b.admit(e, 12) is None  # the probe
    assert b.admit(e, 12.5) is not None  # others wait for the probe's outcome
    b.failed(e, 13)  # probe failed: open again for the whole cooldown
    assert b.admit(e, 22) is not None
    assert b.admit(e, 23) is None
    b.succeeded(e)
    assert b.admit(e, 23.1) is None and not b.is_open(e, 23.1)


def test_a_success_resets_the_count_and_an_abandoned_probe_frees_the_next_one():
    b = Breaker(failures=2, cooldown=5)
    e = "https://x:443"
    b.failed(e, 0)
    b.succeeded(e)
    b.failed(e, 1)
    assert b.admit(e, 1) is None  # one failure since the success: still closed
    b.failed(e, 1)
    assert b.admit(e, 6) is None  # probe
    b.abandoned(e)  # cancelled before an outcome
    assert b.admit(e, 6.1) is None  # another probe may go


def test_a_disabled_breaker_admits_everything():
    b = Breaker(failures=0, cooldown=5)
    for now in range(10):
        b.failed("e", now)
    assert b.admit("e", 10) is None


def test_open_for_answers_like_admit_but_leaves_the_probe_to_the_send():
    b = Breaker(failures=2, cooldown=10)
    e = "http://dead:80"
    assert b.open_for(e, 0) is None  # never failed
    b.failed(e, 0)
    b.failed(e, 0)  # open until 10
    assert b.open_for(e, 4) == b.admit(e, 4) == 6
    assert b.open_for(e, 10) is None  # the probe is due...
    assert b.open_for(e, 10) is None  # ...and still free: asking did not take it
    assert b.admit(e, 10) is None  # the send takes it
    assert b.open_for(e, 10.5) == 10  # others fail at once while it runs
    assert Breaker(failures=0, cooldown=5).open_for(e, 0) is None


def test_take_probe_takes_the_one_probe_once_the_cooldown_is_over():
    b = Breaker(failures=2, cooldown=10)
    e = "http://dead:80"
    assert not b.take_probe(e, 0)  # never failed: closed, nothing to probe
    b.failed(e, 0)
    assert not b.take_probe(e, 0)  # one failure: still closed
    b.failed(e, 0)  # open until 10
    assert not b.take_probe(e, 9.9)
    assert b.take_probe(e, 10)
    assert not b.take_probe(e, 10)  # taken: one probe at a time
    assert b.open_for(e, 10.5) == 10 and b.admit(e, 10.5) == 10  # others fail at once
    b.abandoned(e)  # no outcome: free again
    assert b.take_probe(e, 11)
    b.failed(e, 11)  # its failure opens the endpoint for another cooldown
    assert not b.take_probe(e, 20) and b.take_probe(e, 21)
    b.succeeded(e)
    assert not b.take_probe(e, 21) and b.admit(e, 21) is None
    assert not Breaker(failures=0, cooldown=5).take_probe(e, 100)
