"""The confirm tracker (cdc/core/confirms.py): which publish each ack, nack and return is about.

Real cases first: out-of-order and ``multiple`` acks, returns matched in publish order even
with equal message ids, nacks re-sent with a growing backoff, expiry on a live and on a
silent connection, the stopped clock while the broker blocks publishers. Then a property:
whatever the broker does and in whatever order (acks and nacks of single tags and ranges,
returns, expiry, re-sends), every publish is settled exactly once, returned exactly when
its routing key is unroutable, and neither ``first_open_tag`` nor the slot's watermark
passes a publish that is not settled.
"""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from cdc.core.confirms import RETRY_FIRST, RETRY_MAX, ConfirmTracker, Publish
from cdc.core.watermark import Txn, Watermark

TIMEOUT = 5.0
EX = "events"


def tracker() -> ConfirmTracker[bytes, str]:
    return ConfirmTracker(TIMEOUT, jitter=lambda: 0.5)  # jitter factor 1.0: exact delays


def send(t: ConfirmTracker[bytes, str], *tokens: str, key: str = "k", now: float = 0.0) -> None:
    for token in tokens:
        t.publish(token.encode(), token, EX, key, f"id-{token}", now)


def test_acks_out_of_order_settle_each_publish_once():
    t = tracker()
    send(t, "a", "b", "c")
    assert t.ack(2, multiple=False) == (["b"], [])
    assert t.first_open_tag == 1 and t.in_flight == 3  # "a" still holds the watermark
    assert t.ack(2, multiple=False) == ([], [])  # a repeated confirm settles nothing
    assert t.ack(1, multiple=False) == (["a"], [])
    assert t.first_open_tag == 3 and t.in_flight == 1
    assert t.ack(3, multiple=False) == (["c"], [])
    assert t.in_flight == 0 and t.first_open_tag == 4


def test_a_multiple_ack_settles_the_whole_range_in_publish_order():
    t = tracker()
    send(t, "a", "b", "c", "d")
    assert t.ack(2, multiple=False) == (["b"], [])
    assert t.ack(3, multiple=True) == (["a", "c"], [])
    assert t.first_open_tag == 4
    assert t.ack(9, multiple=True) == (["d"], [])  # beyond the last tag: all there is
    assert t.in_flight == 0


def test_returns_match_the_oldest_unreturned_publish_with_equal_ids():
    t = tracker()
    for token, key, mid in [("a", "ok", "x"), ("b", "nobody", "dup"), ("c", "ok", "y"),
                            ("d", "nobody", "dup")]:  # fmt: skip
        t.publish(b"", token, EX, key, mid, 0.0)
    assert t.returned(EX, "nobody", "dup", 312, "NO_ROUTE")
    assert t.returned(EX, "nobody", "dup", 312, "NO_ROUTE")
    assert not t.returned(EX, "nobody", "dup", 312, "NO_ROUTE")  # no third such publish
    assert not t.returned("other", "ok", "x", 312, "NO_ROUTE")  # the exchange counts too
    acked, returned = t.ack(4, multiple=True)
    assert acked == ["a", "c"]
    assert returned == [("b", "unroutable: 312 NO_ROUTE"), ("d", "unroutable: 312 NO_ROUTE")]


def test_nacks_are_sent_again_with_a_doubling_capped_backoff():
    t = tracker()
    send(t, "a", "b")
    t.returned(EX, "k", "id-a", 312, "NO_ROUTE")
    (resend,) = t.nack(1, multiple=False)
    assert resend.publish.token == "a" and resend.delay == RETRY_FIRST
    assert resend.publish.returned is None  # the new copy may well be routed
    delays = []
    for _ in range(12):
        t.again(resend.publish, now=1.0)
        (resend,) = t.nack(t.first_open_tag + t.in_flight - 1, multiple=False)
        delays.append(resend.delay)
    assert delays[:3] == [RETRY_FIRST * 2, RETRY_FIRST * 4, RETRY_FIRST * 8]
    assert delays[-1] == RETRY_MAX
    t.again(resend.publish, now=2.0)
    assert t.ack(1, multiple=False) == ([], [])  # "a" left tag 1 when it was nacked
    assert t.ack(2, multiple=False) == (["b"], [])
    assert t.ack(t.first_open_tag, multiple=False) == (["a"], [])
    assert t.in_flight == 0


