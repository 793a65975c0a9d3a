"""Outbox routing: a decoded INSERT into the outbox table becomes one AMQP message.

Pure: takes pgoutput :class:`Relation`/:class:`Insert` values plus the transaction's commit
LSN and time (or, for a row read from a snapshot, where it was read), and returns either an
:class:`OutboxEvent` (what to publish, in the documented message format) or a
:class:`Malformed` (what to park, with the reason). No row is ever dropped here.

The column layout is looked up by *name* once per Relation message, so columns added by
``ALTER TABLE ... ADD COLUMN`` mid-stream, or legacy columns like ``status``, do not matter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from cdc.core.lsn import format_lsn
from cdc.core.row_headers import safe_headers
from cdc.wire import slots
from cdc.wire.pgoutput import BinaryValue, Relation, TupleData, UnchangedToast

REQUIRED_COLUMNS = ("id", "event_type", "payload")
_OPTIONAL_COLUMNS = ("headers", "aggregate_type", "aggregate_id", "created_at")
_COLUMNS = REQUIRED_COLUMNS + _OPTIONAL_COLUMNS
_MAX_ROUTING_KEY = 255
_MAX_SHORT_STRING = 255  # AMQP shortstr: message_id and type
#: AMQP 0-9-1 field names hold at most 128 bytes; pamqp cuts longer ones, so they are parked.
MAX_HEADER_KEY = 128
_UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)  # AMQP timestamps are unsigned seconds
_INT64 = 1 << 63


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One message to publish: routing key, body and AMQP properties/headers."""

    message_id: str
    routing_key: str
    body: bytes | memoryview  # a view of the decoded message for a large payload (pgoutput.LARGE)
    timestamp: datetime | None
    headers: dict[str, Any]


# Every row's event is built through its slots (cdc.wire.slots says why).
_set_id, _set_key, _set_body, _set_stamp, _set_headers = slots.setters(
    OutboxEvent, "message_id", "routing_key", "body", "timestamp", "headers"
)


@dataclass(frozen=True, slots=True)
class Malformed:
    """A row that cannot become a valid message; it is parked with ``reason``."""

    message_id: str | None
    routing_key: str | None
    reason: str
    row: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class OutboxColumns:
    """Where the outbox columns sit in this relation's tuples (``None`` = absent)."""

    relation: Relation
    index: dict[str, int]
    #: Required columns this relation lacks (its rows are all parked as malformed).
    missing: tuple[str, ...] = field(init=False)
    #: Tuple positions of the outbox columns (required, then optional, in the order of
    #: ``_COLUMNS``); an absent column points one past the relation's last column, where
    #: :func:`route` finds the ``None`` it appends to every row.
    positions: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        # Computed once per Relation message, not once per row.
        missing = tuple(c for c in REQUIRED_COLUMNS if c not in self.index)
        object.__setattr__(self, "missing", missing)
        width = len(self.relation.columns)
        positions = tuple(self.index.get(name, width) for name in _COLUMNS)
        object.__setattr__(self, "positions", positions)

    @classmethod
    def of(cls, relation: Relation) -> OutboxColumns:
        """Compute the layout of ``relation`` from its column names."""
        names = {col.name: i for i, col in enumerate(relation.columns)}
        return cls(relation, {name: names[name] for name in _COLUMNS if name in names})


def _text(value: bytes | memoryview | UnchangedToast | BinaryValue | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes | memoryview):
        return str(value, "utf-8", "replace")
    if isinstance(value, BinaryValue):
        return value.data.hex()
    return None  # unchanged TOAST never occurs in an INSERT


def _row_dict(layout: OutboxColumns, row: TupleData) -> dict[str, str | None]:
    cols = layout.relation.columns
    return {cols[i].name: _text(v) for i, v in enumerate(row) if i < len(cols)}


_FRACTION_PAD = ".000000"


