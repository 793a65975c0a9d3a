"""Failover readiness (cdc/core/failover.py): the verdict per standby from the primary's and the
standby's own facts. ``ready`` is True only for a standby checked directly with nothing wrong."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cdc.core.failover import PrimaryFacts, StandbyLink, StandbyView, assess, supported

PRIMARY = PrimaryFacts(180001, "cdc_outbox", True, True, ("standby1",))
LINK = StandbyLink("walreceiver", "streaming", "standby1", True)
VIEW = StandbyView(
    "10.0.0.2:5432", True, "logical", True, True, "standby1", True,
    copy_exists=True, copy_synced=True,
)


def one(primary=PRIMARY, links=(LINK,), views=(VIEW,)):
    verdicts = assess(primary, list(links), list(views))
    assert len(verdicts) == 1, verdicts
    return verdicts[0]


def test_supported_from_17():
    assert not supported(160004)
    assert supported(170000)
    assert supported(180006)


def test_checked_standby_with_a_persistent_synced_copy_is_ready():
    v = one()
    assert (v.ready, v.checked, v.reasons) == (True, True, ())
    assert (v.standby, v.physical_slot, v.state) == ("10.0.0.2:5432", "standby1", "streaming")


def test_the_primary_alone_cannot_say_ready():
    v = one(views=())
    assert (v.ready, v.checked, v.reasons) == (None, False, ())
    assert v.standby == "walreceiver"


@pytest.mark.parametrize(
    ("primary", "link", "view", "expected"),
    [
        (replace(PRIMARY, server_version=150020, slot_failover=None), LINK, VIEW,
         "has no failover slots"),
        (replace(PRIMARY, slot_exists=False, slot_failover=None), LINK, VIEW, "run `cdc setup`"),
        (replace(PRIMARY, slot_failover=False), LINK, VIEW, "FAILOVER true"),
        (replace(PRIMARY, synchronized_standby_slots=()), LINK, VIEW,
         "not in synchronized_standby_slots"),
        (PRIMARY, replace(LINK, sends_feedback=False), VIEW, "hot_standby_feedback = on"),
        (PRIMARY, replace(LINK, state="catchup"), VIEW, "not streaming"),
        (PRIMARY, LINK, replace(VIEW, copy_temporary=True), "still temporary"),
        (PRIMARY, LINK, replace(VIEW, copy_exists=False, copy_synced=False), "no copy"),
        (PRIMARY, LINK, replace(VIEW, copy_synced=False), "not a synced copy"),
        (PRIMARY, LINK, replace(VIEW, copy_invalidation="rows_removed"), "invalidated"),
        (PRIMARY, LINK, replace(VIEW, sync_replication_slots=False), "sync_replication_slots"),
        (PRIMARY, LINK, replace(VIEW, hot_standby_feedback=False), "hot_standby_feedback"),
        (PRIMARY, LINK, replace(VIEW, conninfo_has_dbname=False), "dbname"),
        (PRIMARY, LINK, replace(VIEW, conninfo_has_dbname=None), "pg_read_all_settings"),
        (PRIMARY, LINK, replace(VIEW, wal_level="replica"), "wal_level"),
        (PRIMARY, LINK, replace(VIEW, in_recovery=False), "not a standby"),
    ],
    ids=[
        "pg15", "no-slot", "not-failover", "not-listed", "no-feedback", "not-streaming",
        "temporary", "no-copy", "local-slot", "invalidated", "no-sync-worker",
        "standby-feedback-off", "no-dbname", "conninfo-hidden", "wal-level", "promoted",
    ],
)
def test_each_problem_makes_it_not_ready_and_says_why(primary, link, view, expected):
    v = one(primary, [link], [view])
    assert v.ready is False
    assert any(expected in r for r in v.reasons), v.reasons


def test_a_problem_seen_from_the_primary_alone_is_not_ready():
    v = one(replace(PRIMARY, synchronized_standby_slots=()), views=())
    assert v.ready is False and not v.checked


def test_unmatched_view_and_link_are_both_reported():
    view = replace(VIEW, primary_slot_name="other")
    verdicts = assess(PRIMARY, [LINK], [view])
    assert [(v.standby, v.checked, v.ready) for v in verdicts] == [
        ("10.0.0.2:5432", True, False),
        ("walreceiver", False, None),
    ]
    assert "no standby on physical slot other" in verdicts[0].reasons[0]


def test_before_17_only_the_slot_reason_is_given():
    pg15 = replace(
        PRIMARY, server_version=150020, slot_failover=None, synchronized_standby_slots=()
    )
    for views in ([], [replace(VIEW, sync_replication_slots=None, copy_exists=False)]):
        v = one(pg15, views=views)
        assert v.ready is False
        assert len(v.reasons) == 1 and "has no failover slots" in v.reasons[0], v.reasons