def test_the_jitter_spreads_re_sends_between_half_and_one_and_a_half_the_delay():
    low = ConfirmTracker[bytes, str](TIMEOUT, jitter=lambda: 0.0)
    high = ConfirmTracker[bytes, str](TIMEOUT, jitter=lambda: 0.999)
    for t in (low, high):
        send(t, "a")
    assert low.nack(1, multiple=False)[0].delay == RETRY_FIRST * 0.5
    assert high.nack(1, multiple=True)[0].delay == pytest.approx(RETRY_FIRST * 1.499)


def test_expiry_on_a_live_connection_hands_back_only_the_overdue():
    t = tracker()
    send(t, "a", "b", now=0.0)
    send(t, "c", now=3.0)
    assert t.returned(EX, "k", "id-a", 312, "NO_ROUTE")
    assert t.expire(now=TIMEOUT - 0.1, last_read=4.0).resend == ()
    expired = t.expire(now=TIMEOUT + 1, last_read=4.0)
    assert expired.silent_for is None
    assert [p.token for p in expired.resend] == ["a", "b"]
    assert expired.resend[0].returned is None  # the new copy may well be routed
    assert t.first_open_tag == 3  # only "c" is still out under its first tag
    for publish in expired.resend:
        t.again(publish, now=TIMEOUT + 1)
    assert t.ack(2, multiple=True) == ([], [])  # the late confirm of the old copies
    assert t.ack(5, multiple=True) == (["c", "a", "b"], [])


def test_expiry_on_a_silent_connection_says_it_is_dead_and_hands_back_nothing():
    t = tracker()
    send(t, "a", "b", now=10.0)
    expired = t.expire(now=10.0 + TIMEOUT + 2, last_read=9.0)
    assert expired.resend == () and expired.silent_for == TIMEOUT + 2
    assert t.in_flight == 2  # nothing settled: the next session streams them again


def test_a_blocked_broker_stops_the_clock_and_unblocking_restarts_it():
    t = tracker()
    send(t, "a", now=0.0)
    assert t.block(True, now=1.0) and not t.block(True, now=2.0)
    assert t.expire(now=100.0, last_read=0.0) == t.expire(now=200.0, last_read=0.0)
    assert t.expire(now=200.0, last_read=0.0).resend == ()
    assert t.block(False, now=300.0)
    assert t.expire(now=300.0 + TIMEOUT / 2, last_read=0.0).silent_for is None
    assert t.expire(now=300.0 + TIMEOUT, last_read=301.0).resend[0].token == "a"


# -- the property ------------------------------------------------------------------------------

ROUTED, UNROUTABLE = "routed", "unroutable"


