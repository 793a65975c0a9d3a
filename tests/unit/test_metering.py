"""Billing metering: pairing rules on real cases, and order tolerance as a property.

The property: the worker's incremental algorithm (:class:`BillingModel`, one event at a time,
store once, recompute the device) ends in the same records and balances for every
permutation of a set of events with any duplicates, and that state equals the one computed
straight from the set (:func:`meter`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import uuid
from decimal import Decimal

import pytest
from harness.billing_model import BillingModel, meter
from hypothesis import given, settings
from hypothesis import strategies as st

from consumers.billing.metering import (
    BALANCE_LOW_NAMESPACE,
    DeviceEvent,
    PlanChange,
    Pricing,
    balance_low_id,
    canonical_decimal,
    device_records,
    diff_records,
    merge_diffs,
    seconds_between,
    select_window,
    session_cost,
)

T0 = dt.datetime(2025, 10, 30, 5, 0, tzinfo=dt.UTC)
PRICING = Pricing({"basic": Decimal("0.60"), "pro": Decimal("2.40")}, Decimal("1.20"))


def at(minutes: float) -> dt.datetime:
    return T0 + dt.timedelta(minutes=minutes)


def start(mid: str, minute: float, device: str = "d1", user: str = "u1", **kw) -> DeviceEvent:
    return DeviceEvent(mid, device, "start", at(minute), user, **kw)


def stop(mid: str, minute: float, device: str = "d1") -> DeviceEvent:
    return DeviceEvent(mid, device, "stop", at(minute))


def delete(mid: str, minute: float, device: str = "d1") -> DeviceEvent:
    return DeviceEvent(mid, device, "delete", at(minute))


def update(mid: str, minute: float, device: str = "d1", **kw) -> DeviceEvent:
    return DeviceEvent(mid, device, "update", at(minute), **kw)


def spans(records) -> list[tuple[float, float, str]]:
    return [
        ((r.started_at - T0).total_seconds() / 60, (r.stopped_at - T0).total_seconds() / 60,
         r.closed_by)
        for r in records
    ]


# -- pairing ----------------------------------------------------------------------------------


def test_a_start_and_a_stop_make_one_record_with_exact_cost():
    (rec,) = device_records([start("s", 0), stop("t", 90)], pricing=PRICING)
    assert rec.record_id == "s" and rec.user_id == "u1" and rec.device_id == "d1"
    assert rec.duration_seconds == Decimal("5400")
    assert rec.rate == Decimal("1.20")
    assert rec.cost == Decimal("1.800000")
    assert rec.closed_by == "stop"


def test_sessions_pair_in_event_time_not_in_the_order_given():
    events = [stop("t2", 30), start("s2", 20), stop("t1", 10), start("s1", 0)]
    assert spans(device_records(events, pricing=PRICING)) == [(0, 10, "stop"), (20, 30, "stop")]


def test_a_second_start_while_running_is_ignored_and_a_lone_stop_too():
    events = [start("s1", 0), start("s2", 5), stop("t1", 10), stop("t2", 12)]
    assert spans(device_records(events, pricing=PRICING)) == [(0, 10, "stop")]


def test_an_open_session_makes_no_record_yet():
    assert device_records([start("s1", 0)], pricing=PRICING) == ()
    assert spans(device_records([stop("t0", 1), start("s1", 2), stop("t1", 3), start("s2", 4)],
                                pricing=PRICING)) == [(2, 3, "stop")]


def test_delete_closes_the_open_session_and_ends_the_device():
    events = [start("s1", 0), delete("x", 7), start("s2", 8), stop("t2", 9)]
    assert spans(device_records(events, pricing=PRICING)) == [(0, 7, "delete")]


def test_at_equal_times_a_stop_closes_before_the_next_start_opens():
    events = [start("s1", 0), stop("t1", 5), start("s2", 5), stop("t2", 6)]
    assert spans(device_records(events, pricing=PRICING)) == [(0, 5, "stop"), (5, 6, "stop")]


def test_duplicates_by_message_id_count_once():
    events = [start("s1", 0), start("s1", 0), stop("t1", 10), stop("t1", 10)]
    assert len(device_records(events, pricing=PRICING)) == 1


def test_the_rate_is_the_one_in_force_at_the_start():
    events = [
        update("p1", -5, plan="pro"),
        start("s1", 0),
        stop("t1", 60),
        update("r2", 61, rate=Decimal("6")),
        start("s2", 120),
        stop("t2", 150),
        update("p3", 140, plan="basic"),  # during s2: applies from the next session on
    ]
    a, b = device_records(events, pricing=PRICING)
    assert (a.rate, a.cost) == (Decimal("2.40"), Decimal("2.400000"))
    assert (b.rate, b.cost) == (Decimal("6"), Decimal("3.000000"))


def test_a_plan_on_the_start_event_and_the_users_plan_as_fallback():
    own = device_records([start("s1", 0, plan="basic"), stop("t1", 60)], pricing=PRICING)
    assert own[0].rate == Decimal("0.60")
    users = [PlanChange("u", "u1", at(-1), "pro"), PlanChange("v", "u2", at(-1), "basic")]
    fallback = device_records([start("s1", 0), stop("t1", 60)], users, PRICING)
    assert fallback[0].rate == Decimal("2.40")
    later = [PlanChange("w", "u1", at(1), "basic")]  # after the start: not this session's
    assert device_records([start("s1", 0), stop("t1", 60)], later, PRICING)[0].rate == (
        Decimal("1.20")
    )


def test_an_unknown_plan_pays_the_default_rate():
    recs = device_records([start("s1", 0, plan="mystery"), stop("t1", 60)], pricing=PRICING)
    assert recs[0].rate == Decimal("1.20")


def test_seconds_and_cost_are_exact_decimals():
    t = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    assert seconds_between(t, t + dt.timedelta(days=1, microseconds=7)) == Decimal("86400.000007")
    # 1 s at 1/h = 0.000277777... -> half-even at 6 decimals
    assert session_cost(Decimal(1), Decimal(1)) == Decimal("0.000278")
    assert session_cost(Decimal("1.8"), Decimal(1)) == Decimal("0.000500")


def test_diff_moves_spend_between_users_and_deletes_vanished_records():
    old = device_records([start("s1", 0), stop("t1", 60)], pricing=PRICING)
    new = device_records([start("s1", 0), stop("t0", 30), stop("t1", 60)], pricing=PRICING)
    diff = diff_records(old, new)
    assert [r.record_id for r in diff.upserts] == ["s1"] and diff.deletes == ()
    assert diff.spent_delta == {"u1": Decimal("-0.600000")}
    gone = diff_records(old, ())
    assert gone.deletes == ("s1",) and gone.spent_delta == {"u1": Decimal("-1.200000")}
    assert diff_records(old, old).empty


def test_balance_low_ids_are_stable():
    assert balance_low_id("u1", Decimal("10")) == balance_low_id("u1", Decimal("10.00"))
    assert balance_low_id("u1", Decimal("10")) == balance_low_id("u1", Decimal("1E+1"))
    assert balance_low_id("u1", Decimal("10")) != balance_low_id("u2", Decimal("10"))


#: balance_low_id("user-42", 10): documented in docs/contract.md.
FIXED_VECTOR = "e662d96c-b619-5fb9-ab80-a6bcfd1d47f4"


@pytest.mark.parametrize(
    ("value", "text"),
    [("10", "10"), ("10.00", "10"), ("1E+1", "10"), ("100", "100"), ("0.050", "0.05"),
     ("5.5", "5.5"), ("0", "0"), ("-0.0", "0"), ("0E-7", "0"), ("-2.50", "-2.5"),
     ("1E-7", "0.0000001"), ("12345678901234567890.1", "12345678901234567890.1")],
)
def test_canonical_decimal_is_plain_notation(value, text):
    assert canonical_decimal(Decimal(value)) == text


def test_balance_low_id_fixed_vector():
    """The documented definition, computed by hand as any language would (RFC 4122 v5)."""
    name = b"user-42\x0010"
    digest = bytearray(hashlib.sha1(BALANCE_LOW_NAMESPACE.bytes + name).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    by_hand = uuid.UUID(bytes=bytes(digest))
    assert str(BALANCE_LOW_NAMESPACE) == "5b0e7c1e-6f2a-4f57-9d8e-0c8b1d9a4b21"
    assert balance_low_id("user-42", Decimal("1E+1")) == by_hand
    assert str(by_hand) == FIXED_VECTOR


def test_ledger_alerts_once_when_the_balance_falls_below_the_threshold():
    ledger = BillingModel(PRICING, initial_balance=Decimal("5"), threshold=Decimal("3"))
    for e in [start("s1", 0, rate=Decimal("60")), stop("t1", 1), start("s2", 2), stop("t2", 3)]:
        ledger.apply(e)
    # the device's rate stays 60/h for s2 too: 2 minutes = 2.00, exactly at the threshold
    assert ledger.balance("u1") == Decimal("3.000000")
    assert ledger.alerts == {}
    for e in [start("s3", 10, rate=Decimal("30")), stop("t3", 12), stop("t3", 12)]:
        ledger.apply(e)
    assert ledger.balance("u1") == Decimal("2.000000")
    assert ledger.alerts == {"u1": Decimal("2.000000")}
    ledger.apply(start("s4", 20))
    ledger.apply(stop("t4", 30))
    assert list(ledger.alerts) == ["u1"]


# -- the property -------------------------------------------------------------------------------


@st.composite
def event_sets(draw) -> list[DeviceEvent | PlanChange]:
    """A realistic-ish set: a few devices and users, starts/stops interleaved, some deletes,
    plan changes on devices and users, timestamps on a coarse grid so ties happen."""
    n = draw(st.integers(1, 40))
    events: list[DeviceEvent | PlanChange] = []
    for i in range(n):
        device = draw(st.sampled_from(["d1", "d2", "d3"]))
        user = draw(st.sampled_from(["u1", "u2"]))
        minute = draw(st.integers(0, 60))
        kind = draw(st.sampled_from(["start", "start", "stop", "stop", "delete", "update", "plan"]))
        mid = f"m{i}"
        if kind == "plan":
            plan = draw(st.sampled_from(["basic", "pro"]))
            events.append(PlanChange(mid, user, at(minute), plan))
        elif kind == "update":
            rate = draw(st.sampled_from([None, Decimal("3"), Decimal("0.5")]))
            plan = None if rate is not None else draw(st.sampled_from(["basic", "pro"]))
            events.append(update(mid, minute, device, plan=plan, rate=rate))
        elif kind == "start":
            events.append(start(mid, minute, device, user))
        else:
            events.append(DeviceEvent(mid, device, kind, at(minute)))
    return events


def _deliver(events, order, dups):
    """``events`` in the order of ``order``'s permutation with the indices in ``dups`` again."""
    delivered = [events[i] for i in order]
    for pos, i in dups:
        delivered.insert(pos % (len(delivered) + 1), events[i % len(events)])
    return delivered


