"""Failover of PostgreSQL under load: the primary dies (``pg_ctl stop -m immediate``), the
physical standby is promoted, the relay reconnects through its two-host URL
(``target_session_attrs=read-write``).

Writers commit one-row transactions through the same two-host URL the whole time,
reconnecting after the failover. Just before the failover the standby is starved of WAL
(its connection to the primary goes through a proxy that holds the primary's bytes), so
the old primary commits rows that the standby never receives: PostgreSQL's own loss under
asynchronous replication, counted and reported, not blamed on the relay. The truth is the
promoted database: every row in it must arrive on the broker (lost 0). On 18 nothing may
arrive that the promoted database does not have (the primary's
``synchronized_standby_slots`` keeps the relay behind the standby); on 15 such events are
counted.

- PostgreSQL 18: the slot is a failover slot; once ``cdc status --standby-url`` says the
  standby's copy is ready (synced and persistent), the failover happens and the relay
  continues from the synchronized copy with no recovery step. Measured: time from the end
  of the promotion to the relay streaming again, duplicates.
- PostgreSQL 15: no failover slots, the promoted standby has no slot. The relay must refuse
  to stream (exit 5, naming `cdc recover`), `cdc recover` publishes the missing window, and
  the relay then streams from the new slot.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import psycopg
import pytest
from harness.common import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WRITERS = 2
#: Pause between a writer's commits: steady load that leaves the 2-core machine some room.
WRITE_PAUSE = 0.004
EXIT_SLOT_LOST = 5
#: Rows committed on the primary while its standby is starved, just before the failover.
UNSHIPPED = 20
#: The relay's checkpoint period in the PostgreSQL 15 test, and how far the proven
#: checkpoint may trail the failover: a candidate is proven one interval after it is taken,
#: plus slack for a loaded machine. Older rows must never be published twice by recovery.
CHECKPOINT_INTERVAL = 1.0
PROOF_LAG = 2 * CHECKPOINT_INTERVAL + 5.0


class Writers:
    """Threads inserting one outbox row per transaction, reconnecting after any error.

    ``committed`` holds the ids whose COMMIT returned, with the monotonic time it did; a
    commit that raised may or may not have happened, so it is only in ``uncertain``.
    """

    def __init__(self, env: Any) -> None:
        self.env = env
        self.committed: dict[str, float] = {}
        self.uncertain: set[str] = set()
        self.reconnects = 0
        self._halt = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(w,), daemon=True, name=f"writer-{w}")
            for w in range(WRITERS)
        ]

    def start(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        for t in self._threads:
            t.join(30)

    def count(self) -> int:
        with self._lock:
            return len(self.committed)

    def _run(self, writer: int) -> None:
        from harness.rows import insert_rows, new_event

        conn: psycopg.Connection[Any] | None = None
        while not self._halt.is_set():
            row = new_event("failover.written", {"w": writer})
            try:
                if conn is None or conn.closed or conn.broken:
                    conn = psycopg.connect(self.env.db_url, connect_timeout=3)
                with conn.cursor() as cur:
                    insert_rows(cur, self.env.table, [row])
                conn.commit()
            except psycopg.Error:
                with self._lock:
                    self.uncertain.add(row["id"])
                    self.reconnects += 1
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
                continue
            with self._lock:
                self.committed[row["id"]] = time.monotonic()
            time.sleep(WRITE_PAUSE)
        if conn is not None:
            conn.close()


def wait_ready_copy(env: Any, cluster: Any) -> float:
    """Poll `cdc status --standby-url` until the standby's copy is ready; seconds it took."""
    t0 = time.monotonic()
    last: dict[str, Any] = {}

    def ready() -> bool:
        # A running-xacts record now, so the slot (and its copy) move without a 15 s wait.
        cluster.primary.sql("SELECT pg_log_standby_snapshot()")
        res = env.cdc("status", "--json", "--standby-url", cluster.standby.url(env.dbname))
        assert res.returncode == 0, res.stderr
        last.update(json.loads(res.stdout)["failover"]["standbys"][0])
        return bool(last["ready"])

    env.wait_for(ready, 120, lambda: f"a ready copy on the standby (last: {last})", interval=1)
    return time.monotonic() - t0


