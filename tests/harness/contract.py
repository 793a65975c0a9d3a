"""The relay's message contract (docs/contract.md) as assertions over messages and rows."""

from __future__ import annotations

import datetime as dt
import json

from harness.common import LSN_RE, SNAPSHOT_RE
from harness.rabbitmq import Msg
from harness.rows import Row, iso


class Contract:
    """Checks messages published to ``exchange`` by relays started after ``t0``."""

    def __init__(self, exchange: str, t0: dt.datetime) -> None:
        self.exchange = exchange
        self.t0 = t0

    def check_message(self, msg: Msg, row: Row) -> None:
        """Assert one message is exactly what docs/contract.md says for ``row``."""
        where = f"message for row {row.id}"
        assert msg.exchange == self.exchange, where
        assert msg.routing_key == row.event_type, where
        assert msg.message_id == row.id, where
        assert msg.type == row.event_type, where
        assert msg.content_type == "application/json", where
        assert msg.delivery_mode == 2, where
        # body: the payload exactly as PostgreSQL prints it
        assert row.payload_text is not None
        assert msg.body == row.payload_text.encode("utf-8"), where
        assert json.loads(msg.body) == json.loads(row.payload_text), where
        # timestamp = created_at in whole seconds
        assert msg.timestamp is not None, f"{where}: no timestamp"
        ts = msg.timestamp if msg.timestamp.tzinfo else msg.timestamp.replace(tzinfo=dt.UTC)
        created = row.created_at.timestamp()
        assert int(ts.timestamp()) in (int(created), round(created)), (where, ts, row.created_at)
        h = msg.headers
        assert h.get("aggregate_type") == row.aggregate_type, (where, h)
        if row.aggregate_id is None:
            assert h.get("aggregate_id") in (None, ""), (where, h)
        else:
            assert h.get("aggregate_id") == row.aggregate_id, (where, h)
        if "x-cdc-source" in h:
            # Read from a snapshot (backfill or recovery): no commit position, the snapshot.
            assert h["x-cdc-source"] in ("backfill", "recovery"), (where, h)
            assert SNAPSHOT_RE.match(str(h.get("x-cdc-snapshot"))), (where, h)
            assert "commit_lsn" not in h and "commit_time" not in h, (where, h)
        else:
            assert LSN_RE.match(str(h.get("commit_lsn"))), (where, h)
            commit_time = iso(h.get("commit_time"))
            assert commit_time.utcoffset() == dt.timedelta(0), (where, h["commit_time"])
            now = dt.datetime.now(dt.UTC)
            soon = now + dt.timedelta(minutes=1)
            assert self.t0 - dt.timedelta(minutes=1) <= commit_time <= soon, where
        created_h = iso(h.get("created_at"))
        if created_h.tzinfo is not None:
            assert created_h == row.created_at, (where, h["created_at"], row.created_at)
        else:
            assert created_h in (
                row.created_at.astimezone(dt.UTC).replace(tzinfo=None),
                row.created_at.astimezone().replace(tzinfo=None),
            ), (where, h["created_at"], row.created_at)
        if isinstance(row.headers, dict):
            relay_keys = {
                "aggregate_type",
                "aggregate_id",
                "commit_lsn",
                "commit_time",
                "created_at",
            }
            for key, value in row.headers.items():
                assert key in h, f"{where}: row header {key!r} missing from {h}"
                if key not in relay_keys and isinstance(value, str):
                    assert h[key] == value, (where, key, h[key], value)

    def check_exactly_once(
        self, msgs: list[Msg], rows: dict[str, Row], allow_duplicates: bool = False
    ) -> dict[str, int]:
        """Every row arrived (once, unless duplicates allowed), nothing else arrived, and
        every message matches the contract. Returns {id: copies} for duplicated ids."""
        copies: dict[str, int] = {}
        for m in msgs:
            assert m.message_id in rows, f"unexpected message {m.message_id}: {m.body[:200]!r}"
            copies[m.message_id] = copies.get(m.message_id, 0) + 1
        missing = set(rows) - set(copies)
        assert not missing, f"{len(missing)} of {len(rows)} events lost, e.g. {sorted(missing)[:5]}"
        dups = {k: v for k, v in copies.items() if v > 1}
        if not allow_duplicates:
            assert not dups, f"{len(dups)} duplicated events, e.g. {list(dups.items())[:5]}"
        for m in msgs:
            self.check_message(m, rows[m.message_id])  # type: ignore[index]
        return dups