def _draw_delivery(data, events):
    """A drawn arrival order of ``events`` with drawn duplicates."""
    return _deliver(
        events,
        data.draw(st.permutations(range(len(events))), label="order"),
        data.draw(st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=10)),
    )


@settings(max_examples=300, deadline=None)
@given(data=st.data(), events=event_sets())
def test_any_order_with_any_duplicates_gives_identical_records_and_balances(data, events):
    order = data.draw(st.permutations(range(len(events))), label="order")
    dups = data.draw(
        st.lists(st.tuples(st.integers(0, 100), st.integers(0, 100)), max_size=10), label="dups"
    )
    expected_records, expected_spent = meter(events, PRICING)

    ledger = BillingModel(PRICING, initial_balance=Decimal("2"), threshold=Decimal("1"))
    for e in _deliver(events, order, dups):
        ledger.apply(e)
    assert ledger.records == expected_records
    assert ledger.spent == expected_spent
    assert ledger.balances() == {u: Decimal("2") - s for u, s in sorted(expected_spent.items())}

    # In the natural order too (a second, independent run gives the same state).
    in_order = BillingModel(PRICING, initial_balance=Decimal("2"), threshold=Decimal("1"))
    for e in sorted(events, key=lambda e: (e.at, e.message_id)):
        in_order.apply(e)
    assert in_order.records == ledger.records and in_order.spent == ledger.spent

    # Every user whose final balance is under the threshold was alerted, exactly once (the
    # dict cannot hold two); one above it can only have been alerted by a transient overcount.
    for user, spent in expected_spent.items():
        if Decimal("2") - spent < Decimal("1"):
            assert user in ledger.alerts and user in in_order.alerts


