"""Notifications' tables: in-app notifications, per-user preferences, the delivery log.

Contract: ``notifications`` holds one in-app row per event (``message_id`` primary key);
``notification_deliveries`` one row per ``(message_id, channel)`` actually delivered, so a
later attempt of the same event skips what is recorded; and ``notification_preferences`` the
per-user choices (absent row = the configured defaults). The in-app row and its record are
written in the handler's transaction. A webhook or email record is written by
:class:`DeliveryLog` on a connection of its own and committed right after the send: it
stands even when the handler's transaction rolls back (say the email failed after the
webhook went out), so the retry does not POST the webhook again. The reads the worker
needs before its sends (preferences, delivered channels, inbox) are made for a whole chunk of
events at once on that connection too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import psycopg
from psycopg import sql

from consumers.errors import Retry
from consumers.notifications.templates import Channel, Notification, Preferences
from consumers.runtime.inbox import table_ident
from consumers.runtime.linger import Gathering
from consumers.runtime.pgarray import text_array
from consumers.sqlnames import CREATE_SCHEMA, check_name, render

_DDL = (
    CREATE_SCHEMA,
    """CREATE TABLE IF NOT EXISTS {s}.notifications (
        message_id text PRIMARY KEY,
        user_id    text,
        event_type text NOT NULL,
        title      text NOT NULL,
        body       text NOT NULL,
        severity   text NOT NULL,
        template   text NOT NULL,
        payload    jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        read_at    timestamptz
    )""",
    "CREATE INDEX IF NOT EXISTS notifications_user_idx ON {s}.notifications"
    " (user_id, created_at)",
    """CREATE TABLE IF NOT EXISTS {s}.notification_preferences (
        user_id            text PRIMARY KEY,
        in_app             boolean NOT NULL DEFAULT true,
        webhook            boolean NOT NULL DEFAULT false,
        webhook_url        text,
        email              boolean NOT NULL DEFAULT false,
        email_address      text,
        email_min_severity text NOT NULL DEFAULT 'info'
            CHECK (email_min_severity IN ('info', 'warning', 'critical')),
        muted              text[] NOT NULL DEFAULT '{{}}'
    )""",
    """CREATE TABLE IF NOT EXISTS {s}.notification_deliveries (
        message_id      text NOT NULL,
        channel         text NOT NULL CHECK (channel IN ('in_app', 'webhook', 'email')),
        user_id         text,
        target          text,
        idempotency_key text NOT NULL,
        delivered_at    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (message_id, channel)
    )""",
)


def schema_ddl(schema: str) -> tuple[str, ...]:
    """Idempotent DDL of the notification tables in ``schema``."""
    s = sql.Identifier(check_name(schema, "CDC_NOTIFICATIONS_SCHEMA"))
    name = sql.Literal(schema)
    return tuple(render(sql.SQL(stmt).format(s=s, schema_name=name)) for stmt in _DDL)


class NotificationStore:
    """The statements, rendered once for a schema."""

    def __init__(self, schema: str) -> None:
        s = self._s = sql.Identifier(check_name(schema, "CDC_NOTIFICATIONS_SCHEMA"))

        def q(text: str) -> str:
            return render(sql.SQL(text).format(s=s))

        # Rows go in as one JSON array (dumped by orjson): cheaper than a text[] per column.
        # The in-app rows of a batch and their delivery records, in one statement.
        self._in_app_many = q(
            "WITH x AS (SELECT * FROM jsonb_to_recordset(%s::jsonb) AS x(m text, u text,"
            " e text, t text, b text, v text, p text, j jsonb, k text)),"
            " n AS (INSERT INTO {s}.notifications (message_id, user_id, event_type, title, body,"
            " severity, template, payload) SELECT m, u, e, t, b, v, p, j FROM x"
            " ON CONFLICT DO NOTHING)"
            " INSERT INTO {s}.notification_deliveries (message_id, channel, user_id, target,"
            " idempotency_key) SELECT m, 'in_app', u, NULL, k FROM x ON CONFLICT DO NOTHING"
        )
        self._record_many = q(
            "INSERT INTO {s}.notification_deliveries (message_id, channel, user_id, target,"
            " idempotency_key) SELECT m, c, u, t, k FROM jsonb_to_recordset(%s::jsonb)"
            " AS x(m text, c text, u text, t text, k text) ON CONFLICT DO NOTHING"
        )

    def lookup_statement(self, inbox_table: str, consumer: str) -> str:
        """The one statement of :meth:`lookup_many`, for the worker's inbox table
        (``schema.table``) and consumer name: rows tagged ``p`` (a user's preferences),
        ``d`` (a channel delivered for a message id) and ``s`` (an id the inbox holds).

        Each id is its own index probe, whatever the tables' statistics say: a ``LATERAL``
        subquery per array element, kept by its ``LIMIT`` (``OFFSET 0`` where a message has
        several rows) from being flattened into a join PostgreSQL could hash. With
        ``key = ANY(array)`` the plan depended on the statistics: until autovacuum's first
        ANALYZE of a new table, the planner's default guesses chose a scan of every delivery
        record, or of every inbox row of the consumer, for each chunk, so a fresh deployment
        draining a backlog spent milliseconds per chunk, growing with the tables, on a read
        of a few dozen rows."""
        return render(
            sql.SQL(
                "SELECT 'p', p.user_id, p.in_app, p.webhook, p.webhook_url, p.email,"
                " p.email_address, p.email_min_severity, p.muted"
                " FROM unnest(%(u)s::text[]) AS i(k), LATERAL (SELECT * FROM"
                " {s}.notification_preferences x WHERE x.user_id = i.k LIMIT 1) p"
                " UNION ALL SELECT 'd', i.k, NULL, NULL, d.channel, NULL, NULL, NULL, NULL"
                " FROM unnest(%(m)s::text[]) AS i(k), LATERAL (SELECT x.channel FROM"
                " {s}.notification_deliveries x WHERE x.message_id = i.k OFFSET 0) d"
                " UNION ALL SELECT 's', i.k, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
                " FROM unnest(%(m)s::text[]) AS i(k), LATERAL (SELECT FROM {inbox} x"
                " WHERE x.consumer = {consumer} AND x.message_id = i.k LIMIT 1) s"
            ).format(
                s=self._s,
                inbox=table_ident(inbox_table),
                consumer=sql.Literal(consumer),
            )
        )

    async def lookup_many(
        self,
        conn: psycopg.AsyncConnection[Any],
        user_ids: Sequence[str],
        message_ids: Sequence[str],
        statement: str,
    ) -> Lookup:
        """For a chunk of events, in one statement (:meth:`lookup_statement`): the stored
        preferences of ``user_ids`` (absent: use the defaults), the channels already
        delivered per message id, and the ids the worker's inbox already holds."""
        # Id lists as one text[] literal each, not a list adapted id by id.
        cur = await conn.execute(
            statement, {"u": text_array(user_ids), "m": text_array(message_ids)}
        )
        prefs: dict[str, Preferences] = {}
        done: dict[str, set[str]] = {}
        seen: set[str] = set()
        for row in await cur.fetchall():
            kind, key = row[0], row[1]
            if kind == "p":
                prefs[key] = Preferences(
                    in_app=row[2],
                    webhook=row[3],
                    webhook_url=row[4],
                    email=row[5],
                    email_address=row[6],
                    email_min_severity=row[7],
                    muted=frozenset(row[8] or ()),
                )
            elif kind == "d":
                done.setdefault(key, set()).add(row[4])
            else:
                seen.add(key)
        return Lookup(prefs, done, seen)

    async def record_many(
        self,
        conn: psycopg.AsyncConnection[Any],
        rows: Sequence[tuple[str, Channel, str | None, str | None, str]],
    ) -> None:
        """Several delivery records ``(message_id, channel, user_id, target, key)`` in one
        statement."""
        doc = [{"m": m, "c": c, "u": u, "t": t, "k": k} for m, c, u, t, k in rows]
        await conn.execute(self._record_many, (orjson.dumps(doc).decode(),))

    async def store_in_app_many(
        self,
        conn: psycopg.AsyncConnection[Any],
        rows: Sequence[tuple[str, str | None, Notification, Any, str]],
    ) -> None:
        """In-app rows ``(message_id, user_id, note, payload, in-app idempotency key)``
        and their delivery records, in one statement (each once per event)."""
        if not rows:
            return
        doc = [
            {"m": mid, "u": user, "e": note.event_type, "t": note.title, "b": note.body,
             "v": note.severity, "p": note.template, "j": payload, "k": key}
            for mid, user, note, payload, key in rows
        ]
        await conn.execute(self._in_app_many, (orjson.dumps(doc).decode(),))


@dataclass(frozen=True, slots=True)
class Lookup:
    """What :meth:`NotificationStore.lookup_many` found for a chunk of events."""

    prefs: dict[str, Preferences]
    done: dict[str, set[str]]
    seen: set[str]


#: How long a delivery record waits for others to share its statement (seconds), and how
#: many records make a statement go at once. The record's send is already done: the wait
#: only delays its in-app row and ack, never a webhook. At a paced 1,000 events/s 20 ms
#: instead of 5 took a third off the records' server CPU (each statement is a commit); a
#: faster flow fills a statement sooner, so its messages are not held for the whole wait.
_RECORD_LINGER = 0.02
_RECORDS_ENOUGH = 32
#: Reads wait too, shorter: a read comes before its webhook. A read statement costs the
#: server about as much as 30 ids more (some 300 µs), and at a paced rate a chunk holds the
#: few deliveries of one wakeup, so a read waits up to 5 ms for other chunks: through the
#: whole pipeline at 1,000 events/s that took about a third off the reads' server CPU.
_READ_LINGER = 0.005
_IDS_ENOUGH = 32

#: A chunk's users and message ids; a delivery record (message id, channel, user, target,
#: idempotency key).
_Ask = tuple[Sequence[str], Sequence[str]]
_Record = tuple[str, Channel, str | None, str | None, str]


class _Session:
    """One autocommit connection used by one statement at a time, opened on first use and
    again after a failure."""

    def __init__(self, url: Callable[[], str], name: str) -> None:
        self._url = url
        self._name = name
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def connection(self) -> psycopg.AsyncConnection[Any]:
        if self._conn is None or self._conn.closed or self._conn.broken:
            self._conn = await psycopg.AsyncConnection.connect(
                self._url(),
                autocommit=True,
                connect_timeout=10,
                prepare_threshold=None,
                application_name=self._name,
            )
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None


class DeliveryLog:
    """Reads before the sends and records right after them, outside the handler's
    transaction (module doc).

    Two autocommit connections, so reads of new chunks never wait behind record writes:
    one for the reads, one for the records. Reads asked while one is in flight, or within a
    few milliseconds of the first, go together (one round trip for many chunks); likewise
    records that arrive while one is being written, or soon after the first, share a statement,
    so many sends in flight cost one round trip, and each :meth:`record` returns once its
    row is committed. A record that cannot be written is a
    :class:`~consumers.errors.Retry`: the send is then repeated with the same idempotency
    key, which the receiver uses to drop the copy.
    """

    def __init__(
        self,
        store: NotificationStore,
        database_url: Callable[[], str],
        inbox_table: str,
        consumer: str,
    ) -> None:
        # A callable, read on first use: building the worker's spec (which `dlq list` does
        # for its queue names) needs no database URL.
        self._store = store
        self._reads = _Session(database_url, "cdc-worker:notifications-reads")
        self._writes = _Session(database_url, "cdc-worker:notifications-deliveries")
        self._lookup = store.lookup_statement(inbox_table, consumer)
        self._asks: Gathering[_Ask, Lookup] = Gathering(
            self._read, _READ_LINGER, _IDS_ENOUGH, weight=lambda ask: len(ask[1])
        )
        # Sends finish a few per millisecond: a short wait lets one statement (one commit)
        # carry many records instead of about one each.
        self._records: Gathering[_Record, None] = Gathering(
            self._write, _RECORD_LINGER, _RECORDS_ENOUGH
        )

    async def lookup(self, user_ids: Sequence[str], message_ids: Sequence[str]) -> Lookup:
        """Preferences, delivered channels and inbox state of a chunk (a failure: Retry).

        Chunks that ask while a read is in flight, or within a few milliseconds of the
        first, are read together (the answer covers them all; each caller looks up its own
        ids in it), so many small chunks cost one round trip, not one each."""
        return await self._asks((user_ids, message_ids))

    async def _read(self, asks: list[_Ask]) -> Lookup:
        users = sorted({user for ask in asks for user in ask[0]})
        mids = [mid for ask in asks for mid in ask[1]]
        try:
            return await self._store.lookup_many(
                await self._reads.connection(), users, mids, self._lookup
            )
        except psycopg.Error as exc:
            await self._reads.close()
            raise Retry(f"reading preferences failed ({type(exc).__name__}): {exc}") from exc

    async def record(
        self, message_id: str, channel: Channel, user_id: str | None, target: str, key: str
    ) -> None:
        """Commit the record of ``channel`` having delivered ``message_id``."""
        await self._records((message_id, channel, user_id, target, key))

    async def _write(self, rows: list[_Record]) -> None:
        try:
            await self._store.record_many(await self._writes.connection(), rows)
        except psycopg.Error as exc:
            await self._writes.close()
            raise Retry(
                f"delivered but its record failed ({type(exc).__name__}); the next "
                "attempt sends it again with the same idempotency key"
            ) from exc

    async def close(self) -> None:
        """Close the connections (the worker's ``on_close``)."""
        await self._reads.close()
        await self._writes.close()
