"""Usage metering as a pure function of the SET of events (no I/O, no clock, no arrival order).

Contract: :func:`device_records` turns every event ever seen for one device (plus the plan
changes of its users) into the device's usage records. It sorts its input by event time and
message id, so the same set gives the same records whatever order the events arrived in
and however often each came. The worker stores each event once (keyed by message id) and
recomputes the device's records under a lock when one arrives; :func:`diff_records` says
which rows to write and how much each user's spend moves, so balances are exact sums of
record costs.

Windowed recompute: after new events of a device, only the sessions starting at or after
the last stop/delete before the earliest new event can change. :func:`select_window` says
what of the history that needs (the reference of the store's SQL) and
:func:`window_records` recomputes it; the result equals the full recompute's records from
that point on (a property test checks it after every delivery).

Pairing rule, in event-time order (ties: stop, then delete, then start; then message id):

- a start opens a session unless one is open (a second start while running is ignored);
- a stop closes the open session; a stop with nothing open is ignored;
- a delete closes the open session, and the device is gone: later events are ignored;
- a start without a stop is an open session and makes no record yet.

Rate of a session, fixed at its start: the latest device plan/rate change (from
``device.started``/``device.updated``) at or before the start, else the owner's latest
plan (``user.updated``) at or before the start, else the default rate. Rates are per hour;
``cost = duration_seconds * rate / 3600``, rounded half-even to 6 decimals.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal, NamedTuple

Kind = Literal["start", "stop", "delete", "update"]
#: Tie-break at equal timestamps: close before open, so back-to-back sessions pair right.
_RANK: dict[str, int] = {"stop": 0, "delete": 1, "start": 2, "update": 3}
MICRO = Decimal("0.000001")
_SECONDS_PER_HOUR = Decimal(3600)
#: Namespace of the deterministic ids of ``billing.balance_low`` outbox rows.
BALANCE_LOW_NAMESPACE = uuid.UUID("5b0e7c1e-6f2a-4f57-9d8e-0c8b1d9a4b21")


class DeviceEvent(NamedTuple):
    """One ``device.*`` event as billing keeps it (``rate`` per hour, ``at`` tz-aware).

    (A named tuple rather than a frozen dataclass, like :class:`UsageRecord`: a batch turns
    thousands of stored rows into these, and a tuple is built and compared in C.)"""

    message_id: str
    device_id: str
    kind: Kind
    at: datetime
    user_id: str | None = None
    plan: str | None = None
    rate: Decimal | None = None

    @property
    def order(self) -> tuple[datetime, int, str]:
        return (self.at, _RANK[self.kind], self.message_id)


@dataclass(frozen=True, slots=True)
class PlanChange:
    """A ``user.updated`` that set the user's plan (tier)."""

    message_id: str
    user_id: str
    at: datetime
    plan: str


@dataclass(frozen=True, slots=True)
class Pricing:
    """Hourly rate per plan, and the rate of a device whose plan is unknown."""

    rates: Mapping[str, Decimal] = field(default_factory=dict)
    default_rate: Decimal = Decimal("1")

    def rate_of(self, plan: str | None) -> Decimal:
        """The plan's hourly rate; an unknown or missing plan pays the default rate."""
        if plan is None:
            return self.default_rate
        return self.rates.get(plan, self.default_rate)


class UsageRecord(NamedTuple):
    """One closed session: the row of ``usage_records`` (``record_id`` = the start's id)."""

    record_id: str
    device_id: str
    user_id: str
    started_at: datetime
    stopped_at: datetime
    duration_seconds: Decimal
    rate: Decimal
    cost: Decimal
    closed_by: Literal["stop", "delete"]


@dataclass(frozen=True, slots=True)
class RecordDiff:
    """What to write after a recompute: rows to upsert and delete, spend moved per user."""

    upserts: tuple[UsageRecord, ...]
    deletes: tuple[str, ...]
    spent_delta: Mapping[str, Decimal]

    @property
    def empty(self) -> bool:
        return not self.upserts and not self.deletes


def seconds_between(start: datetime, stop: datetime) -> Decimal:
    """Exact elapsed seconds (microsecond resolution) as a Decimal."""
    delta = stop - start
    whole = delta.days * 86400 + delta.seconds
    return (Decimal(whole) + Decimal(delta.microseconds) / 1_000_000).quantize(MICRO)