@pytest.mark.parametrize("seed", range(3))
def test_the_property_on_a_big_fixed_set(seed):
    import random

    rng = random.Random(seed)
    events: list[DeviceEvent | PlanChange] = []
    for d in range(20):
        t = 0.0
        for k in range(15):
            events.append(start(f"s{d}-{k}", t, f"d{d}", f"u{d % 4}"))
            t += rng.uniform(0.5, 30)
            events.append(stop(f"t{d}-{k}", t, f"d{d}"))
            t += rng.uniform(0, 10)
    events += [PlanChange(f"p{u}", f"u{u}", at(100), "pro") for u in range(4)]
    expected = meter(events, PRICING)
    for _ in range(3):
        shuffled = events + rng.sample(events, 50)
        rng.shuffle(shuffled)
        ledger = BillingModel(PRICING)
        for e in shuffled:
            ledger.apply(e)
        assert (ledger.records, ledger.spent) == expected
    assert len(expected[0]) == 20 * 15


@settings(max_examples=200, deadline=None)
@given(data=st.data(), events=event_sets())
def test_batches_of_any_size_in_any_order_give_the_records_of_the_set(data, events):
    """The batch path's model (``BillingModel.apply_batch``): same records and spend as the set."""
    delivered = _draw_delivery(data, events)
    size = data.draw(st.integers(1, 12), label="batch size")
    ledger = BillingModel(PRICING, initial_balance=Decimal("2"), threshold=Decimal("1"))
    for i in range(0, len(delivered), size):
        ledger.apply_batch(delivered[i : i + size])
    assert (ledger.records, ledger.spent) == meter(events, PRICING)
    for user, spent in ledger.spent.items():  # below the threshold at the end: alerted
        if Decimal("2") - spent < Decimal("1"):
            assert user in ledger.alerts


