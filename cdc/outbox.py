"""Outbox routing: a decoded INSERT into the outbox table becomes one AMQP message.

Pure: takes pgoutput :class:`Relation`/:class:`Insert` values plus the transaction's commit
LSN and time, and returns either an :class:`OutboxEvent` (what to publish, per BRIEF §2) or
a :class:`Malformed` (what to park, with the reason). No row is ever dropped here.

The column layout is looked up by *name* once per Relation message, so columns added by
``ALTER TABLE ... ADD COLUMN`` mid-stream, or legacy columns like ``status``, do not matter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from cdc.lsn import format_lsn
from cdc.pgoutput import BinaryValue, Relation, TupleData, UnchangedToast
from cdc.row_headers import safe_headers

REQUIRED_COLUMNS = ("id", "event_type", "payload")
_OPTIONAL_COLUMNS = ("aggregate_type", "aggregate_id", "created_at", "headers")
_MAX_ROUTING_KEY = 255
_MAX_SHORT_STRING = 255  # AMQP shortstr: message_id and type
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # AMQP timestamps are unsigned seconds
_INT64 = 1 << 63


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One message to publish: routing key, body and AMQP properties/headers."""

    message_id: str
    routing_key: str
    body: bytes
    timestamp: datetime | None
    headers: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Malformed:
    """A row that cannot become a valid message; it is parked with ``reason``."""

    message_id: str | None
    routing_key: str | None
    reason: str
    row: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the outbox columns sit in this relation's tuples (``None`` = absent)."""

    relation: Relation
    index: dict[str, int]
    #: Required columns this relation lacks (its rows are all parked as malformed).
    missing: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # Computed once per Relation message, not once per row.
        missing = tuple(c for c in REQUIRED_COLUMNS if c not in self.index)
        object.__setattr__(self, "missing", missing)

    @classmethod
    def of(cls, relation: Relation) -> Layout:
        """Compute the layout of ``relation`` from its column names."""
        names = {col.name: i for i, col in enumerate(relation.columns)}
        wanted = REQUIRED_COLUMNS + _OPTIONAL_COLUMNS
        return cls(relation, {name: names[name] for name in wanted if name in names})


def _text(value: bytes | UnchangedToast | BinaryValue | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, BinaryValue):
        return value.data.hex()
    return None  # unchanged TOAST never occurs in an INSERT


def _row_dict(layout: Layout, row: TupleData) -> dict[str, str | None]:
    cols = layout.relation.columns
    return {cols[i].name: _text(v) for i, v in enumerate(row) if i < len(cols)}


def _parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None  # 'infinity' and friends: keep the header text, skip the property
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _amqp_safe(value: Any) -> bool:
    if isinstance(value, bool | str | float) or value is None:
        return True
    if isinstance(value, int):
        return -_INT64 <= value < _INT64
    if isinstance(value, list):
        return all(_amqp_safe(v) for v in value)
    if isinstance(value, dict):
        return all(len(k.encode()) <= 255 and _amqp_safe(v) for k, v in value.items())
    return False


@lru_cache(maxsize=64)
def _commit_headers(commit_lsn: int, commit_time: datetime) -> tuple[str, str]:
    # Every row of a transaction shares these: format them once per transaction.
    return format_lsn(commit_lsn), commit_time.isoformat()


def route(
    layout: Layout, row: TupleData, *, commit_lsn: int, commit_time: datetime
) -> OutboxEvent | Malformed:
    """Turn one inserted outbox row into the message of BRIEF §2, or say why it cannot be."""
    idx = layout.index

    def col(name: str) -> bytes | None:
        i = idx.get(name)
        if i is None or i >= len(row):
            return None
        value = row[i]
        return value if isinstance(value, bytes) else None

    def bad(reason: str, message_id: str | None = None, key: str | None = None) -> Malformed:
        return Malformed(message_id, key, reason, _row_dict(layout, row))

    raw_id, raw_type, payload = col("id"), col("event_type"), col("payload")
    message_id = raw_id.decode() if raw_id is not None else None
    if layout.missing:
        missing = ", ".join(layout.missing)
        return bad(f"outbox table lacks required columns: {missing}", message_id)
    if message_id is None:
        return bad("id is NULL")
    if raw_id is not None and len(raw_id) > _MAX_SHORT_STRING:
        return bad("id is longer than 255 bytes (AMQP message_id limit)")
    event_type = raw_type.decode("utf-8", "replace") if raw_type is not None else ""
    if not event_type.strip():
        return bad("event_type is NULL or empty", message_id)
    if len(event_type.encode()) > _MAX_ROUTING_KEY:
        return bad("event_type is longer than 255 bytes (AMQP routing key limit)", message_id)
    if payload is None:
        return bad("payload is NULL", message_id, event_type)

    headers: dict[str, Any] = {}
    raw_headers = col("headers")
    if raw_headers is not None:
        try:
            # The stdlib keeps big integers exact (orjson turns them into floats), so the
            # int64 check below sees the real value. Headers are small; speed is moot here.
            parsed = json.loads(raw_headers)
        except ValueError:
            return bad("headers is not valid JSON", message_id, event_type)
        if not isinstance(parsed, dict):
            return bad("headers is not a JSON object", message_id, event_type)
        # Keys that would steer delivery (CC, BCC) or spoof broker/runtime headers are
        # renamed before anything else looks at them (a renamed key may be too long).
        parsed = safe_headers(parsed)
        if not _amqp_safe(parsed):
            return bad("headers hold a value AMQP cannot carry", message_id, event_type)
        headers.update(parsed)

    created_text = _text(col("created_at"))
    created_at = _parse_time(created_text)
    headers["aggregate_type"] = _text(col("aggregate_type"))
    headers["aggregate_id"] = _text(col("aggregate_id"))
    headers["commit_lsn"], headers["commit_time"] = _commit_headers(commit_lsn, commit_time)
    created_iso = created_at.isoformat(timespec="microseconds") if created_at else None
    headers["created_at"] = created_iso or created_text
    # Before 1970 the AMQP timestamp cannot carry it: the header keeps the time.
    stamp = created_at if created_at is not None and created_at >= _UNIX_EPOCH else None
    return OutboxEvent(message_id, event_type, payload, stamp, headers)