def _created_header(text: str, parsed: datetime) -> str:
    """``parsed.isoformat(timespec="microseconds")``, from ``text`` when that is cheaper."""
    # The relay's session prints timestamptz in UTC, ISO style ("2026-12-06 19:00:00.5+00",
    # the fraction without trailing zeros, none on a whole second): moving that text's
    # pieces costs a fraction of formatting the datetime (which goes through its tzinfo).
    size = len(text)
    if (
        22 <= size <= 29
        and size != 23
        and text[10] == " "
        and text[13] == ":"
        and text[16] == ":"
        and (size == 22 or text[19] == ".")
        and text.endswith("+00")
    ):
        clock = text[11:-3]
        return f"{text[:10]}T{clock}{_FRACTION_PAD[len(clock) - 8 :]}+00:00"
    return parsed.isoformat(timespec="microseconds")


def _header_problem(value: Any) -> str | None:
    """Why AMQP cannot carry this header value as it is, or ``None`` if it can."""
    if isinstance(value, bool | str | float) or value is None:
        return None
    if isinstance(value, int):
        return None if -_INT64 <= value < _INT64 else f"integer {value} is outside int64"
    if isinstance(value, list):
        return next((p for p in map(_header_problem, value) if p is not None), None)
    if isinstance(value, dict):
        for key, item in value.items():
            size = len(key.encode())
            if size > MAX_HEADER_KEY:
                return (
                    f"key {key[:40]!r}... is {size} bytes, over the AMQP field-name limit "
                    f"of {MAX_HEADER_KEY} bytes"
                )
            problem = _header_problem(item)
            if problem is not None:
                return problem
        return None
    return f"{type(value).__name__} values are not supported"


@lru_cache(maxsize=64)
def _commit_headers(commit_lsn: int, commit_time: datetime) -> dict[str, str]:
    # Every row of a transaction shares these: format them once per transaction. The dict
    # is shared by those rows, so it is only ever read.
    return {"commit_lsn": format_lsn(commit_lsn), "commit_time": commit_time.isoformat()}


def route(
    layout: OutboxColumns, row: TupleData, *, commit_lsn: int, commit_time: datetime
) -> OutboxEvent | Malformed:
    """Turn one inserted outbox row into the documented outbox message, or say why it cannot be."""
    return _route(layout, row, _commit_headers(commit_lsn, commit_time))


def route_snapshot(
    layout: OutboxColumns, row: TupleData, *, source: str, snapshot: str
) -> OutboxEvent | Malformed:
    """Like :func:`route` for a row read from a snapshot (backfill or recovery).

    Same body, properties and row headers; instead of the commit headers (a row read from
    the table has no commit position) ``x-cdc-source`` (``backfill`` | ``recovery``) and
    ``x-cdc-snapshot`` (the ``pg_snapshot`` text the row was read in).
    """
    return _route(layout, row, {"x-cdc-source": source, "x-cdc-snapshot": snapshot})


def _raw(
    value: bytes | memoryview | UnchangedToast | BinaryValue | None,
) -> bytes | memoryview | None:
    """A value in text form, else ``None`` (a binary or unchanged-TOAST value is no text)."""
    return value if isinstance(value, bytes | memoryview) else None


def _bad(
    layout: OutboxColumns,
    row: TupleData,
    reason: str,
    message_id: str | None = None,
    key: str | None = None,
) -> Malformed:
    return Malformed(message_id, key, reason, _row_dict(layout, row))