def test_merged_diffs_sum_spend_per_user_and_drop_zero_sums():
    a = diff_records([], device_records([start("s1", 0, "d1", "u1"), stop("t1", 60, "d1")]))
    b = diff_records(device_records([start("s2", 0, "d2", "u1"), stop("t2", 60, "d2")]), [])
    c = diff_records([], device_records([start("s3", 0, "d3", "u2"), stop("t3", 30, "d3")]))
    merged = merge_diffs([a, b, c])
    assert [r.record_id for r in merged.upserts] == ["s1", "s3"]
    assert merged.deletes == ("s2",)
    assert merged.spent_delta == {"u2": c.spent_delta["u2"]}  # u1: +x and -x
    assert merge_diffs([]).empty


# -- the windowed recompute -------------------------------------------------------------------


def _state(ledger: BillingModel):
    return ledger.records, ledger.spent, ledger.alerts


@settings(max_examples=400, deadline=None)
@given(data=st.data(), events=event_sets())
def test_the_windowed_recompute_equals_the_full_one_after_every_delivery(data, events):
    """Arbitrary arrival order, duplicates and batch sizes: after every single delivery and
    every batch the windowed recompute (what the store does) has the records, spend and
    alerts of the full recompute, not only at the end."""
    delivered = _draw_delivery(data, events)
    size = data.draw(st.integers(1, 6), label="batch size")
    full = BillingModel(PRICING, initial_balance=Decimal("2"), threshold=Decimal("1"))
    windowed = BillingModel(PRICING, initial_balance=Decimal("2"), threshold=Decimal("1"),
                      windowed=True)
    for e in delivered:
        full.apply(e)
        windowed.apply(e)
        assert _state(windowed) == _state(full)
    full_b = BillingModel(PRICING, initial_balance=Decimal("2"), threshold=Decimal("1"))
    windowed_b = BillingModel(PRICING, initial_balance=Decimal("2"), threshold=Decimal("1"),
                        windowed=True)
    for i in range(0, len(delivered), size):
        full_b.apply_batch(delivered[i : i + size])
        windowed_b.apply_batch(delivered[i : i + size])
        assert _state(windowed_b) == _state(full_b)
    assert (windowed.records, windowed.spent) == meter(events, PRICING)


