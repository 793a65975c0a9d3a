"""The outbox feed: per-connection decoding state between raw pgoutput and routed events.

Pure: feeds each XLogData payload through the pgoutput decoder, keeps the relation cache
(valid for one connection only: the server re-sends Relation messages after a reconnect and
after DDL), tracks the open transaction in the :class:`Watermark`, and turns outbox INSERTs
into :class:`OutboxEvent`/:class:`Malformed` items. Everything else is counted as ignored.
"""

from __future__ import annotations

from collections.abc import Callable

from cdc.core.outbox import Malformed, OutboxColumns, OutboxEvent, route
from cdc.core.watermark import Txn, Watermark
from cdc.errors import ProtocolError
from cdc.wire import pgoutput
from cdc.wire.replication import PG_EPOCH

RoutedEvent = tuple[Txn, OutboxEvent | Malformed]

_IGNORED: dict[type[object], str] = {
    pgoutput.Update: "update",
    pgoutput.Delete: "delete",
    pgoutput.Truncate: "truncate",
    pgoutput.LogicalMessage: "logical_message",
    pgoutput.Origin: "origin",
    pgoutput.TypeMessage: "type",
}


class OutboxFeed:
    """Decode one replication connection's messages into outbox items."""

    def __init__(
        self, schema: str, table: str, watermark: Watermark, ignored: Callable[[str], None]
    ) -> None:
        self._target = (schema, table)
        self._watermark = watermark
        self._ignored = ignored
        self._layouts: dict[int, OutboxColumns] = {}
        self._txn: Txn | None = None
        self._commit_time = PG_EPOCH

    @property
    def in_transaction(self) -> bool:
        """True between a Begin and its Commit."""
        return self._txn is not None

    def handle(self, payload: memoryview, lsn: int) -> RoutedEvent | None:
        """Process one pgoutput message; return the outbox item it produced, if any."""
        msg = pgoutput.decode(payload, lsn=lsn)
        if isinstance(msg, pgoutput.Insert):
            layout = self._layouts.get(msg.relation_oid)
            txn = self._txn
            if layout is None:
                self._ignored("other_table")
                return None
            if txn is None:
                raise ProtocolError("Insert outside a transaction", offset=0, lsn=lsn)
            item = route(layout, msg.new, commit_lsn=txn.commit_lsn, commit_time=self._commit_time)
            self._watermark.add_event(txn)
            return txn, item
        if isinstance(msg, pgoutput.Begin):
            self._txn = self._watermark.begin(msg.final_lsn, msg.commit_time.timestamp())
            self._commit_time = msg.commit_time
        elif isinstance(msg, pgoutput.Commit):
            if self._txn is None:
                raise ProtocolError("Commit without Begin", offset=0, lsn=lsn)
            self._watermark.commit(self._txn, msg.end_lsn)
            self._txn = None
        elif isinstance(msg, pgoutput.Relation):
            if (msg.namespace, msg.name) == self._target:
                self._layouts[msg.oid] = OutboxColumns.of(msg)
            else:
                self._layouts.pop(msg.oid, None)
        elif type(msg) in _IGNORED:
            self._ignored(_IGNORED[type(msg)])
        else:
            # Streaming and two-phase decoding are never requested (see replication.py).
            raise ProtocolError(f"unexpected {type(msg).__name__} message", offset=0, lsn=lsn)
        return None
