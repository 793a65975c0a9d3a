"""Billing's tables and the few statements per event that keep them equal to the metering.

Contract: inside the caller's transaction, :meth:`BillingStore.device_event` stores one event
(once: keyed by message id), recomputes the device's usage records with
:func:`metering.device_records` under a per-device advisory lock, writes only the rows that
changed, moves each owner's balance by the change in spend, and writes ``billing.balance_low``
into the outbox (once per user and threshold) when a balance is below the threshold.
Statements are pipelined: an in-order event costs two round trips, a late one three or four.

Locks (transaction-scoped advisory locks, so replicas serialise per device): a device event
takes the device's lock, then a shared lock on each session owner before reading plans; a
``user.updated`` takes the user's lock exclusively, then each of the user's devices. A
deadlock between the two orders is detected by PostgreSQL and the loser is retried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import orjson
import psycopg
from psycopg import sql

from consumers.billing import metering
from consumers.billing.metering import DeviceEvent, PlanChange, Pricing, UsageRecord
from consumers.sqlnames import check_name, qualified_table, render

_DDL = (
    "CREATE SCHEMA IF NOT EXISTS {s}",
    """CREATE TABLE IF NOT EXISTS {s}.device_events (
        message_id text PRIMARY KEY,
        device_id  text NOT NULL,
        kind       text NOT NULL CHECK (kind IN ('start', 'stop', 'delete', 'update')),
        at         timestamptz NOT NULL,
        user_id    text,
        plan       text,
        rate       numeric
    )""",
    "CREATE INDEX IF NOT EXISTS device_events_device_idx ON {s}.device_events (device_id)",
    "CREATE INDEX IF NOT EXISTS device_events_user_idx ON {s}.device_events (user_id)"
    " WHERE kind = 'start'",
    """CREATE TABLE IF NOT EXISTS {s}.user_plans (
        message_id text PRIMARY KEY,
        user_id    text NOT NULL,
        at         timestamptz NOT NULL,
        plan       text NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS user_plans_user_idx ON {s}.user_plans (user_id)",
    """CREATE TABLE IF NOT EXISTS {s}.usage_records (
        record_id        text PRIMARY KEY,
        device_id        text NOT NULL,
        user_id          text NOT NULL,
        started_at       timestamptz NOT NULL,
        stopped_at       timestamptz NOT NULL,
        duration_seconds numeric(20, 6) NOT NULL,
        rate             numeric NOT NULL,
        cost             numeric(20, 6) NOT NULL,
        closed_by        text NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS usage_records_device_idx ON {s}.usage_records (device_id)",
    "CREATE INDEX IF NOT EXISTS usage_records_user_idx ON {s}.usage_records (user_id)",
    """CREATE TABLE IF NOT EXISTS {s}.balances (
        user_id text PRIMARY KEY,
        balance numeric(20, 6) NOT NULL,
        spent   numeric(20, 6) NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.balance_alerts (
        user_id   text NOT NULL,
        threshold numeric NOT NULL,
        event_id  uuid NOT NULL,
        balance   numeric(20, 6) NOT NULL,
        PRIMARY KEY (user_id, threshold)
    )""",
)

async def _run(
    conn: psycopg.AsyncConnection[Any], query: str, params: Any
) -> psycopg.AsyncCursor[Any]:
    # Not prepared: a statement prepared inside a pipeline that a deadlock aborts is left
    # unknown to the server while psycopg believes it exists (InvalidSqlStatementName).
    return await conn.execute(query, params, prepare=False)


_RECORD_COLUMNS = (
    "record_id, device_id, user_id, started_at, stopped_at, duration_seconds, rate, cost, "
    "closed_by"
)


def schema_ddl(schema: str) -> tuple[str, ...]:
    """Idempotent DDL of billing's tables in ``schema`` (applied by the runtime at start)."""
    s = sql.Identifier(check_name(schema, "CDC_BILLING_SCHEMA"))
    return tuple(render(sql.SQL(stmt).format(s=s)) for stmt in _DDL)


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

        self._lock = "SELECT pg_advisory_xact_lock(%s)"
        self._lock_shared = (
            "SELECT pg_advisory_xact_lock_shared(k) FROM unnest(%s::bigint[]) WITH ORDINALITY"
            " AS l(k, n) ORDER BY n"
        )
        self._insert_event = q(
            "INSERT INTO {s}.device_events (message_id, device_id, kind, at, user_id, plan, rate)"
            " VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1"
        )
        self._owners = q(
            "SELECT DISTINCT user_id FROM {s}.device_events"
            " WHERE device_id = %s AND kind = 'start' AND user_id IS NOT NULL"
        )
        self._events = q(
            "SELECT message_id, device_id, kind, at, user_id, plan, rate"
            " FROM {s}.device_events WHERE device_id = %s"
        )
        self._plans = q(
            "SELECT message_id, user_id, at, plan FROM {s}.user_plans WHERE user_id = ANY(%s)"
        )
        self._records = q(
            f"SELECT {_RECORD_COLUMNS} FROM {{s}}.usage_records WHERE device_id = %s"
        )
        self._delete_records = q("DELETE FROM {s}.usage_records WHERE record_id = ANY(%s)")
        self._upsert_record = q(
            f"INSERT INTO {{s}}.usage_records ({_RECORD_COLUMNS})"
            " SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::timestamptz[],"
            " %s::timestamptz[], %s::numeric[], %s::numeric[], %s::numeric[], %s::text[])"
            " ON CONFLICT (record_id) DO UPDATE SET device_id = EXCLUDED.device_id,"
            " user_id = EXCLUDED.user_id, started_at = EXCLUDED.started_at,"
            " stopped_at = EXCLUDED.stopped_at, duration_seconds = EXCLUDED.duration_seconds,"
            " rate = EXCLUDED.rate, cost = EXCLUDED.cost, closed_by = EXCLUDED.closed_by"
        )
        self._debit = q(
            "INSERT INTO {s}.balances AS b (user_id, balance, spent)"
            " VALUES (%(user)s, %(initial)s - %(delta)s, %(delta)s)"
            " ON CONFLICT (user_id) DO UPDATE SET balance = b.balance - EXCLUDED.spent,"
            " spent = b.spent + EXCLUDED.spent RETURNING balance, spent"
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
        self._insert_plan = q(
            "INSERT INTO {s}.user_plans (message_id, user_id, at, plan)"
            " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING RETURNING 1"
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
        async with conn.pipeline():
            await _run(conn, self._lock, (metering.lock_key("device", event.device_id),))
            inserted = await _run(conn,
                self._insert_event,
                (event.message_id, event.device_id, event.kind, event.at, event.user_id,
                 event.plan, event.rate),
            )
            owners = await _run(conn, self._owners, (event.device_id,))
        if await inserted.fetchone() is None:
            return []  # the same event under the same id: already counted
        users = sorted(str(row[0]) for row in await owners.fetchall())
        return await self._recompute(conn, event.device_id, users)

    async def plan_change(
        self, conn: psycopg.AsyncConnection[Any], change: PlanChange
    ) -> list[Alert]:
        """Store a user's plan change once and re-rate the user's devices."""
        async with conn.pipeline():
            await _run(conn, self._lock, (metering.lock_key("user", change.user_id),))
            inserted = await _run(conn,
                self._insert_plan, (change.message_id, change.user_id, change.at, change.plan)
            )
            devices = await _run(conn, self._user_devices, (change.user_id,))
        if await inserted.fetchone() is None:
            return []
        alerts: list[Alert] = []
        for (device_id,) in await devices.fetchall():
            await _run(conn, self._lock, (metering.lock_key("device", device_id),))
            owners = await _run(conn, self._owners, (device_id,))
            users = sorted(str(row[0]) for row in await owners.fetchall())
            alerts += await self._recompute(conn, device_id, users)
        return alerts

    # -- the recompute ----------------------------------------------------------------------

    async def _recompute(
        self, conn: psycopg.AsyncConnection[Any], device_id: str, users: Sequence[str]
    ) -> list[Alert]:
        async with conn.pipeline():
            if users:
                await _run(conn,
                    self._lock_shared, ([metering.lock_key("user", u) for u in users],)
                )
                plans_cur = await _run(conn, self._plans, (list(users),))
            events_cur = await _run(conn, self._events, (device_id,))
            records_cur = await _run(conn, self._records, (device_id,))
        events = [
            DeviceEvent(
                message_id=r[0], device_id=r[1], kind=r[2], at=r[3], user_id=r[4], plan=r[5],
                rate=r[6],
            )
            for r in await events_cur.fetchall()
        ]
        plans = (
            [PlanChange(message_id=r[0], user_id=r[1], at=r[2], plan=r[3])
             for r in await plans_cur.fetchall()]
            if users
            else []
        )
        old = [UsageRecord(*row) for row in await records_cur.fetchall()]
        new = metering.device_records(events, plans, self.pricing)
        diff = metering.diff_records(old, new)
        if diff.empty:
            return []
        async with conn.pipeline():
            if diff.deletes:
                await _run(conn, self._delete_records, (list(diff.deletes),))
            if diff.upserts:
                rows = [
                    (r.record_id, r.device_id, r.user_id, r.started_at, r.stopped_at,
                     r.duration_seconds, r.rate, r.cost, r.closed_by)
                    for r in diff.upserts
                ]
                columns = [list(col) for col in zip(*rows, strict=True)]
                await _run(conn, self._upsert_record, columns)
            debits = [
                (user, await _run(conn,
                    self._debit,
                    {"user": user, "initial": self.initial_balance, "delta": delta},
                ))
                for user, delta in diff.spent_delta.items()
            ]
        alerts = []
        for user, cur in debits:
            row = await cur.fetchone()
            assert row is not None
            balance, spent = row
            if spent == 0:
                await _run(conn, self._drop_balance, (user,))
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
        cur = await _run(conn,
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