class BrokerInterleavings(RuleBasedStateMachine):
    """A tracker driven by a broker model that may answer in any order the protocol allows.

    The broker takes publishes in tag order (``process``): an unroutable one is returned at
    that moment; it confirms processed tags in any order, singly or as a range of every
    processed one up to a tag, with an ack or a nack. Each publish is one transaction of
    the slot's watermark, confirmed when the tracker settles it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.t: ConfirmTracker[bytes, int] = ConfirmTracker(TIMEOUT, jitter=lambda: 0.5)
        self.now = 0.0
        self.tokens = 0
        self.key: dict[int, str] = {}  # token -> routing key
        self.mid: dict[int, str] = {}  # token -> message id (two values: many are equal)
        self.txn: dict[int, Txn] = {}
        self.watermark = Watermark()
        self.broker_next = 1
        self.sent: dict[int, tuple[int, str]] = {}  # broker tag -> (token, key) of that copy
        self.unprocessed: list[int] = []
        self.unconfirmed: set[int] = set()  # processed, not yet acked or nacked
        self.open: dict[int, int] = {}  # tracker's view: unsettled tag -> token
        self.again: list[Publish[bytes, int]] = []
        self.acked: Counter[int] = Counter()
        self.returned: Counter[int] = Counter()

    def _sent(self, token: int) -> None:
        tag = self.broker_next
        self.broker_next += 1
        self.sent[tag] = (token, self.key[token])
        self.unprocessed.append(tag)
        self.open[tag] = token

    @rule(unroutable=st.booleans(), mid=st.sampled_from(["x", "y"]))
    def publish(self, unroutable: bool, mid: str) -> None:
        token = self.tokens
        self.tokens += 1
        self.key[token] = UNROUTABLE if unroutable else ROUTED
        self.mid[token] = mid
        txn = self.watermark.begin(token, 0.0)
        self.watermark.add_event(txn)
        self.watermark.commit(txn, 10 * (token + 1))
        self.txn[token] = txn
        self.t.publish(b"", token, EX, self.key[token], mid, self.now)
        self._sent(token)

    @precondition(lambda self: self.unprocessed)
    @rule()
    def process(self) -> None:
        tag = self.unprocessed.pop(0)
        self.unconfirmed.add(tag)
        token, key = self.sent[tag]
        if key == UNROUTABLE:
            self.t.returned(EX, key, self.mid[token], 312, "NO_ROUTE")

    @precondition(lambda self: self.unconfirmed)
    @rule(data=st.data(), multiple=st.booleans(), ack=st.booleans())
    def confirm(self, data: st.DataObject, multiple: bool, ack: bool) -> None:
        tag = data.draw(st.sampled_from(sorted(self.unconfirmed)))
        covered = {t for t in self.unconfirmed if t <= tag} if multiple else {tag}
        self.unconfirmed -= covered
        before = {t: tok for t, tok in self.open.items() if t in covered}
        for t in covered:
            self.open.pop(t, None)
        if ack:
            acked, returned = self.t.ack(tag, multiple)
            self._settle(acked, [token for token, _ in returned])
            assert sorted([*acked, *(tok for tok, _ in returned)]) == sorted(before.values())
        else:
            resends = self.t.nack(tag, multiple)
            assert sorted(r.publish.token for r in resends) == sorted(before.values())
            self.again.extend(r.publish for r in resends)

    @precondition(lambda self: self.again)
    @rule(data=st.data())
    def resend(self, data: st.DataObject) -> None:
        publish = self.again.pop(data.draw(st.integers(0, len(self.again) - 1)))
        self.t.again(publish, self.now)
        self._sent(publish.token)

    @rule(seconds=st.sampled_from([0.5, TIMEOUT / 2, TIMEOUT + 0.1]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    @rule()
    def expire(self) -> None:
        expired = self.t.expire(self.now, last_read=self.now)  # a live connection
        assert expired.silent_for is None
        for publish in expired.resend:
            tag = next(t for t, tok in self.open.items() if tok == publish.token)
            del self.open[tag]
        self.again.extend(expired.resend)

    @rule(blocked=st.booleans())
    def block(self, blocked: bool) -> None:
        self.t.block(blocked, self.now)

    def _settle(self, acked: list[int], returned: list[int]) -> None:
        for token in acked:
            assert self.key[token] == ROUTED, token
            self.acked[token] += 1
            self.watermark.confirm(self.txn[token])
        for token in returned:
            assert self.key[token] == UNROUTABLE, token
            self.returned[token] += 1
            self.watermark.confirm(self.txn[token])

    @invariant()
    def settled_at_most_once(self) -> None:
        assert all(n == 1 for n in (self.acked + self.returned).values())
        assert not set(self.acked) & set(self.returned)

    @invariant()
    def nothing_passes_an_unsettled_publish(self) -> None:
        assert self.t.first_open_tag == min(self.open, default=self.broker_next)
        assert self.t.in_flight == self.broker_next - self.t.first_open_tag
        unsettled = set(self.key) - set(self.acked) - set(self.returned)
        if unsettled:
            assert self.watermark.flushed < 10 * (min(unsettled) + 1)

    def teardown(self) -> None:
        """The broker catches up and confirms everything: every publish settles once."""
        self.t.block(False, self.now)
        for _ in range(4 * self.tokens + 4):
            while self.again:
                self.resend_all()
            while self.unprocessed:
                self.process()
            if self.unconfirmed:
                tag = max(self.unconfirmed)
                self.unconfirmed.clear()
                self.open.clear()
                acked, returned = self.t.ack(tag, True)
                self._settle(acked, [token for token, _ in returned])
        assert sorted(self.acked + self.returned) == list(range(self.tokens))
        assert self.t.in_flight == 0
        assert self.watermark.flushed == 10 * self.tokens

    def resend_all(self) -> None:
        publish = self.again.pop(0)
        self.t.again(publish, self.now)
        self._sent(publish.token)


TestBrokerInterleavings = BrokerInterleavings.TestCase
TestBrokerInterleavings.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