def test_a_window_starts_at_the_last_close_and_carries_rate_and_end():
    events = [start("s1", 0, rate=Decimal("3")), stop("t1", 10), start("s2", 20), stop("t2", 30),
              start("s3", 40)]
    w = select_window(events, at(35))
    assert w.since == at(30)
    assert [e.message_id for e in w.events] == ["t2", "s3"]
    assert w.prior_rate is not None and w.prior_rate.message_id == "s1" and not w.ended
    assert select_window(events, at(5)).since is None  # nothing closed before: everything
    ended = select_window([*events, delete("x", 15), stop("t9", 50)], at(55))
    assert ended.since == at(50) and ended.ended


def test_a_late_event_before_the_window_widens_it():
    """A start arriving late before a stop that was already the window's edge: the window
    moves back to the close before that start, and the record it makes appears."""
    ledger = BillingModel(PRICING, windowed=True)
    for e in [start("s1", 0), stop("t1", 10), stop("t2", 30), start("s3", 40), stop("t3", 50)]:
        ledger.apply(e)
    ledger.apply(start("s2", 20, rate=Decimal("6")))
    assert ledger.records == meter(
        [start("s1", 0), stop("t1", 10), start("s2", 20, rate=Decimal("6")), stop("t2", 30),
         start("s3", 40), stop("t3", 50)], PRICING)[0]
    assert ledger.records["s3"].rate == Decimal("6")  # the late rate re-rates later sessions


def test_a_long_history_costs_a_window_not_the_history():
    """A year of sessions (2,000 events): the windowed recompute of each new event reads a
    handful of stored events, the full one the whole history."""
    history = []
    for k in range(1000):
        history += [start(f"s{k}", 10 * k, rate=Decimal("2") if k == 0 else None),
                    stop(f"t{k}", 10 * k + 5)]
    full, windowed = BillingModel(PRICING), BillingModel(PRICING, windowed=True)
    for e in history:
        full.apply(e)
        windowed.apply(e)
    assert windowed.records == full.records and len(full.records) == 1000
    full.events_read = windowed.events_read = 0
    for e in [start("late-s", 10_000), stop("late-t", 10_003)]:
        full.apply(e)
        windowed.apply(e)
    assert windowed.records == full.records
    assert windowed.records["late-s"].rate == Decimal("2")  # set 1,000 sessions earlier
    assert full.events_read >= 2 * 2000
    assert windowed.events_read <= 2 * 4  # the last stop, the new events, the prior rate