def session_cost(duration_seconds: Decimal, rate_per_hour: Decimal) -> Decimal:
    """Cost of a session, rounded half-even to 6 decimals (the ``numeric`` scale of the table)."""
    return (duration_seconds * rate_per_hour / _SECONDS_PER_HOUR).quantize(
        MICRO, rounding=ROUND_HALF_EVEN
    )


def _latest_before(
    candidates: Iterable[tuple[datetime, str, Decimal]], at: datetime
) -> Decimal | None:
    best: tuple[datetime, str, Decimal] | None = None
    for cand in candidates:
        if cand[0] <= at and (best is None or cand[:2] > best[:2]):
            best = cand
    return None if best is None else best[2]


def _session_rate(
    start: DeviceEvent,
    device_rates: list[tuple[datetime, str, Decimal]],
    user_plans: Mapping[str, list[tuple[datetime, str, Decimal]]],
    pricing: Pricing,
) -> Decimal:
    rate = _latest_before(device_rates, start.at)
    if rate is None and start.user_id is not None:
        rate = _latest_before(user_plans.get(start.user_id, ()), start.at)
    return pricing.default_rate if rate is None else rate


def device_records(
    events: Iterable[DeviceEvent],
    plan_changes: Iterable[PlanChange] = (),
    pricing: Pricing | None = None,
) -> tuple[UsageRecord, ...]:
    """The usage records of one device, from every event of it ever seen (any order, dups).

    ``events`` must all be of the same device; ``plan_changes`` may hold any users' plan
    changes (only the session owners' count). The result is sorted by start time.
    """
    return window_records(events, None, False, plan_changes, pricing)


class Window(NamedTuple):
    """What a windowed recompute reads of a device (see :func:`select_window`).

    ``since`` is the event time of the last stop/delete before the earliest new event (None:
    the whole history); ``events`` are the device's events at or after ``since``;
    ``prior_rate`` the latest rate-carrying start/update before ``since``; ``ended`` whether
    a delete comes before ``since``. Records that start before ``since`` cannot change."""

    since: datetime | None
    events: tuple[DeviceEvent, ...]
    prior_rate: DeviceEvent | None
    ended: bool


def _carries_rate(event: DeviceEvent) -> bool:
    return event.kind in ("start", "update") and (event.rate is not None or event.plan is not None)


def select_window(events: Iterable[DeviceEvent], earliest_new: datetime) -> Window:
    """The reference of the store's windowed read: which stored events of a device (new
    ones included) a recompute needs after new events at or after ``earliest_new``.

    Why it is enough: every event at or before the last stop/delete before ``earliest_new``
    (call its time ``since``) leaves no session open, so pairing restarts closed at
    ``since`` (events at ``since`` that precede that stop are closers too). A session
    starting before ``since`` closed by then and its rate depends only on older events, so
    its record is unchanged; the sessions starting at or after ``since`` need the window's
    events, the rate in force before ``since`` and whether the device already ended."""
    unique = list({e.message_id: e for e in events}.values())
    closes = [e.at for e in unique if e.kind in ("stop", "delete") and e.at < earliest_new]
    since = max(closes, default=None)
    if since is None:
        return Window(None, tuple(unique), None, False)
    rates = [e for e in unique if e.at < since and _carries_rate(e)]
    return Window(
        since,
        tuple(e for e in unique if e.at >= since),
        max(rates, key=lambda e: (e.at, e.message_id), default=None),
        any(e.kind == "delete" and e.at < since for e in unique),
    )


