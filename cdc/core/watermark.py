"""The ack watermark: the one rule that decides how far the slot may move.

The flush LSN reported to PostgreSQL is the largest Commit ``end_lsn`` such that every
event of every transaction up to it has been confirmed by the broker. Confirms may come in
any order. When nothing is in flight and no transaction is open, a keepalive's ``wal_end``
may be taken too, so an idle outbox does not pin WAL.

Pure bookkeeping, no I/O: the reader registers transactions and events as it decodes
them, the publisher confirms events, and anyone may read :attr:`Watermark.flushed`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class Txn:
    """One decoded transaction: open until its Commit, done when nothing is pending."""

    commit_lsn: int
    commit_time: float
    end_lsn: int | None = None
    pending: int = 0


@dataclass(slots=True)
class Watermark:
    """Tracks transactions in commit order and the highest LSN safe to confirm."""

    flushed: int = 0
    _txns: deque[Txn] = field(default_factory=deque)
    _in_flight: int = 0

    @property
    def in_flight(self) -> int:
        """Events registered but not yet confirmed by the broker."""
        return self._in_flight

    def oldest_pending_commit(self) -> float | None:
        """Unix commit time of the oldest transaction not yet flushable (lag in seconds)."""
        return self._txns[0].commit_time if self._txns else None

    def begin(self, commit_lsn: int, commit_time: float) -> Txn:
        """Open a transaction (pgoutput Begin; ``commit_time`` in Unix seconds)."""
        txn = Txn(commit_lsn, commit_time)
        self._txns.append(txn)
        return txn

    def add_event(self, txn: Txn) -> None:
        """Count one more event of ``txn`` that must be confirmed before it can flush."""
        txn.pending += 1
        self._in_flight += 1

    def commit(self, txn: Txn, end_lsn: int) -> None:
        """Close ``txn`` at its Commit ``end_lsn``; it flushes once all its events confirm."""
        txn.end_lsn = end_lsn
        self._advance()

    def confirm(self, txn: Txn) -> None:
        """One event of ``txn`` was confirmed by the broker."""
        if txn.pending <= 0:
            raise ValueError("confirm() without a matching add_event()")
        txn.pending -= 1
        self._in_flight -= 1
        if not txn.pending and txn is self._txns[0]:  # else nothing can flush: no call
            self._advance()

    def keepalive(self, wal_end: int) -> None:
        """Take the server's ``wal_end`` when idle: nothing of ours lies below it unconfirmed."""
        if not self._txns and wal_end > self.flushed:
            self.flushed = wal_end

    def _advance(self) -> None:
        txns = self._txns
        while txns and txns[0].end_lsn is not None and txns[0].pending == 0:
            end = txns.popleft().end_lsn
            if end is not None and end > self.flushed:
                self.flushed = end
