"""Concurrent writers of outbox transactions (commits, rollbacks, two-phase) for the relay
tests, and what they committed.
"""

from __future__ import annotations

import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from harness.common import format_lsn
from harness.postgres import pg_connect
from harness.rabbitmq import Msg
from harness.rows import insert_rows, new_event

if TYPE_CHECKING:  # harness.relay imports this module
    from harness.relay import Env


@dataclass
class TxnRecord:
    txn: str
    kind: str
    writer: int
    kept: list[str] = field(default_factory=list)  # ids that must arrive, in insert order
    dropped: list[str] = field(default_factory=list)  # ids that must never arrive


class Workload:
    """Writer threads inserting outbox rows in transactions of various kinds.

    Kinds: ``commit``, ``rollback``, ``savepoint`` (a middle part rolled back to a savepoint,
    the rest committed), ``2pc_commit`` and ``2pc_rollback`` (PREPARE TRANSACTION then
    COMMIT/ROLLBACK PREPARED). Each payload carries ``txn``, ``seq`` (insert order within the
    transaction) and ``w`` (writer). A writer stops after ``events_per_writer`` committed
    events, when ``stop()`` is called, or on error (kept in ``errors``).
    """

    def __init__(
        self,
        env: Env,
        *,
        writers: int = 4,
        events_per_writer: int = 1000,
        max_txn: int = 100,
        kinds: dict[str, float] | None = None,
        rate_per_writer: float | None = None,
        seed: int | None = None,
        event_type: Callable[[random.Random], str] | None = None,
        extra_columns: Callable[[], dict[str, Any]] | None = None,
        pad: tuple[int, int] = (10, 120),
    ) -> None:
        self.env = env
        self.writers = writers
        self.events_per_writer = events_per_writer
        self.max_txn = max_txn
        self.kinds = kinds or {"commit": 1.0}
        self.rate = rate_per_writer
        self.seed = random.randrange(1 << 30) if seed is None else seed
        self.event_type = event_type or (
            lambda rng: rng.choice(["device.started", "user.updated", "app.installed"])
        )
        self.extra_columns = extra_columns
        self.pad = pad
        self.txns: list[TxnRecord] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- results ----------------------------------------------------------------------------

    @property
    def committed_ids(self) -> set[str]:
        with self._lock:
            return {i for t in self.txns for i in t.kept}

    @property
    def dropped_ids(self) -> set[str]:
        with self._lock:
            return {i for t in self.txns for i in t.dropped}

    @property
    def committed_count(self) -> int:
        with self._lock:
            return sum(len(t.kept) for t in self.txns)

    def kinds_seen(self) -> dict[str, int]:
        with self._lock:
            out: dict[str, int] = {}
            for t in self.txns:
                out[t.kind] = out.get(t.kind, 0) + 1
            return out

    def check_commit_order(self, msgs: list[Msg]) -> int:
        """Assert stream order = commit order, one transaction at a time, rows in insert order.

        ``commit_lsn`` never decreases along the stream; the messages of one commit LSN form
        one contiguous run that is exactly the kept rows of one transaction, in ``seq`` order;
        and every transaction forms exactly one run. Returns the number of transactions.
        """
        with self._lock:
            kept = {t.txn: t.kept for t in self.txns if t.kept}
        runs: list[tuple[int, list[Msg]]] = []
        for m in msgs:
            lsn = m.commit_lsn
            if runs and lsn < runs[-1][0]:
                raise AssertionError(
                    f"commit_lsn went backwards: {format_lsn(lsn)} after "
                    f"{format_lsn(runs[-1][0])} (message {m.message_id})"
                )
            if runs and runs[-1][0] == lsn:
                runs[-1][1].append(m)
            else:
                runs.append((lsn, [m]))
        seen: dict[str, int] = {}
        for lsn, run in runs:
            txns = {m.json["txn"] for m in run}
            assert len(txns) == 1, f"commit_lsn {format_lsn(lsn)} shared by transactions {txns}"
            txn = txns.pop()
            assert txn not in seen, (
                f"transaction {txn} split/interleaved: commit_lsn {format_lsn(seen[txn])} "
                f"and {format_lsn(lsn)}"
            )
            seen[txn] = lsn
            seqs = [m.json["seq"] for m in run]
            assert seqs == sorted(seqs), f"order inside {txn} not kept: {seqs}"
            assert [m.message_id for m in run] == kept[txn], (
                f"transaction {txn}: arrived {len(run)} rows, committed {len(kept[txn])}"
            )
        assert set(seen) == set(kept), f"transactions missing: {sorted(set(kept) - set(seen))}"
        return len(runs)

    # -- control ----------------------------------------------------------------------------

    def start(self) -> Workload:
        for w in range(self.writers):
            t = threading.Thread(target=self._writer, args=(w,), daemon=True, name=f"writer-{w}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        self._stop.set()
        if self.errors:
            raise AssertionError(f"writer failed: {self.errors[0]!r}") from self.errors[0]
        assert not alive, f"writers still running after {timeout}s: {alive}"

    def done(self) -> bool:
        return all(not t.is_alive() for t in self._threads)

    # -- one writer -------------------------------------------------------------------------

    def _size(self, rng: random.Random) -> int:
        if rng.random() < 0.5:
            return rng.randint(1, min(20, self.max_txn))
        return rng.randint(1, self.max_txn)

    def _rows(
        self, rng: random.Random, txn: str, w: int, kind: str, n: int
    ) -> list[dict[str, Any]]:
        rows = []
        for seq in range(n):
            payload = {
                "txn": txn,
                "seq": seq,
                "w": w,
                "kind": kind,
                "pad": secrets.token_hex(rng.randint(*self.pad) // 2),
            }
            extra = self.extra_columns() if self.extra_columns else {}
            rows.append(new_event(self.event_type(rng), payload, aggregate_id=f"{txn}", **extra))
        return rows

    def _writer(self, w: int) -> None:
        rng = random.Random(self.seed * 100 + w)
        kinds, weights = zip(*self.kinds.items(), strict=True)
        committed = 0
        n = 0
        t0 = time.monotonic()
        try:
            with pg_connect(self.env.db_url) as conn, conn.cursor() as cur:
                # the first transactions cycle through every kind, then random ones
                while committed < self.events_per_writer and not self._stop.is_set():
                    kind = kinds[n] if n < len(kinds) else rng.choices(kinds, weights)[0]
                    txn = f"{self.env.tag}-w{w}-{n}"
                    n += 1
                    size = min(self._size(rng), max(1, self.events_per_writer - committed))
                    rows = self._rows(rng, txn, w, kind, size)
                    rec = TxnRecord(txn, kind, w)
                    self._run_txn(cur, kind, txn, rows, rec, rng)
                    with self._lock:
                        self.txns.append(rec)
                    committed += len(rec.kept)
                    if self.rate:
                        ahead = committed / self.rate - (time.monotonic() - t0)
                        if ahead > 0:
                            self._stop.wait(ahead)
        except BaseException as exc:
            self.errors.append(exc)

    def _run_txn(
        self,
        cur: psycopg.Cursor[Any],
        kind: str,
        txn: str,
        rows: list[dict[str, Any]],
        rec: TxnRecord,
        rng: random.Random,
    ) -> None:
        table = self.env.table
        ids = [r["id"] for r in rows]
        cur.execute("BEGIN")
        if kind == "savepoint" and len(rows) >= 2:
            a = rng.randint(0, len(rows) - 1)
            b = rng.randint(a + 1, len(rows))
            insert_rows(cur, table, rows[:a])
            cur.execute("SAVEPOINT sp")
            insert_rows(cur, table, rows[a:b])
            cur.execute("ROLLBACK TO SAVEPOINT sp")
            insert_rows(cur, table, rows[b:])
            cur.execute("COMMIT")
            rec.kept, rec.dropped = ids[:a] + ids[b:], ids[a:b]
            return
        insert_rows(cur, table, rows)
        if kind in ("commit", "savepoint"):
            cur.execute("COMMIT")
            rec.kept = ids
        elif kind == "rollback":
            cur.execute("ROLLBACK")
            rec.dropped = ids
        elif kind in ("2pc_commit", "2pc_rollback"):
            gid = f"{self.env.gid_prefix}{txn}"
            cur.execute(sql.SQL("PREPARE TRANSACTION {}").format(sql.Literal(gid)))
            if kind == "2pc_commit":
                cur.execute(sql.SQL("COMMIT PREPARED {}").format(sql.Literal(gid)))
                rec.kept = ids
            else:
                cur.execute(sql.SQL("ROLLBACK PREPARED {}").format(sql.Literal(gid)))
                rec.dropped = ids
        else:
            raise ValueError(kind)
