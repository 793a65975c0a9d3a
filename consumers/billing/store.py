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
from consumers.sqlnames import CREATE_SCHEMA, check_name, qualified_table, render

_RECORD_COLUMNS = (
    "record_id, device_id, user_id, started_at, stopped_at, duration_seconds, rate, cost, "
    "closed_by"
)

_DDL = (
    CREATE_SCHEMA,
    """CREATE TABLE IF NOT EXISTS {s}.device_events (
        message_id text PRIMARY KEY,
        device_id  text NOT NULL,
        kind       text NOT NULL CHECK (kind IN ('start', 'stop', 'delete', 'update')),
        at         timestamptz NOT NULL,
        user_id    text,
        plan       text,
        rate       numeric
    )""",
    # By device and event time: the windowed recompute reads a device's events from a time
    # on; the partial ones find the window's edge (the last stop/delete before the new
    # events), the rate in force before it and an earlier delete without a scan of history.
    "CREATE INDEX IF NOT EXISTS device_events_device_at_idx ON {s}.device_events"
    " (device_id, at)",
    "CREATE INDEX IF NOT EXISTS device_events_close_idx ON {s}.device_events (device_id, at)"
    " WHERE kind IN ('stop', 'delete')",
    "CREATE INDEX IF NOT EXISTS device_events_delete_idx ON {s}.device_events (device_id, at)"
    " WHERE kind = 'delete'",
    "CREATE INDEX IF NOT EXISTS device_events_rate_idx ON {s}.device_events"
    " (device_id, at, message_id COLLATE \"C\") WHERE kind IN ('start', 'update')"
    " AND (rate IS NOT NULL OR plan IS NOT NULL)",
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
    "CREATE INDEX IF NOT EXISTS usage_records_device_start_idx ON {s}.usage_records"
    " (device_id, started_at)",
    "CREATE INDEX IF NOT EXISTS usage_records_user_idx ON {s}.usage_records (user_id)",
    """CREATE TABLE IF NOT EXISTS {s}.balances (
        user_id text PRIMARY KEY,
        balance numeric(20, 6) NOT NULL,
        spent   numeric(20, 6) NOT NULL
    )""",
    # One round trip per event: lock the device, store the event once, lock the session
    # owners (shared), and return what the recompute needs. Each statement of a volatile
    # function takes a fresh snapshot, so rows committed while it waited for a lock are seen.
    """CREATE OR REPLACE FUNCTION {s}.billing_state(
        p_device text, p_new text, p_kind text, p_at timestamptz, p_user text, p_plan text,
        p_rate numeric
    ) RETURNS TABLE (tag text, id text, kind text, at timestamptz, stopped_at timestamptz,
                     user_id text, plan text, rate numeric, duration numeric, cost numeric)
    LANGUAGE plpgsql SET lock_timeout = {lock_timeout} AS $fn$
    #variable_conflict use_column
    DECLARE
        owners text[];
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtextextended('billing device ' || p_device, 0));
        IF p_new IS NOT NULL THEN
            INSERT INTO {s}.device_events (message_id, device_id, kind, at, user_id, plan, rate)
            VALUES (p_new, p_device, p_kind, p_at, p_user, p_plan, p_rate)
            ON CONFLICT DO NOTHING;
            IF NOT FOUND THEN
                RETURN QUERY SELECT 'dup'::text, p_new, NULL::text, NULL::timestamptz,
                    NULL::timestamptz, NULL::text, NULL::text, NULL::numeric, NULL::numeric,
                    NULL::numeric;
                RETURN;
            END IF;
        END IF;
        SELECT coalesce(array_agg(DISTINCT e.user_id ORDER BY e.user_id), '{{}}') INTO owners
          FROM {s}.device_events e
         WHERE e.device_id = p_device AND e.kind = 'start' AND e.user_id IS NOT NULL;
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('billing user ' || o, 0))
           FROM unnest(owners) AS o ORDER BY o;
        RETURN QUERY SELECT 'e'::text, e.message_id, e.kind, e.at, NULL::timestamptz,
            e.user_id, e.plan, e.rate, NULL::numeric, NULL::numeric
          FROM {s}.device_events e WHERE e.device_id = p_device;
        RETURN QUERY SELECT 'p'::text, p.message_id, NULL::text, p.at, NULL::timestamptz,
            p.user_id, p.plan, NULL::numeric, NULL::numeric, NULL::numeric
          FROM {s}.user_plans p WHERE p.user_id = ANY(owners);
        RETURN QUERY SELECT 'r'::text, r.record_id, r.closed_by, r.started_at, r.stopped_at,
            r.user_id, NULL::text, r.rate, r.duration_seconds, r.cost
          FROM {s}.usage_records r WHERE r.device_id = p_device;
    END
    $fn$""",
    # The batch form of billing_state, one round trip for a whole batch of device events:
    # lock every device of the batch in one sorted order (two replicas' batches queue behind
    # each other, never in a cycle), store the events once, then lock the owners of the
    # devices that got a new event (shared, sorted) and return those devices' windows
    # (metering.select_window): the events from the last stop/delete before the earliest new
    # event on ('e'), the latest rate-carrying event before that ('x'), a delete before it
    # ('d'), and the records that start in the window ('r'). Ties at equal times are broken
    # by message id in byte order (COLLATE "C"), as Python compares them.
    """CREATE OR REPLACE FUNCTION {s}.billing_state_many(
        p_ids text[], p_devices text[], p_kinds text[], p_ats timestamptz[], p_users text[],
        p_plans text[], p_rates numeric[]
    ) RETURNS TABLE (tag text, device_id text, id text, kind text, at timestamptz,
                     stopped_at timestamptz, user_id text, plan text, rate numeric,
                     duration numeric, cost numeric)
    LANGUAGE plpgsql SET lock_timeout = {lock_timeout} AS $fn$
    #variable_conflict use_column
    DECLARE
        d text;
        touched text[];
        since timestamptz[];
        owners text[];
    BEGIN
        FOR d IN SELECT DISTINCT x FROM unnest(p_devices) AS x ORDER BY x LOOP
            PERFORM pg_advisory_xact_lock(hashtextextended('billing device ' || d, 0));
        END LOOP;
        WITH ins AS (
            INSERT INTO {s}.device_events (message_id, device_id, kind, at, user_id, plan, rate)
            SELECT * FROM unnest(p_ids, p_devices, p_kinds, p_ats, p_users, p_plans, p_rates)
            ORDER BY 1
            ON CONFLICT DO NOTHING RETURNING device_id, at
        )
        SELECT coalesce(array_agg(m.d ORDER BY m.d), '{{}}'),
               coalesce(array_agg(coalesce(c.at, '-infinity') ORDER BY m.d), '{{}}')
          INTO touched, since
          FROM (SELECT ins.device_id AS d, min(ins.at) AS t FROM ins GROUP BY 1) m
          LEFT JOIN LATERAL (
               SELECT x.at FROM {s}.device_events x
                WHERE x.device_id = m.d AND x.kind IN ('stop', 'delete') AND x.at < m.t
                ORDER BY x.at DESC LIMIT 1) c ON true;
        -- (LATERAL per device: an index lookup each, whatever the table's statistics say;
        -- "device_id = ANY(array)" was planned as a scan of the whole table)
        SELECT coalesce(array_agg(DISTINCT e.user_id ORDER BY e.user_id), '{{}}') INTO owners
          FROM unnest(touched, since) AS t(d, w), LATERAL (
               SELECT x.user_id FROM {s}.device_events x
                WHERE x.device_id = t.d AND x.at >= t.w AND x.kind = 'start'
                  AND x.user_id IS NOT NULL) e;
        PERFORM pg_advisory_xact_lock_shared(hashtextextended('billing user ' || o, 0))
           FROM unnest(owners) AS o ORDER BY o;
        RETURN QUERY SELECT 'e'::text, e.device_id, e.message_id, e.kind, e.at,
            NULL::timestamptz, e.user_id, e.plan, e.rate, NULL::numeric, NULL::numeric
          FROM unnest(touched, since) AS t(d, w),
               LATERAL (SELECT * FROM {s}.device_events x
                         WHERE x.device_id = t.d AND x.at >= t.w) e;
        RETURN QUERY SELECT 'x'::text, e.device_id, e.message_id, e.kind, e.at,
            NULL::timestamptz, e.user_id, e.plan, e.rate, NULL::numeric, NULL::numeric
          FROM unnest(touched, since) AS t(d, w),
               LATERAL (SELECT * FROM {s}.device_events x
                         WHERE x.device_id = t.d AND x.at < t.w
                           AND x.kind IN ('start', 'update')
                           AND (x.rate IS NOT NULL OR x.plan IS NOT NULL)
                         ORDER BY x.at DESC, x.message_id COLLATE "C" DESC LIMIT 1) e;
        RETURN QUERY SELECT 'd'::text, t.d, NULL::text, NULL::text, NULL::timestamptz,
            NULL::timestamptz, NULL::text, NULL::text, NULL::numeric, NULL::numeric,
            NULL::numeric
          FROM unnest(touched, since) AS t(d, w)
         WHERE EXISTS (SELECT 1 FROM {s}.device_events x
                        WHERE x.device_id = t.d AND x.kind = 'delete' AND x.at < t.w);
        RETURN QUERY SELECT 'p'::text, NULL::text, p.message_id, NULL::text, p.at,
            NULL::timestamptz, p.user_id, p.plan, NULL::numeric, NULL::numeric, NULL::numeric
          FROM unnest(owners) AS o(u),
               LATERAL (SELECT * FROM {s}.user_plans x WHERE x.user_id = o.u) p;
        RETURN QUERY SELECT 'r'::text, r.device_id, r.record_id, r.closed_by, r.started_at,
            r.stopped_at, r.user_id, NULL::text, r.rate, r.duration_seconds, r.cost
          FROM unnest(touched, since) AS t(d, w),
               LATERAL (SELECT * FROM {s}.usage_records x
                         WHERE x.device_id = t.d AND x.started_at >= t.w) r;
    END
    $fn$""",
    # The write of a recompute: records out, records in, balances moved by the spend change.
    f"""CREATE OR REPLACE FUNCTION {{s}}.billing_write(
        p_deletes text[], p_ids text[], p_devices text[], p_users text[],
        p_starts timestamptz[], p_stops timestamptz[], p_durations numeric[],
        p_rates numeric[], p_costs numeric[], p_closed text[], p_initial numeric,
        p_who text[], p_deltas numeric[]
    ) RETURNS TABLE (user_id text, balance numeric, spent numeric)
    LANGUAGE plpgsql SET lock_timeout = {{lock_timeout}} AS $fn$
    #variable_conflict use_column
    BEGIN
        RETURN QUERY
        WITH gone AS (DELETE FROM {{s}}.usage_records WHERE record_id = ANY(p_deletes)),
        up AS (
            INSERT INTO {{s}}.usage_records ({_RECORD_COLUMNS})
            SELECT * FROM unnest(p_ids, p_devices, p_users, p_starts, p_stops, p_durations,
                                 p_rates, p_costs, p_closed)
            ON CONFLICT (record_id) DO UPDATE SET device_id = EXCLUDED.device_id,
                user_id = EXCLUDED.user_id, started_at = EXCLUDED.started_at,
                stopped_at = EXCLUDED.stopped_at, duration_seconds = EXCLUDED.duration_seconds,
                rate = EXCLUDED.rate, cost = EXCLUDED.cost, closed_by = EXCLUDED.closed_by
        )
        INSERT INTO {{s}}.balances AS b (user_id, balance, spent)
        SELECT u, p_initial - d, d FROM unnest(p_who, p_deltas) AS t(u, d) ORDER BY u
        ON CONFLICT (user_id) DO UPDATE SET balance = b.balance - EXCLUDED.spent,
            spent = b.spent + EXCLUDED.spent
        RETURNING b.user_id, b.balance, b.spent;
    END
    $fn$""",
    """CREATE TABLE IF NOT EXISTS {s}.balance_alerts (
        user_id   text NOT NULL,
        threshold numeric NOT NULL,
        event_id  uuid NOT NULL,
        balance   numeric(20, 6) NOT NULL,
        PRIMARY KEY (user_id, threshold)
    )""",
)



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
    name = sql.Literal(schema)
    return tuple(
        render(sql.SQL(stmt).format(s=s, lock_timeout=timeout, schema_name=name)) for stmt in _DDL
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
