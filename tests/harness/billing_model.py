"""The billing worker's algorithm over dicts: the reference model of the metering tests.

:class:`BillingModel` stores each event once and recomputes what it can change, one event
at a time (:meth:`~BillingModel.apply`) or a batch at a time (:meth:`~BillingModel.apply_batch`),
like the worker's store does in SQL; :func:`meter` computes the records and spend straight
from the set of events. The property tests check that the two agree for every order and any
duplicates, and the integration tests that the store's tables equal them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from consumers.billing.metering import (
    DeviceEvent,
    PlanChange,
    Pricing,
    RecordDiff,
    UsageRecord,
    Window,
    device_records,
    diff_records,
    merge_diffs,
    select_window,
    window_records,
)


@dataclass
class BillingModel:
    """The billing state after some events, updated one event at a time like the worker.

    ``alerts`` maps user -> balance at the moment the ``billing.balance_low`` was emitted.
    """

    pricing: Pricing = field(default_factory=Pricing)
    initial_balance: Decimal = Decimal("100")
    threshold: Decimal = Decimal("10")
    device_events: dict[str, dict[str, DeviceEvent]] = field(default_factory=dict)
    plan_changes: dict[str, PlanChange] = field(default_factory=dict)
    records: dict[str, UsageRecord] = field(default_factory=dict)
    spent: dict[str, Decimal] = field(default_factory=dict)
    alerts: dict[str, Decimal] = field(default_factory=dict)
    #: Recompute a device from its window (:func:`select_window`) after new device events,
    #: like the store, instead of from its whole history; ``events_read`` counts the stored
    #: events the recomputes read (window events and prior rates).
    windowed: bool = False
    events_read: int = 0

    def balance(self, user_id: str) -> Decimal:
        return self.initial_balance - self.spent.get(user_id, Decimal(0))

    def balances(self) -> dict[str, Decimal]:
        return {u: self.balance(u) for u in sorted(self.spent)}

    def apply(self, event: DeviceEvent | PlanChange) -> None:
        """Store ``event`` once and recompute what it can change."""
        if isinstance(event, PlanChange):
            if event.message_id in self.plan_changes:
                return
            self.plan_changes[event.message_id] = event
            devices = sorted(
                d
                for d, evs in self.device_events.items()
                if any(e.user_id == event.user_id for e in evs.values())
            )
        else:
            seen = self.device_events.setdefault(event.device_id, {})
            if event.message_id in seen:
                return
            seen[event.message_id] = event
            self._write(self._diff(event.device_id, event.at))
            return
        for device in devices:
            self._write(self._diff(device))

    def apply_batch(self, batch: Iterable[DeviceEvent | PlanChange]) -> None:
        """What the worker's batch path does: store the batch's device events once,
        recompute every device that got a new one and write one merged diff, then apply
        the batch's plan changes one by one."""
        touched: dict[str, datetime] = {}
        plans: list[PlanChange] = []
        for event in batch:
            if isinstance(event, PlanChange):
                plans.append(event)
                continue
            seen = self.device_events.setdefault(event.device_id, {})
            if event.message_id not in seen:
                seen[event.message_id] = event
                first = touched.get(event.device_id)
                touched[event.device_id] = event.at if first is None else min(first, event.at)
        self._write(merge_diffs(self._diff(d, first) for d, first in sorted(touched.items())))
        for change in plans:
            self.apply(change)

    def _diff(self, device_id: str, earliest_new: datetime | None = None) -> RecordDiff:
        """Recompute a device after new events from ``earliest_new`` on (None: a plan
        change, which re-rates the whole device)."""
        events = self.device_events[device_id].values()
        if not self.windowed or earliest_new is None:
            window = Window(None, tuple(events), None, False)
        else:
            window = select_window(events, earliest_new)
        self.events_read += len(window.events) + (window.prior_rate is not None)
        new = window_records(
            window.events, window.prior_rate, window.ended, self.plan_changes.values(),
            self.pricing,
        )
        old = [
            r for r in self.records.values()
            if r.device_id == device_id and (window.since is None or r.started_at >= window.since)
        ]
        return diff_records(old, new)

    def _write(self, diff: RecordDiff) -> None:
        for rid in diff.deletes:
            del self.records[rid]
        for rec in diff.upserts:
            self.records[rec.record_id] = rec
        for user, amount in diff.spent_delta.items():
            self.spent[user] = self.spent.get(user, Decimal(0)) + amount
            if self.spent[user] == 0:  # like the table: no usage, no balance row
                del self.spent[user]
            balance = self.balance(user)
            if balance < self.threshold and user not in self.alerts:
                self.alerts[user] = balance


def meter(
    events: Iterable[DeviceEvent | PlanChange],
    pricing: Pricing | None = None,
) -> tuple[dict[str, UsageRecord], dict[str, Decimal]]:
    """Records by id and spend by user, straight from the set of events (no increments)."""
    pricing = pricing or Pricing()
    by_device: dict[str, list[DeviceEvent]] = {}
    plans: list[PlanChange] = []
    for e in events:
        if isinstance(e, PlanChange):
            plans.append(e)
        else:
            by_device.setdefault(e.device_id, []).append(e)
    records: dict[str, UsageRecord] = {}
    spent: dict[str, Decimal] = {}
    for device in sorted(by_device):
        for rec in device_records(by_device[device], plans, pricing):
            records[rec.record_id] = rec
            spent[rec.user_id] = spent.get(rec.user_id, Decimal(0)) + rec.cost
    return records, {u: s for u, s in spent.items() if s != 0}
