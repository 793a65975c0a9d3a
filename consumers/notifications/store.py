"""Notifications' tables: in-app notifications, per-user preferences, the delivery log.

Contract: ``notifications`` holds one in-app row per event (``message_id`` primary key);
``notification_deliveries`` one row per ``(message_id, channel)`` actually delivered, so a
later attempt of the same event skips what is recorded; and ``notification_preferences`` the
per-user choices (absent row = the configured defaults). The in-app row and its record are
written in the handler's transaction. A webhook or email record is written by
:class:`DeliveryLog` on a connection of its own and committed right after the send: it
stands even when the handler's transaction rolls back (say the email failed after the
webhook went out), so the retry does not POST the webhook again.
"""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import psycopg
from psycopg import sql

from consumers.errors import Retry
from consumers.notifications.templates import Channel, Notification, Preferences
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
        s = sql.Identifier(check_name(schema, "CDC_NOTIFICATIONS_SCHEMA"))

        def q(text: str) -> str:
            return render(sql.SQL(text).format(s=s))

        self._prefs = q(
            "SELECT in_app, webhook, webhook_url, email, email_address, email_min_severity,"
            " muted FROM {s}.notification_preferences WHERE user_id = %s"
        )
        self._delivered = q(
            "SELECT channel FROM {s}.notification_deliveries WHERE message_id = %s"
        )
        self._insert_note = q(
            "INSERT INTO {s}.notifications (message_id, user_id, event_type, title, body,"
            " severity, template, payload) VALUES (%s, %s, %s, %s, %s, %s, %s, %s::jsonb)"
            " ON CONFLICT DO NOTHING"
        )
        self._record = q(
            "INSERT INTO {s}.notification_deliveries (message_id, channel, user_id, target,"
            " idempotency_key) VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
        )

    async def lookup(
        self, conn: psycopg.AsyncConnection[Any], user_id: str | None, message_id: str
    ) -> tuple[Preferences | None, set[str]]:
        """The user's stored preferences (None: use the defaults) and the channels already
        delivered for ``message_id``, in one round trip."""
        async with conn.pipeline():
            prefs_cur = await conn.execute(self._prefs, (user_id,)) if user_id else None
            done_cur = await conn.execute(self._delivered, (message_id,))
        done = {str(row[0]) for row in await done_cur.fetchall()}
        row = await prefs_cur.fetchone() if prefs_cur is not None else None
        if row is None:
            return None, done
        return (
            Preferences(
                in_app=row[0],
                webhook=row[1],
                webhook_url=row[2],
                email=row[3],
                email_address=row[4],
                email_min_severity=row[5],
                muted=frozenset(row[6] or ()),
            ),
            done,
        )

    async def store_in_app(
        self,
        conn: psycopg.AsyncConnection[Any],
        message_id: str,
        user_id: str | None,
        note: Notification,
        payload: Any,
    ) -> None:
        """The in-app notification row (once per event)."""
        await conn.execute(
            self._insert_note,
            (message_id, user_id, note.event_type, note.title, note.body, note.severity,
             note.template, orjson.dumps(payload).decode()),
        )

    async def record_delivery(
        self,
        conn: psycopg.AsyncConnection[Any],
        message_id: str,
        channel: Channel,
        user_id: str | None,
        target: str | None,
        key: str,
    ) -> None:
        """Remember that ``channel`` delivered ``message_id`` (skipped on later attempts)."""
        await conn.execute(self._record, (message_id, channel, user_id, target, key))


class DeliveryLog:
    """Records external deliveries at once, outside the handler's transaction (module doc).

    One autocommit connection, opened on first use and again after a failure. A record that
    cannot be written is a :class:`~consumers.errors.Retry`: the send is then repeated with
    the same idempotency key, which the receiver uses to drop the copy.
    """

    def __init__(self, store: NotificationStore, database_url: str) -> None:
        self._store = store
        self._url = database_url
        self._conn: psycopg.AsyncConnection[Any] | None = None

    async def record(
        self, message_id: str, channel: Channel, user_id: str | None, target: str, key: str
    ) -> None:
        """Commit the record of ``channel`` having delivered ``message_id``."""
        try:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=10,
                    prepare_threshold=None,
                    application_name="cdc-worker:notifications-deliveries",
                )
            await self._store.record_delivery(
                self._conn, message_id, channel, user_id, target, key
            )
        except psycopg.Error as exc:
            await self.close()
            raise Retry(
                f"{channel} delivered but its record failed ({type(exc).__name__}); the "
                "next attempt sends it again with the same idempotency key"
            ) from exc

    async def close(self) -> None:
        """Close the connection (the worker's ``on_close``)."""
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                await self._conn.close()
            self._conn = None