def _route(layout: OutboxColumns, row: TupleData, own: dict[str, str]) -> OutboxEvent | Malformed:
    width = len(layout.relation.columns)
    cells = row
    if len(cells) != width:  # not sent by PostgreSQL, but a row must not index past its columns
        cells = cells[:width] + (None,) * (width - len(cells))
    # One lookup per column instead of a call each: an absent column is the None at `width`.
    values = (*cells, None)
    p_id, p_type, p_payload, p_headers, p_agg_type, p_agg_id, p_created = layout.positions
    raw_id, raw_type, payload = values[p_id], values[p_type], values[p_payload]
    if type(raw_id) is not bytes:
        raw_id = _raw(raw_id)
    if type(raw_type) is not bytes:
        raw_type = _raw(raw_type)
    if type(payload) is not bytes:
        payload = _raw(payload)

    message_id = str(raw_id, "utf-8") if raw_id is not None else None
    if layout.missing:
        missing = ", ".join(layout.missing)
        return _bad(layout, row, f"outbox table lacks required columns: {missing}", message_id)
    if message_id is None:
        return _bad(layout, row, "id is NULL")
    if raw_id is not None and len(raw_id) > _MAX_SHORT_STRING:
        return _bad(layout, row, "id is longer than 255 bytes (AMQP message_id limit)")
    event_type = str(raw_type, "utf-8", "replace") if raw_type is not None else ""
    if not event_type.strip():
        return _bad(layout, row, "event_type is NULL or empty", message_id)
    # A byte of event_type is at most 3 bytes once decoded (U+FFFD): short ones need no check.
    if len(event_type) * 3 > _MAX_ROUTING_KEY and len(event_type.encode()) > _MAX_ROUTING_KEY:
        reason = "event_type is longer than 255 bytes (AMQP routing key limit)"
        return _bad(layout, row, reason, message_id)
    if payload is None:
        return _bad(layout, row, "payload is NULL", message_id, event_type)

    # Text columns arrive as bytes: decoded here without a call each (once per row, it shows).
    agg_type, agg_id, created_raw = values[p_agg_type], values[p_agg_id], values[p_created]
    aggregate_type = (
        str(agg_type, "utf-8", "replace") if type(agg_type) is bytes else _text(agg_type)
    )
    aggregate_id = str(agg_id, "utf-8", "replace") if type(agg_id) is bytes else _text(agg_id)
    created_text = (
        str(created_raw, "utf-8", "replace") if type(created_raw) is bytes else _text(created_raw)
    )
    created_at: datetime | None = None
    created_iso = None
    if created_text is not None:
        try:
            created_at = datetime.fromisoformat(created_text)
        except ValueError:
            pass  # 'infinity' and friends: keep the header text, skip the property
        else:
            if created_at.tzinfo is None:
                created_at = created_at.replace(tzinfo=UTC)
            created_iso = _created_header(created_text, created_at)
    headers: dict[str, Any]
    raw_headers = values[p_headers]
    if raw_headers is not None and type(raw_headers) is not bytes:
        raw_headers = _raw(raw_headers)
    if raw_headers is None:
        headers = {
            "aggregate_type": aggregate_type,
            "aggregate_id": aggregate_id,
            **own,
            "created_at": created_iso or created_text,
        }
    else:
        try:
            # The stdlib keeps big integers exact (orjson turns them into floats), so the
            # int64 check below sees the real value. Headers are small; speed is moot here.
            parsed = json.loads(bytes(raw_headers))
        except ValueError:
            return _bad(layout, row, "headers is not valid JSON", message_id, event_type)
        if not isinstance(parsed, dict):
            return _bad(layout, row, "headers is not a JSON object", message_id, event_type)
        # Keys that would steer delivery (CC, BCC) or spoof broker/runtime headers are
        # renamed before anything else looks at them (a renamed key may be too long).
        parsed = safe_headers(parsed)
        problem = _header_problem(parsed)
        if problem is not None:
            reason = f"headers hold a value AMQP cannot carry: {problem}"
            return _bad(layout, row, reason, message_id, event_type)
        headers = parsed
        headers["aggregate_type"] = aggregate_type
        headers["aggregate_id"] = aggregate_id
        headers.update(own)
        headers["created_at"] = created_iso or created_text
    # Before 1970 the AMQP timestamp cannot carry it: the header keeps the time.
    stamp = created_at if created_at is not None and created_at >= _UNIX_EPOCH else None
    event = slots.new(OutboxEvent)
    _set_id(event, message_id)
    _set_key(event, event_type)
    _set_body(event, payload)
    _set_stamp(event, stamp)
    _set_headers(event, headers)
    return event
