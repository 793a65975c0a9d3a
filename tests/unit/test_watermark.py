"""The ack watermark (cdc/core/watermark.py) against its delivery rules.

The flush LSN is the largest Commit end_lsn such that every event of every transaction up
to it has been confirmed by the broker; a keepalive's wal_end is taken only when idle.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cdc.core.lsn import parse_lsn
from cdc.core.watermark import Watermark

# Real-looking positions: a commit record at final_lsn, its end a little after it.
T1 = (parse_lsn("0/16B3748"), parse_lsn("0/16B3790"))
T2 = (parse_lsn("0/16B3A00"), parse_lsn("0/16B3A48"))
T3 = (parse_lsn("0/16B3C10"), parse_lsn("0/16B3C58"))


def _txn(wm: Watermark, lsns: tuple[int, int], events: int, *, commit: bool = True):
    txn = wm.begin(lsns[0], 1_780_000_000.0)
    for _ in range(events):
        wm.add_event(txn)
    if commit:
        wm.commit(txn, lsns[1])
    return txn


def test_fresh_watermark_starts_where_told_and_is_idle():
    wm = Watermark(flushed=T1[1])
    assert wm.flushed == T1[1]
    assert wm.in_flight == 0
    assert wm.oldest_pending_commit() is None
    assert wm.oldest_pending_commit() is None


def test_nothing_flushes_on_receipt_or_commit_while_events_are_unconfirmed():
    wm = Watermark()
    txn = _txn(wm, T1, 2)
    assert wm.flushed == 0
    assert wm.in_flight == 2
    wm.confirm(txn)
    assert wm.flushed == 0, "one of two events confirmed must not flush the transaction"
    assert wm.in_flight == 1
    wm.confirm(txn)
    assert wm.flushed == T1[1]
    assert wm.in_flight == 0
    assert wm.oldest_pending_commit() is None


def test_confirms_before_commit_flush_at_commit():
    wm = Watermark()
    txn = _txn(wm, T1, 2, commit=False)
    wm.confirm(txn)
    wm.confirm(txn)
    assert wm.flushed == 0, "an open transaction may still get events"
    assert wm.oldest_pending_commit() is not None
    wm.commit(txn, T1[1])
    assert wm.flushed == T1[1]


@pytest.mark.parametrize(
    ("order", "expected"),
    [
        # confirm sequence (txn index) -> flushed after each confirm
        ([0, 1, 2], [T1[1], T2[1], T3[1]]),
        ([2, 1, 0], [0, 0, T3[1]]),
        ([1, 0, 2], [0, T2[1], T3[1]]),
        ([0, 2, 1], [T1[1], T1[1], T3[1]]),
        ([2, 0, 1], [0, T1[1], T3[1]]),
    ],
    ids=["in-order", "reversed", "second-first", "last-before-middle", "last-first"],
)
def test_out_of_order_confirms_flush_only_the_confirmed_prefix(order, expected):
    wm = Watermark()
    txns = [_txn(wm, lsns, 1) for lsns in (T1, T2, T3)]
    seen = []
    for index in order:
        wm.confirm(txns[index])
        seen.append(wm.flushed)
    assert seen == expected
    assert wm.in_flight == 0


def test_out_of_order_within_and_across_transactions():
    wm = Watermark()
    a = _txn(wm, T1, 3)
    b = _txn(wm, T2, 2)
    for txn, flushed in [(b, 0), (a, 0), (b, 0), (a, 0), (a, T2[1])]:
        wm.confirm(txn)
        assert wm.flushed == flushed
    assert wm.in_flight == 0


def test_empty_transaction_flushes_at_commit():
    wm = Watermark()
    _txn(wm, T1, 0)
    assert wm.flushed == T1[1]
    assert wm.oldest_pending_commit() is None


def test_empty_transaction_behind_a_pending_one_waits_then_flushes_with_it():
    wm = Watermark()
    a = _txn(wm, T1, 1)
    _txn(wm, T2, 0)
    assert wm.flushed == 0
    wm.confirm(a)
    assert wm.flushed == T2[1]


def test_open_transaction_blocks_later_ones():
    wm = Watermark()
    _txn(wm, T1, 0)
    assert wm.flushed == T1[1]
    open_txn = _txn(wm, T2, 1, commit=False)
    # The server never interleaves transactions, but the rule must hold regardless.
    later = _txn(wm, T3, 1)
    wm.confirm(later)
    wm.confirm(open_txn)
    assert wm.flushed == T1[1], "T2 is still open, so neither T2 nor T3 may flush"
    wm.commit(open_txn, T2[1])
    assert wm.flushed == T3[1]


def test_oldest_pending_commit_is_the_first_unflushed_transaction():
    wm = Watermark()
    a = wm.begin(T1[0], 100.0)
    wm.add_event(a)
    wm.commit(a, T1[1])
    b = wm.begin(T2[0], 200.0)
    assert wm.oldest_pending_commit() == 100.0
    wm.confirm(a)
    assert wm.oldest_pending_commit() == 200.0
    wm.commit(b, T2[1])
    assert wm.oldest_pending_commit() is None


@pytest.mark.parametrize(
    ("start", "wal_end", "expected"),
    [
        (T1[1], T2[1], T2[1]),  # idle: advance to the server's wal_end
        (T2[1], T1[1], T2[1]),  # never backwards
        (T2[1], T2[1], T2[1]),  # same position: unchanged
        (0, 0, 0),
    ],
    ids=["advances", "never-backwards", "equal", "zero"],
)
def test_keepalive_when_idle(start, wal_end, expected):
    wm = Watermark(flushed=start)
    wm.keepalive(wal_end)
    assert wm.flushed == expected


def test_keepalive_ignored_while_a_transaction_is_open():
    wm = Watermark()
    _txn(wm, T1, 0, commit=False)
    wm.keepalive(T3[1])
    assert wm.flushed == 0


def test_keepalive_ignored_while_events_are_in_flight():
    wm = Watermark()
    txn = _txn(wm, T1, 1)
    wm.keepalive(T3[1])
    assert wm.flushed == 0
    wm.confirm(txn)
    assert wm.flushed == T1[1]
    wm.keepalive(T3[1])
    assert wm.flushed == T3[1]


def test_keepalive_while_open_even_with_all_events_confirmed_is_ignored():
    wm = Watermark()
    txn = _txn(wm, T1, 1, commit=False)
    wm.confirm(txn)
    assert wm.in_flight == 0
    assert wm.oldest_pending_commit() is not None
    wm.keepalive(T3[1])
    assert wm.flushed == 0


def test_commit_below_a_keepalive_position_does_not_move_backwards():
    wm = Watermark()
    wm.keepalive(T3[1])
    _txn(wm, T1, 0)
    assert wm.flushed == T3[1]


@pytest.mark.parametrize("events", [0, 1, 2])
def test_confirm_without_add_event_raises_and_changes_nothing(events):
    wm = Watermark()
    txn = _txn(wm, T1, events)
    for _ in range(events):
        wm.confirm(txn)
    flushed, in_flight = wm.flushed, wm.in_flight
    with pytest.raises(ValueError, match="add_event"):
        wm.confirm(txn)
    assert (wm.flushed, wm.in_flight) == (flushed, in_flight)


def test_confirm_on_a_still_pending_txn_of_another_count_raises():
    wm = Watermark()
    a = _txn(wm, T1, 0, commit=False)
    b = wm.begin(T2[0], 0.0)
    wm.add_event(b)
    with pytest.raises(ValueError):
        wm.confirm(a)
    assert wm.in_flight == 1


# -- property tests --------------------------------------------------------------------------


@st.composite
def scripts(draw):
    """Txns with random event counts; every event confirmed once, in random order, with
    keepalives (at or below the server's position so far) interleaved anywhere."""
    counts = draw(st.lists(st.integers(0, 4), min_size=1, max_size=8))
    txns, lsn = [], draw(st.integers(0, 2**40))
    for count in counts:
        final = lsn + draw(st.integers(1, 500))
        end = final + draw(st.integers(1, 100))
        txns.append((final, end, count))
        lsn = end
    # A stream: Begin, Insert xN, Commit, per txn; confirms of already-streamed events can
    # be interleaved anywhere after their Insert, keepalives anywhere.
    steps: list[tuple] = []
    for index, (_final, _end, count) in enumerate(txns):
        steps.append(("begin", index))
        steps.extend(("add", index) for _ in range(count))
        steps.append(("commit", index))
    confirms = [("confirm", i) for i, (_f, _e, c) in enumerate(txns) for _ in range(c)]
    confirms = draw(st.permutations(confirms))
    nth = [0] * len(txns)
    for confirm in confirms:
        # The j-th confirm of a txn goes anywhere after its j-th Insert (maybe before Commit).
        index = confirm[1]
        adds = [p for p, s in enumerate(steps) if s == ("add", index)]
        position = draw(st.integers(adds[nth[index]] + 1, len(steps)))
        nth[index] += 1
        steps.insert(position, confirm)
    for _ in range(draw(st.integers(0, 6))):
        steps.insert(draw(st.integers(0, len(steps))), ("keepalive", draw(st.integers(0, 2**20))))
    return txns, steps


@settings(max_examples=150, deadline=None)
@given(scripts())
def test_random_streams_flush_monotonically_up_to_the_first_blocking_txn(script):
    txns, steps = script
    wm = Watermark()
    handles: dict[int, object] = {}
    added = [0] * len(txns)
    confirmed = [0] * len(txns)
    committed = [False] * len(txns)
    server_pos = 0
    previous = 0
    for step in steps:
        kind, arg = step
        if kind == "begin":
            handles[arg] = wm.begin(txns[arg][0], 0.0)
        elif kind == "add":
            wm.add_event(handles[arg])
            added[arg] += 1
        elif kind == "commit":
            wm.commit(handles[arg], txns[arg][1])
            committed[arg] = True
            server_pos = max(server_pos, txns[arg][1])
        elif kind == "confirm":
            wm.confirm(handles[arg])
            confirmed[arg] += 1
        else:
            # A keepalive never reports a position behind what the server already sent.
            wm.keepalive(min(arg, server_pos))
        assert wm.flushed >= previous, "flushed moved backwards"
        previous = wm.flushed
        assert wm.in_flight == sum(added) - sum(confirmed)
        blocking = next(
            (
                i
                for i in sorted(handles)
                if not committed[i] or confirmed[i] < added[i]
            ),
            None,
        )
        if blocking is not None:
            assert wm.flushed < txns[blocking][1]
            if blocking > 0:
                assert wm.flushed >= txns[blocking - 1][1]
            assert wm.oldest_pending_commit() is not None
        elif handles:
            assert wm.flushed >= txns[max(handles)][1]
            assert wm.oldest_pending_commit() is None
    assert wm.in_flight == 0
    assert wm.flushed == txns[-1][1]


class WatermarkMachine(RuleBasedStateMachine):
    """An exact model: flushed = max(done-prefix end_lsns, keepalives taken while idle)."""

    @initialize(start=st.integers(0, 2**32))
    def start(self, start):
        self.wm = Watermark(flushed=start)
        self.expected = start
        self.previous = start
        self.pos = start  # the server's position: new txns commit after it
        self.txns: list[dict] = []

    def _open(self):
        return next((t for t in self.txns if t["open"]), None)

    def _blocking(self):
        return next(
            (t for t in self.txns if t["open"] or t["confirmed"] < t["added"]), None
        )

    def _catch_up(self):
        for t in self.txns:
            if t["open"] or t["confirmed"] < t["added"]:
                break
            self.expected = max(self.expected, t["end"])

    @precondition(lambda self: self._open() is None)
    @rule(gap=st.integers(1, 10_000), size=st.integers(1, 200))
    def begin(self, gap, size):
        final = self.pos + gap
        end = final + size
        handle = self.wm.begin(final, 0.0)
        self.txns.append({"h": handle, "end": end, "open": True, "added": 0, "confirmed": 0})
        self.pos = end

    @precondition(lambda self: self._open() is not None)
    @rule(n=st.integers(1, 3))
    def add_events(self, n):
        t = self._open()
        for _ in range(n):
            self.wm.add_event(t["h"])
        t["added"] += n

    @precondition(lambda self: self._open() is not None)
    @rule()
    def commit(self):
        t = self._open()
        self.wm.commit(t["h"], t["end"])
        t["open"] = False
        self._catch_up()

    @precondition(lambda self: any(t["confirmed"] < t["added"] for t in self.txns))
    @rule(data=st.data())
    def confirm(self, data):
        candidates = [t for t in self.txns if t["confirmed"] < t["added"]]
        t = data.draw(st.sampled_from(candidates))
        self.wm.confirm(t["h"])
        t["confirmed"] += 1
        self._catch_up()

    @precondition(lambda self: any(t["confirmed"] == t["added"] for t in self.txns))
    @rule(data=st.data())
    def confirm_too_many(self, data):
        t = data.draw(st.sampled_from([t for t in self.txns if t["confirmed"] == t["added"]]))
        with pytest.raises(ValueError):
            self.wm.confirm(t["h"])

    @rule(back=st.integers(0, 20_000), ahead=st.integers(0, 5_000))
    def keepalive(self, back, ahead):
        wal_end = max(0, self.pos - back + ahead)
        self.wm.keepalive(wal_end)
        if self._blocking() is None:
            self.expected = max(self.expected, wal_end)
        self.pos = max(self.pos, wal_end)

    @invariant()
    def flushed_is_exact_and_monotonic(self):
        assert self.wm.flushed == self.expected
        assert self.wm.flushed >= self.previous
        self.previous = self.wm.flushed

    @invariant()
    def never_past_the_first_blocking_txn(self):
        blocking = self._blocking()
        if blocking is not None:
            assert self.wm.flushed < blocking["end"]
        assert (self.wm.oldest_pending_commit() is None) == (blocking is None)

    @invariant()
    def in_flight_matches(self):
        assert self.wm.in_flight == sum(t["added"] - t["confirmed"] for t in self.txns)

    def teardown(self):
        if not hasattr(self, "wm"):
            return
        # Drain: close the open txn and confirm everything; flushed reaches the last end.
        t = self._open()
        if t is not None:
            self.wm.commit(t["h"], t["end"])
            t["open"] = False
        for t in self.txns:
            while t["confirmed"] < t["added"]:
                self.wm.confirm(t["h"])
                t["confirmed"] += 1
        assert self.wm.in_flight == 0
        if self.txns:
            assert self.wm.flushed == max(self.expected, self.txns[-1]["end"])
            assert self.wm.flushed >= self.txns[-1]["end"]


WatermarkMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
TestWatermarkMachine = WatermarkMachine.TestCase
