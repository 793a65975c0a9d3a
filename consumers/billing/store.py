"""Billing's tables and the few statements per event that keep them equal to the metering.

Contract: inside the caller's transaction, :meth:`BillingStore.device_event` stores one event
(once: keyed by message id), recomputes the device's usage records with
:func:`metering.device_records` under a per-device advisory lock, writes only the rows that
changed, moves each owner's balance by the change in spend, and writes ``billing.balance_low``
into the outbox (once per user and threshold) when a balance is below the threshold.
One statement (the ``billing_state`` function) reads and locks, one more writes when records
change: an event costs one or two round trips, a balance crossing one more.
:meth:`BillingStore.device_events` does the same for a whole batch of events in two
statements (``billing_state_many``, then one ``billing_write``), locking the batch's devices
in sorted order, and reads only each device's window (:func:`metering.select_window`: from
the last stop/delete before the earliest new event), so its cost does not grow with a
device's history; the worker uses it and keeps the one-event form (whole history) as its
fallback.

Locks (transaction-scoped advisory locks, so replicas serialise per device): a device event
takes the device's lock, then a shared lock on each session owner before reading plans; a
``user.updated`` takes the user's lock exclusively, then each of the user's devices. A
deadlock between the two orders is detected by PostgreSQL and the loser is retried.

The tables and the three PL/pgSQL functions are in ``consumers/billing/sql/`` (package data).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from importlib import resources
from typing import Any

import orjson
import psycopg
from psycopg import sql

from consumers.billing import metering
from consumers.billing.metering import DeviceEvent, PlanChange, Pricing, UsageRecord
from consumers.sqlnames import CREATE_SCHEMA, check_name, qualified_table, render

#: The files of ``sql/``, in the order they run: the tables, then the functions that read and
#: write them. Each is one statement or a script of plain DDL, with ``{s}`` for the quoted
#: schema and ``{lock_timeout}`` for the functions' lock wait (both substituted by psycopg, which
#: reads any other brace as a placeholder too: an empty array is written ``ARRAY[]::text[]``).
_SCRIPTS = ("tables.sql", "billing_state.sql", "billing_state_many.sql", "billing_write.sql")


async def _execute(
    conn: psycopg.AsyncConnection[Any], query: str, params: Any
) -> psycopg.AsyncCursor[Any]:
    # Never server-prepared: the runtime may run a db_only batch in pipeline mode, and a
    # statement psycopg prepares in a pipeline that an error aborts stays unknown to the
    # server while psycopg believes it exists ("prepared statement ... does not exist").
    # The statements are function calls and small DML: planning them is cheap.
    return await conn.execute(query, params, prepare=False)


def schema_ddl(schema: str, lock_timeout: float = 0.2) -> tuple[str, ...]:
    """Idempotent DDL of billing's tables and functions in ``schema`` (applied by the runtime
    at start). ``lock_timeout`` (seconds) bounds a wait for another replica's device or user:
    past it the event fails and is retried later, so a lock cycle between two replicas'
    batches costs that long, not PostgreSQL's ``deadlock_timeout``."""
    s = sql.Identifier(check_name(schema, "CDC_BILLING_SCHEMA"))
    timeout = sql.Literal(f"{max(1, round(lock_timeout * 1000))}ms")
    scripts = resources.files("consumers.billing") / "sql"
    return (
        render(sql.SQL(CREATE_SCHEMA).format(s=s, schema_name=sql.Literal(schema))),
        *(
            render(sql.SQL(scripts.joinpath(name).read_text()).format(s=s, lock_timeout=timeout))
            for name in _SCRIPTS
        ),
    )


@dataclass(frozen=True, slots=True)
class Alert:
    """A ``billing.balance_low`` just written to the outbox."""

    user_id: str
    balance: Decimal
    event_id: str


