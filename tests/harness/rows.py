"""Outbox rows for the relay tests: new events, inserting them, a committed row as read back."""

from __future__ import annotations

import datetime as dt
import json
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql


def new_event(
    event_type: str = "test.created",
    payload: Any = None,
    *,
    aggregate_type: str = "device",
    aggregate_id: str | None = None,
    headers: Any = None,
    **extra: Any,
) -> dict[str, Any]:
    """One outbox row as a dict (``payload``/``headers`` are Python values, sent as jsonb)."""
    row: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id if aggregate_id is not None else f"agg-{secrets.token_hex(3)}",
        "event_type": event_type,
        "payload": {"n": secrets.token_hex(4)} if payload is None else payload,
    }
    if headers is not None:
        row["headers"] = headers
    row.update(extra)
    return row


_JSON_COLUMNS = {"payload", "headers"}


class RawJson(str):
    """JSON text to send as is to a jsonb column (other values are ``json.dumps``-ed)."""


def insert_rows(cur: psycopg.Cursor[Any], table: str, rows: list[dict[str, Any]]) -> None:
    """INSERT ``rows`` (dicts; same keys per batch) into ``table`` inside the current txn."""
    if not rows:
        return
    schema, name = table.split(".")
    # Keep the order of rows across groups: insert consecutive runs of the same shape.
    runs: list[tuple[tuple[str, ...], list[dict[str, Any]]]] = []
    for r in rows:
        cols = tuple(r)
        if runs and runs[-1][0] == cols:
            runs[-1][1].append(r)
        else:
            runs.append((cols, [r]))
    for cols, batch in runs:
        placeholders = sql.SQL(", ").join(
            sql.SQL("%s::jsonb") if c in _JSON_COLUMNS else sql.SQL("%s") for c in cols
        )
        query = sql.SQL("INSERT INTO {}.{} ({}) VALUES ({})").format(
            sql.Identifier(schema),
            sql.Identifier(name),
            sql.SQL(", ").join(map(sql.Identifier, cols)),
            placeholders,
        )
        params = [
            tuple(
                (json.dumps(r[c], ensure_ascii=False) if r[c] is not None else None)
                if c in _JSON_COLUMNS and not isinstance(r[c], RawJson)
                else r[c]
                for c in cols
            )
            for r in batch
        ]
        cur.executemany(query, params)


@dataclass(frozen=True, slots=True)
class Row:
    id: str
    aggregate_type: str | None
    aggregate_id: str | None
    event_type: str | None
    payload_text: str | None
    headers: dict[str, Any] | None
    created_at: dt.datetime


def iso(text: Any) -> dt.datetime:
    assert isinstance(text, str), f"expected ISO 8601 text, got {text!r}"
    return dt.datetime.fromisoformat(text)