def window_records(
    events: Iterable[DeviceEvent],
    prior_rate: DeviceEvent | None,
    ended: bool,
    plan_changes: Iterable[PlanChange] = (),
    pricing: Pricing | None = None,
) -> tuple[UsageRecord, ...]:
    """The records of the sessions that start in a window of a device's history: pairing
    starts closed at the window's first event, ``prior_rate`` (the latest rate-carrying
    event before the window) counts for the rate in force, and ``ended`` (a delete before
    the window) means nothing in it counts. With the whole history this is
    :func:`device_records`."""
    pricing = pricing or Pricing()
    if ended:
        return ()
    unique = {e.message_id: e for e in events}
    timeline = sorted(unique.values(), key=lambda e: e.order)
    device_rates = [
        (e.at, e.message_id, e.rate if e.rate is not None else pricing.rate_of(e.plan))
        for e in ([prior_rate] if prior_rate is not None else []) + timeline
        if _carries_rate(e)
    ]
    user_plans: dict[str, list[tuple[datetime, str, Decimal]]] = {}
    for change in {c.message_id: c for c in plan_changes}.values():
        user_plans.setdefault(change.user_id, []).append(
            (change.at, change.message_id, pricing.rate_of(change.plan))
        )
    records: list[UsageRecord] = []
    open_start: DeviceEvent | None = None
    for event in timeline:
        if event.kind == "start":
            if open_start is None:
                open_start = event
        elif event.kind in ("stop", "delete"):
            if open_start is not None:
                if open_start.user_id is None:
                    raise ValueError(f"start {open_start.message_id} has no user id")
                duration = seconds_between(open_start.at, event.at)
                rate = _session_rate(open_start, device_rates, user_plans, pricing)
                records.append(
                    UsageRecord(
                        record_id=open_start.message_id,
                        device_id=open_start.device_id,
                        user_id=open_start.user_id,
                        started_at=open_start.at,
                        stopped_at=event.at,
                        duration_seconds=duration,
                        rate=rate,
                        cost=session_cost(duration, rate),
                        closed_by="delete" if event.kind == "delete" else "stop",
                    )
                )
                open_start = None
            if event.kind == "delete":
                break
    return tuple(records)


def diff_records(
    old: Iterable[UsageRecord], new: Iterable[UsageRecord]
) -> RecordDiff:
    """Rows to write to go from ``old`` to ``new`` records, and each user's spend change."""
    before = {r.record_id: r for r in old}
    after = {r.record_id: r for r in new}
    delta: dict[str, Decimal] = {}

    def move(user: str, amount: Decimal) -> None:
        delta[user] = delta.get(user, Decimal(0)) + amount

    upserts = []
    for rid, rec in after.items():
        prev = before.get(rid)
        if prev == rec:
            continue
        upserts.append(rec)
        move(rec.user_id, rec.cost)
        if prev is not None:
            move(prev.user_id, -prev.cost)
    deletes = sorted(set(before) - set(after))
    for rid in deletes:
        move(before[rid].user_id, -before[rid].cost)
    return RecordDiff(
        upserts=tuple(sorted(upserts, key=lambda r: r.record_id)),
        deletes=tuple(deletes),
        spent_delta={u: d for u, d in sorted(delta.items()) if d != 0},
    )


def merge_diffs(diffs: Iterable[RecordDiff]) -> RecordDiff:
    """One diff for several devices' diffs (records of distinct devices never overlap):
    every upsert and delete, and each user's spend changes summed (zero sums dropped)."""
    upserts: list[UsageRecord] = []
    deletes: list[str] = []
    delta: dict[str, Decimal] = {}
    for diff in diffs:
        upserts += diff.upserts
        deletes += diff.deletes
        for user, amount in diff.spent_delta.items():
            delta[user] = delta.get(user, Decimal(0)) + amount
    return RecordDiff(
        upserts=tuple(sorted(upserts, key=lambda r: r.record_id)),
        deletes=tuple(sorted(deletes)),
        spent_delta={u: d for u, d in sorted(delta.items()) if d != 0},
    )


def canonical_decimal(value: Decimal) -> str:
    """``value`` in plain decimal notation, the form other languages can reproduce.

    Optional ``-``, the integer digits without leading zeros (at least one), and only if
    the value has a fractional part a ``.`` and its digits without trailing zeros; no
    exponent: ``10``, ``10.00`` and ``1E+1`` all give ``10``; ``0.050`` gives ``0.05``.
    """
    if not value.is_finite():
        raise ValueError(f"{value} has no decimal notation")
    if value == 0:
        return "0"  # also for -0 and 0E-5
    return format(value.normalize(), "f")


def balance_low_id(user_id: str, threshold: Decimal) -> uuid.UUID:
    """Id of the one ``billing.balance_low`` outbox row for ``user_id`` under ``threshold``.

    UUIDv5 (SHA-1, RFC 4122) in ``BALANCE_LOW_NAMESPACE`` of the UTF-8 bytes of
    ``<user_id> NUL <canonical_decimal(threshold)>``. Deterministic, so even a second
    writer would collide on the outbox primary key.
    """
    return uuid.uuid5(BALANCE_LOW_NAMESPACE, f"{user_id}\x00{canonical_decimal(threshold)}")