class StateWatch(threading.Thread):
    """The relay's /healthz state every 20 ms, as (monotonic time, state) transitions."""

    def __init__(self, relay: Any) -> None:
        super().__init__(daemon=True, name="state-watch")
        self.relay = relay
        self.changes: list[tuple[float, str | None]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            state = self.relay.state()
            if not self.changes or self.changes[-1][1] != state:
                self.changes.append((time.monotonic(), state))
            time.sleep(0.02)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def back_streaming(self, after: float) -> float | None:
        """When the relay streamed again after having stopped streaming past ``after``."""
        left = False
        for t, state in self.changes:
            if t >= after and state != "streaming":
                left = True
            elif left and state == "streaming":
                return t
        return None


def fail_over(cluster: Any, writers: Writers) -> dict[str, float]:
    """Starve the standby of WAL for a moment (asynchronous replication lagging), stop the
    primary immediately under load, promote the standby; times."""
    load_before = writers.count()
    time.sleep(2.0)
    assert writers.count() > load_before, "writers are not committing before the failover"
    cluster.proxy.hold()
    held_at = writers.count()
    # Commits the standby will never receive: PostgreSQL's own loss at the failover.
    wait_for(lambda: writers.count() >= held_at + UNSHIPPED, 30, "commits while held")
    t_stop = time.monotonic()
    cluster.primary.stop("immediate")
    cluster.standby.promote()  # returns once the promoted server accepts writes
    return {"t_stop": t_stop, "t_promoted": time.monotonic()}


def settle(env: Any, writers: Writers, seconds: float = 3.0) -> None:
    """More commits on the new primary, then stop the writers."""
    after = writers.count()
    env.wait_for(lambda: writers.count() > after + 50, 60, "writes on the promoted primary")
    time.sleep(seconds)
    writers.stop()


def check_outcome(
    env: Any, writers: Writers, t_promoted: float, strays_allowed: bool = False
) -> tuple[dict[str, int], set[str]]:
    """Lost 0 against the promoted database; counts of the rest. A stray is an event
    published for a row that the promoted database does not have (the old primary committed
    it, the standby never got it); ``synchronized_standby_slots`` rules them out on 17+."""
    env.conn.close()  # the cached connection was to the old primary
    truth = env.fetch_rows()
    want = set(truth)
    got: set[str] = set()
    read = [0]

    def all_arrived(msgs: list[Any]) -> bool:
        got.update(m.message_id for m in msgs[read[0]:])
        read[0] = len(msgs)
        return want <= got

    msgs = env.drain(stop=all_arrived, quiet=2.0, timeout=120)
    strays = {m.message_id for m in msgs} - want
    # Before the promotion only the old primary took writes.
    unshipped = {i for i, t in writers.committed.items() if t < t_promoted} - want
    assert strays <= unshipped | writers.uncertain, "published rows nobody committed"
    assert strays_allowed or not strays, (
        f"{len(strays)} published rows the promoted database does not have"
    )
    lost = want - got
    assert not lost, f"{len(lost)} of {len(want)} rows lost, e.g. {sorted(lost)[:5]}"
    copies = Counter(m.message_id for m in msgs)
    dups = {i: n for i, n in copies.items() if n > 1}
    for m in msgs:
        if m.message_id in strays:
            continue
        # Messages published from a snapshot by `cdc recover` carry no commit LSN/time.
        if "commit_lsn" in m.headers:
            env.check_message(m, truth[m.message_id])
        else:
            assert m.body == truth[m.message_id].payload_text.encode(), m.message_id
    figures = {
        "rows_in_promoted_db": len(truth),
        "messages": len(msgs),
        "duplicated_ids": len(dups),
        "duplicate_copies": sum(dups.values()) - len(dups),
        "committed_on_old_primary_never_shipped": len(unshipped),
        "published_then_lost_by_failover": len(strays),
        "uncertain_commits": len(writers.uncertain),
        "uncertain_present": len(writers.uncertain & want),
    }
    # Every row whose commit returned after the promotion is there, of course.
    assert {i for i, t in writers.committed.items() if t >= t_promoted} <= want
    return figures, set(dups)


def streaming_under_load(
    pg_clusters: Any, version: int, **relay_settings: Any
) -> tuple[Any, Any, Any, Writers]:
    """A primary and standby of ``version``, a relay streaming from it, writers committing."""
    cluster = pg_clusters.start(version, proxy=True)
    env = pg_clusters.env(cluster)
    env.setup()
    relay = env.relay(metrics=True, **relay_settings)
    relay.wait_streaming(60)
    return cluster, env, relay, Writers(env).start()


def test_pg18_relay_continues_from_the_synchronized_slot(pg_clusters):
    cluster, env, relay, writers = streaming_under_load(pg_clusters, 18)
    watch = StateWatch(relay)
    try:
        ready_s = wait_ready_copy(env, cluster)
        watch.start()
        times = fail_over(cluster, writers)
        env.wait_for(lambda: watch.back_streaming(times["t_stop"]), 60,
                     lambda: f"the relay streaming again ({watch.changes})\n{relay.tail()}")
        settle(env, writers)
    finally:
        writers.stop()
        watch.stop()
    back = watch.back_streaming(times["t_stop"])
    assert back is not None
    figures, _ = check_outcome(env, writers, times["t_promoted"])
    assert figures["committed_on_old_primary_never_shipped"] >= UNSHIPPED, figures
    assert relay.alive(), relay.tail()
    slot = cluster.standby.sql(
        "SELECT failover, synced, temporary FROM pg_replication_slots WHERE slot_name = %s",
        (env.slot,),
    )
    assert slot == [(True, True, False)], slot  # the same synced slot, not a new one
    assert relay.sigterm() == 0
    # pg_ctl notices the promotion by polling (100 ms), so the relay may stream first.
    promoted_to_streaming = max(0.0, back - times["t_promoted"])
    assert back - times["t_stop"] < 30
    print(
        f"PG18 failover: copy ready after {ready_s:.1f}s; primary stop -> promoted "
        f"{times['t_promoted'] - times['t_stop']:.2f}s; primary stop -> relay streaming "
        f"{back - times['t_stop']:.2f}s; promoted -> streaming {promoted_to_streaming:.2f}s; "
        f"{figures}"
    )


def test_pg15_relay_refuses_the_missing_slot_and_recover_fills_the_gap(pg_clusters):
    cluster, env, relay, writers = streaming_under_load(
        pg_clusters, 15, checkpoint_interval=CHECKPOINT_INTERVAL
    )
    try:
        # Long enough that rows older than the checkpoint's lag exist at the failover.
        time.sleep(2 * PROOF_LAG)
        times = fail_over(cluster, writers)
        code = relay.wait_exit(60)
        assert code == EXIT_SLOT_LOST, relay.tail()
        assert "cdc recover" in relay.log(), relay.tail()
        assert env.cdc("relay").returncode == EXIT_SLOT_LOST  # a restart refuses again
        recovered = env.cdc("recover", timeout=180)
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        t_recovered = time.monotonic()
        again = env.relay(metrics=True, checkpoint_interval=CHECKPOINT_INTERVAL)
        again.wait_streaming(60)
        settle(env, writers)
    finally:
        writers.stop()
    # No synchronized_standby_slots before 17: the relay may have published rows that the
    # standby never received (counted, not a relay loss).
    figures, dup_ids = check_outcome(env, writers, times["t_promoted"], strays_allowed=True)
    assert figures["committed_on_old_primary_never_shipped"] >= UNSHIPPED, figures
    # Duplicates are what the checkpoint could not prove published: rows committed in the
    # last checkpoint intervals before the failover, never older ones.
    ages = [times["t_stop"] - writers.committed[i] for i in dup_ids if i in writers.committed]
    too_old = [a for a in ages if a > PROOF_LAG]
    assert not too_old, f"{len(too_old)} duplicates committed up to {max(too_old):.1f}s earlier"
    assert again.sigterm() == 0
    print(
        f"PG15 failover: stop->promoted {times['t_promoted'] - times['t_stop']:.2f}s; recover "
        f"done {t_recovered - times['t_promoted']:.1f}s after promotion; oldest duplicate "
        f"committed {max(ages, default=0):.1f}s before the failover; {figures}"
    )
