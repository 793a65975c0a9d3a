"""A bundle's delivery tag is acked once, when its last member is settled."""

from __future__ import annotations

from consumers.runtime.acks import AckTracker
from consumers.runtime.members import MemberCounts


def test_a_bundle_tag_finishes_with_its_last_member_across_batches() -> None:
    counts, acks = MemberCounts(), AckTracker()
    for tag in (1, 2, 3):
        acks.delivered(tag)
    counts.expect(1, 1)
    counts.expect(2, 3)  # a bundle of three
    counts.expect(3, 1)
    # First batch: message 1, two members of the bundle, message 3.
    assert acks.settle(counts.finished([1, 2, 2, 3])) == [(1, True), (3, False)]
    assert len(acks) == 1
    # Its last member, re-bundled and confirmed in a later batch.
    assert acks.settle(counts.finished([2])) == [(2, True)]
    assert len(acks) == 0


def test_clear_forgets_the_bundles_of_a_lost_channel() -> None:
    counts = MemberCounts()
    counts.expect(7, 2)
    counts.clear()
    counts.expect(7, 2)  # the same tag on the next channel is a new bundle
    assert counts.finished([7]) == []
    assert counts.finished([7]) == [7]


def test_would_finish_names_the_tags_settling_would_let_through_and_changes_nothing() -> None:
    counts = MemberCounts()
    counts.expect(2, 3)
    assert counts.would_finish([1, 2, 2]) == [1]  # the bundle still has a third member
    assert counts.would_finish([2, 2, 2]) == [2]
    assert counts.finished([2, 2]) == []  # nothing was settled by asking
    assert counts.would_finish([2]) == [2]