class BillingStore:
    """The statements, rendered once for a schema and an outbox table."""

    def __init__(
        self,
        schema: str,
        outbox_table: str,
        pricing: Pricing,
        *,
        initial_balance: Decimal,
        threshold: Decimal,
    ) -> None:
        self.pricing = pricing
        self.initial_balance = initial_balance
        self.threshold = threshold
        s = sql.Identifier(check_name(schema, "CDC_BILLING_SCHEMA"))
        outbox = qualified_table(outbox_table, "CDC_OUTBOX_TABLE")

        def q(text: str) -> str:
            return render(sql.SQL(text).format(s=s, outbox=outbox))

        self._state = q(
            "SELECT * FROM {s}.billing_state(%s::text, %s::text, %s::text, %s::timestamptz,"
            " %s::text, %s::text, %s::numeric)"
        )
        self._state_many = q(
            "SELECT * FROM {s}.billing_state_many(%s::text[], %s::text[], %s::text[],"
            " %s::timestamptz[], %s::text[], %s::text[], %s::numeric[])"
        )
        self._write = q(
            "SELECT * FROM {s}.billing_write(%(deletes)s::text[], %(ids)s::text[],"
            " %(devices)s::text[], %(users)s::text[], %(starts)s::timestamptz[],"
            " %(stops)s::timestamptz[], %(durations)s::numeric[], %(rates)s::numeric[],"
            " %(costs)s::numeric[], %(closed)s::text[], %(initial)s::numeric,"
            " %(who)s::text[], %(deltas)s::numeric[])"
        )
        self._drop_balance = q("DELETE FROM {s}.balances WHERE user_id = %s AND spent = 0")
        self._alert = q(
            "WITH a AS (INSERT INTO {s}.balance_alerts (user_id, threshold, event_id, balance)"
            " VALUES (%(user)s, %(threshold)s, %(id)s, %(balance)s) ON CONFLICT DO NOTHING"
            " RETURNING event_id)"
            " INSERT INTO {outbox} (id, aggregate_type, aggregate_id, event_type, payload)"
            " SELECT event_id, 'billing', %(user)s, 'billing.balance_low', %(payload)s::jsonb"
            " FROM a RETURNING id"
        )
        self._plan = q(
            "WITH lock AS (SELECT pg_advisory_xact_lock("
            "hashtextextended('billing user ' || %(user)s, 0)))"
            " INSERT INTO {s}.user_plans (message_id, user_id, at, plan)"
            " SELECT %(id)s, %(user)s, %(at)s, %(plan)s FROM lock ON CONFLICT DO NOTHING"
            " RETURNING 1"
        )
        self._user_devices = q(
            "SELECT DISTINCT device_id FROM {s}.device_events"
            " WHERE user_id = %s AND kind = 'start' ORDER BY device_id"
        )

    # -- events -----------------------------------------------------------------------------

    async def device_event(
        self, conn: psycopg.AsyncConnection[Any], event: DeviceEvent
    ) -> list[Alert]:
        """Store a ``device.*`` event once and bring the device's records up to date."""
        cur = await _execute(conn,
            self._state,
            (event.device_id, event.message_id, event.kind, event.at, event.user_id,
             event.plan, event.rate),
        )
        rows = await cur.fetchall()
        if rows and rows[0][0] == "dup":
            return []  # the same event under the same id: already counted
        return await self._settle(conn, event.device_id, rows)

    async def device_events(
        self, conn: psycopg.AsyncConnection[Any], events: Sequence[DeviceEvent]
    ) -> list[Alert]:
        """:meth:`device_event` for many events at once: one locked read, one recompute of
        the window of each device that got a new event, one write of all the changes. The
        tables end as if the events had come one by one (in any order): they are a function
        of the set."""
        if not events:
            return []
        cur = await _execute(conn, self._state_many, (
            [e.message_id for e in events], [e.device_id for e in events],
            [e.kind for e in events], [e.at for e in events], [e.user_id for e in events],
            [e.plan for e in events], [e.rate for e in events],
        ))
        stored: dict[str, list[DeviceEvent]] = {}
        prior: dict[str, DeviceEvent] = {}
        ended: set[str] = set()
        old: dict[str, list[UsageRecord]] = {}
        plans = []
        for tag, device, ident, kind, at, stopped_at, user, plan, rate, duration, cost in (
            await cur.fetchall()
        ):
            if tag == "e":
                stored.setdefault(device, []).append(
                    DeviceEvent(ident, device, kind, at, user, plan, rate)
                )
            elif tag == "x":
                prior[device] = DeviceEvent(ident, device, kind, at, user, plan, rate)
            elif tag == "d":
                ended.add(device)
            elif tag == "p":
                plans.append(PlanChange(ident, user, at, plan))
            else:
                old.setdefault(device, []).append(
                    UsageRecord(ident, device, user, at, stopped_at, duration, rate, cost, kind)
                )
        diff = metering.merge_diffs(
            metering.diff_records(
                old.get(device, ()),
                metering.window_records(
                    evs, prior.get(device), device in ended, plans, self.pricing
                ),
            )
            for device, evs in sorted(stored.items())
        )
        return await self._write_diff(conn, diff)

    async def plan_change(
        self, conn: psycopg.AsyncConnection[Any], change: PlanChange
    ) -> list[Alert]:
        """Store a user's plan change once (under the user's lock) and re-rate the user's
        devices."""
        cur = await _execute(conn,
            self._plan,
            {"id": change.message_id, "user": change.user_id, "at": change.at,
             "plan": change.plan},
        )
        if await cur.fetchone() is None:
            return []
        devices = await _execute(conn, self._user_devices, (change.user_id,))
        alerts: list[Alert] = []
        for (device_id,) in await devices.fetchall():
            state = await _execute(conn, self._state, (device_id, None, None, None, None, None,
                                                     None))
            alerts += await self._settle(conn, device_id, await state.fetchall())
        return alerts

    # -- the recompute ----------------------------------------------------------------------

    async def _settle(
        self, conn: psycopg.AsyncConnection[Any], device_id: str, rows: Sequence[Any]
    ) -> list[Alert]:
        """Recompute the device's records from ``rows`` (billing_state) and write the diff."""
        events, plans, old = [], [], []
        for tag, ident, kind, at, stopped_at, user, plan, rate, duration, cost in rows:
            if tag == "e":
                events.append(DeviceEvent(ident, device_id, kind, at, user, plan, rate))
            elif tag == "p":
                plans.append(PlanChange(ident, user, at, plan))
            else:
                old.append(UsageRecord(ident, device_id, user, at, stopped_at, duration, rate,
                                       cost, kind))
        diff = metering.diff_records(old, metering.device_records(events, plans, self.pricing))
        return await self._write_diff(conn, diff)

    async def _write_diff(
        self, conn: psycopg.AsyncConnection[Any], diff: metering.RecordDiff
    ) -> list[Alert]:
        """Write ``diff`` (records and balances) in one statement, then any alerts."""
        if diff.empty:
            return []
        ups = diff.upserts
        cur = await _execute(conn,
            self._write,
            {
                "deletes": list(diff.deletes),
                "ids": [r.record_id for r in ups],
                "devices": [r.device_id for r in ups],
                "users": [r.user_id for r in ups],
                "starts": [r.started_at for r in ups],
                "stops": [r.stopped_at for r in ups],
                "durations": [r.duration_seconds for r in ups],
                "rates": [r.rate for r in ups],
                "costs": [r.cost for r in ups],
                "closed": [r.closed_by for r in ups],
                "initial": self.initial_balance,
                "who": list(diff.spent_delta),
                "deltas": list(diff.spent_delta.values()),
            },
        )
        alerts = []
        for user, balance, spent in await cur.fetchall():
            if spent == 0:  # no usage left (a late event undid it): no balance row
                await _execute(conn, self._drop_balance, (user,))
            elif balance < self.threshold:
                alert = await self._alert_once(conn, user, balance)
                if alert is not None:
                    alerts.append(alert)
        return alerts

    async def _alert_once(
        self, conn: psycopg.AsyncConnection[Any], user: str, balance: Decimal
    ) -> Alert | None:
        event_id = str(metering.balance_low_id(user, self.threshold))
        payload = {
            "userId": user,
            "balance": float(balance),
            "threshold": float(self.threshold),
            "eventId": event_id,
        }
        cur = await _execute(conn,
            self._alert,
            {
                "user": user,
                "threshold": self.threshold,
                "id": event_id,
                "balance": balance,
                "payload": orjson.dumps(payload).decode(),
            },
        )
        return None if await cur.fetchone() is None else Alert(user, balance, event_id)
