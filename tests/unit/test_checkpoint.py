"""The slot-health verdict and the periodic checkpoint rule (``cdc/core/checkpoint.py``).

Every verdict of :func:`assess` is reached from a table of (row, observation) cases, and
:func:`plan_write` is checked step by step and as a property: a snapshot is promoted only
once the flushed LSN has reached the WAL position read after it, and the confirmed LSN
never moves back.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.core.checkpoint import (
    LOST,
    RECOVERING,
    Action,
    Checkpoint,
    Observed,
    SlotSeen,
    Verdict,
    assess,
    invalidation,
    normalize_snapshot,
    plan_write,
)

ROW = Checkpoint(
    slot_name="cdc_outbox",
    outbox_table="public.event_outbox",
    publication_name="cdc_outbox",
    system_identifier="7300000000000000001",
    timeline=1,
    confirmed_lsn=0x1_0000_0000,
    proven_snapshot="900:900:",
    base_snapshot="800:800:",
)
HEALTHY = SlotSeen(plugin="pgoutput", wal_status="reserved")
SEEN = Observed(
    slot_name="cdc_outbox",
    publication_name="cdc_outbox",
    outbox_table="public.event_outbox",
    slot=HEALTHY,
    publication_exists=True,
    table_published=True,
    system_identifier="7300000000000000001",
    timeline=1,
)


CASES = [
    # (id, row, observed, action, text the reason must contain)
    ("healthy", ROW, SEEN, Action.STREAM, ""),
    ("healthy-recheck-without-identity",
     ROW, replace(SEEN, system_identifier=None, timeline=None), Action.STREAM, ""),
    ("healthy-unreserved-wal", ROW,
     replace(SEEN, slot=replace(HEALTHY, wal_status="unreserved")), Action.STREAM, ""),
    ("first-start-create", None, replace(SEEN, slot=None), Action.CREATE, ""),
    ("first-start-adopt", None, SEEN, Action.ADOPT, ""),
    ("first-start-no-publication", None,
     replace(SEEN, publication_exists=False, table_published=False), Action.NOT_SET_UP,
     "run `cdc setup`"),
    ("first-start-table-not-published", None,
     replace(SEEN, table_published=False), Action.NOT_SET_UP, "run `cdc setup`"),
    ("first-start-other-plugin", None,
     replace(SEEN, slot=SlotSeen(plugin="wal2json")), Action.NOT_SET_UP, "wal2json"),
    ("first-start-invalidated-slot", None,
     replace(SEEN, slot=replace(HEALTHY, wal_status="lost")), Action.NOT_SET_UP,
     "pg_drop_replication_slot"),
    ("row-lost", replace(ROW, state=LOST, lost_reason="slot dropped"), SEEN, Action.LOST,
     "slot dropped"),
    ("row-lost-no-reason", replace(ROW, state=LOST), SEEN, Action.LOST, "marked lost"),
    ("row-recovering", replace(ROW, state=RECOVERING), SEEN, Action.LOST, "interrupted"),
    ("slot-missing", ROW, replace(SEEN, slot=None), Action.LOST, "does not exist"),
    ("wal-status-lost", ROW, replace(SEEN, slot=replace(HEALTHY, wal_status="lost")),
     Action.LOST, "max_slot_wal_keep_size"),
    ("invalidation-reason-17", ROW,
     replace(SEEN, slot=replace(HEALTHY, wal_status="lost", invalidation_reason="wal_removed")),
     Action.LOST, "wal_removed"),
    ("conflicting-16", ROW, replace(SEEN, slot=replace(HEALTHY, conflicting=True)),
     Action.LOST, "conflicting"),
    ("other-plugin", ROW, replace(SEEN, slot=SlotSeen(plugin="test_decoding")),
     Action.LOST, "test_decoding"),
    ("other-system", ROW, replace(SEEN, system_identifier="7300000000000000002"),
     Action.LOST, "7300000000000000002"),
    ("timeline-no-failover", ROW, replace(SEEN, timeline=2), Action.LOST,
     "not a failover slot"),
    ("timeline-failover-false", ROW,
     replace(SEEN, timeline=2, slot=replace(HEALTHY, failover=False)), Action.LOST,
     "not a failover slot"),
    ("publication-dropped", ROW, replace(SEEN, publication_exists=False, table_published=False),
     Action.LOST, "does not exist"),
    ("table-renamed", ROW, replace(SEEN, table_published=False), Action.LOST,
     "no longer contains public.event_outbox"),
]


@pytest.mark.parametrize(
    ("row", "seen", "action", "reason"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_assess(row, seen, action, reason):
    verdict = assess(row, seen)
    assert verdict.action is action, verdict
    assert reason in verdict.reason
    if action is Action.STREAM:
        assert verdict == Verdict(Action.STREAM)
    elif action in (Action.LOST, Action.NOT_SET_UP):
        assert verdict.reason


def test_every_action_is_reachable():
    assert {c[3] for c in CASES} == set(Action)


def test_failover_slot_follows_a_promotion_and_records_the_timeline():
    seen = replace(SEEN, timeline=3, slot=replace(HEALTHY, failover=True))
    assert assess(ROW, seen) == Verdict(Action.STREAM, timeline=3)


def test_a_lost_row_stays_lost_even_with_a_new_healthy_slot():
    # A supervisor restart after exit 5 must not stream from a slot made by someone else.
    assert assess(replace(ROW, state=LOST, lost_reason="x"), SEEN).action is Action.LOST


def test_slot_problems_win_over_publication_problems():
    seen = replace(SEEN, slot=None, publication_exists=False, table_published=False)
    assert "slot" in assess(ROW, seen).reason


def test_invalidation_reasons():
    assert invalidation(HEALTHY) is None
    assert invalidation(SlotSeen(plugin="pgoutput", wal_status=None)) is None
    assert invalidation(replace(HEALTHY, invalidation_reason="rows_removed")) == "rows_removed"
    assert "lost" in (invalidation(replace(HEALTHY, wal_status="lost")) or "")
    assert invalidation(replace(HEALTHY, conflicting=False)) is None


# -- the periodic checkpoint rule --------------------------------------------------------------


def test_first_tick_only_takes_a_candidate():
    w = plan_write(confirmed_lsn=100, candidate_snapshot=None, candidate_lsn=None,
                   flushed=150, new_snapshot="10:12:10", new_lsn=200)
    assert (w.confirmed_lsn, w.proven_snapshot) == (150, None)
    assert (w.candidate_snapshot, w.candidate_lsn) == ("10:12:10", 200)


def test_candidate_is_promoted_once_flushed_reaches_its_lsn():
    w = plan_write(confirmed_lsn=150, candidate_snapshot="10:12:10", candidate_lsn=200,
                   flushed=200, new_snapshot="20:20:", new_lsn=300)
    assert w.proven_snapshot == "10:12:10"
    assert (w.candidate_snapshot, w.candidate_lsn, w.confirmed_lsn) == ("20:20:", 300, 200)


def test_candidate_not_reached_is_kept_not_replaced():
    w = plan_write(confirmed_lsn=150, candidate_snapshot="10:12:10", candidate_lsn=200,
                   flushed=199, new_snapshot="20:20:", new_lsn=300)
    assert w.proven_snapshot is None
    assert (w.candidate_snapshot, w.candidate_lsn, w.confirmed_lsn) == ("10:12:10", 200, 199)


def test_confirmed_lsn_never_moves_back():
    w = plan_write(confirmed_lsn=500, candidate_snapshot=None, candidate_lsn=None,
                   flushed=400, new_snapshot="1:1:", new_lsn=600)
    assert w.confirmed_lsn == 500


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), min_size=1, max_size=40))
def test_promoted_snapshots_are_always_covered_by_the_flushed_lsn(steps):
    """Simulate ticks: WAL grows, the flush LSN trails it; a promoted snapshot's LSN is
    always <= the flushed LSN of the tick that promotes it, and promotions keep coming
    as long as the flush LSN keeps catching up."""
    wal, flushed, confirmed = 0, 0, 0
    cand: tuple[str, int] | None = None
    lsn_of: dict[str, int] = {}
    promoted: list[str] = []
    held = None
    for n, (grow, catch_up) in enumerate(steps):
        held = cand and cand[0]
        wal += grow
        flushed = min(wal, flushed + catch_up)
        snap = f"s{n}"
        lsn_of[snap] = wal
        w = plan_write(confirmed_lsn=confirmed, candidate_snapshot=cand and cand[0],
                       candidate_lsn=cand and cand[1], flushed=flushed,
                       new_snapshot=snap, new_lsn=wal)
        if w.proven_snapshot is not None:
            assert lsn_of[w.proven_snapshot] <= flushed
            promoted.append(w.proven_snapshot)
        assert w.confirmed_lsn >= confirmed
        confirmed = w.confirmed_lsn
        cand = (w.candidate_snapshot, w.candidate_lsn)
    assert promoted == sorted(promoted, key=lambda s: int(s[1:]))
    if held is not None and flushed == wal:
        # caught up at the last tick: the candidate held before it was promoted
        assert promoted and promoted[-1] == held


@pytest.mark.parametrize(
    ("printed", "readable"),
    [
        ("509750:509748:", "509750:509750:"),  # a slot's exported snapshot, as printed
        ("100:105:101,103", "100:105:101,103"),
        ("7:7:", "7:7:"),
    ],
)
def test_normalize_snapshot_keeps_visibility_and_is_readable(printed: str, readable: str) -> None:
    assert normalize_snapshot(printed) == readable


def test_normalize_snapshot_refuses_what_is_not_a_snapshot() -> None:
    with pytest.raises(ValueError):
        normalize_snapshot("not:a")
