"""kill -9 of the relay, over and over, while writers commit: nothing lost, duplicates bounded,
and the slot never confirmed an event the broker did not have.

Three writers commit 7,500 events (transactions of 1..MAX_TXN rows) while the relay is
SIGKILLed at random moments (>= 4 times) and restarted. Meanwhile a sampler reads the slot's
``confirmed_flush_lsn`` and right after it the sink queue's depth (passive declare; the sink
is not consumed until the end). At the end, with every event's ``commit_lsn`` known from its
headers, each sample must satisfy

    #distinct committed events with commit_lsn < confirmed_flush_lsn  <=  queue depth

i.e. the slot never moved past an event the broker had not confirmed (the queue only grows).

Duplicates are attributed to the kill that caused them (messages after the kill whose id was
already in the queue) and each kill is held to a concrete bound:
``MAX_IN_FLIGHT + MAX_TXN + ceil(2 * peak_rate * STATUS_INTERVAL)``, where ``peak_rate`` is
the highest publish rate measured over any status interval of the run (the events the broker
may have confirmed since the last status update; x2 allows for timer and scheduling lag).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import threading
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MAX_IN_FLIGHT = 200
MAX_TXN = 50
STATUS_INTERVAL = 0.5
KILLS = 4
WRITERS = 3
EVENTS_PER_WRITER = 5000


class Sampler(threading.Thread):
    """(time, confirmed_flush_lsn, queue depth read right after it), every ~20 ms."""

    def __init__(self, env) -> None:
        super().__init__(daemon=True, name="sampler")
        self.env = env
        self.samples: list[tuple[float, int, int]] = []
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            with self.env.connect() as conn:
                while not self._halt.is_set():
                    lsn = conn.execute(
                        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots"
                        " WHERE slot_name = %s",
                        (self.env.slot,),
                    ).fetchone()[0]
                    depth = self.env.sink_count()
                    self.samples.append((time.monotonic(), self.env.parse_lsn(lsn), depth))
                    self._halt.wait(0.02)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._halt.set()
        self.join(10)
        if self.error is not None:
            raise AssertionError(f"sampler failed: {self.error!r}") from self.error


def _settled_depth(env) -> int:
    """Queue depth once the broker has finished taking what a dead connection sent."""
    last = env.sink_count()
    while True:
        time.sleep(0.15)
        now = env.sink_count()
        if now == last:
            return now
        last = now


def _peak_rate(samples: list[tuple[float, int, int]], window: float) -> float:
    """Highest (depth growth / time) over any span of at least ``window`` seconds."""
    best = 0.0
    j = 0
    for i in range(len(samples)):
        while j < len(samples) and samples[j][0] - samples[i][0] < window:
            j += 1
        if j == len(samples):
            break
        t0, _, d0 = samples[i]
        t1, _, d1 = samples[j]
        best = max(best, (d1 - d0) / (t1 - t0))
    return best


def test_sigkill_loses_nothing_and_never_confirms_ahead_of_the_broker(env):
    env.setup()
    overrides = {"max_in_flight": MAX_IN_FLIGHT, "status_interval": STATUS_INTERVAL}
    relay = env.relay(**overrides)
    relay.wait_streaming()
    sampler = Sampler(env)
    sampler.start()
    work = env.workload(
        writers=WRITERS,
        events_per_writer=EVENTS_PER_WRITER,
        max_txn=MAX_TXN,
        rate_per_writer=400,
        kinds={"commit": 0.8, "2pc_commit": 0.1, "savepoint": 0.1},
    ).start()

    rng = random.Random()
    depth_at_kill: list[int] = []
    kill_times: list[float] = []
    kills_while_writing = 0
    try:
        while len(depth_at_kill) < KILLS or not work.done():
            if len(depth_at_kill) >= KILLS + 4:
                break
            time.sleep(rng.uniform(0.3, 1.2))  # a random moment of the stream
            relay.sigkill()
            kill_times.append(time.monotonic())
            kills_while_writing += not work.done()
            depth_at_kill.append(_settled_depth(env))
            relay = env.relay(**overrides)
            relay.wait_streaming()
        work.join(timeout=90)
        committed = work.committed_ids
        env.wait_sink_count(len(committed), timeout=90)
        env.wait_for(
            lambda: env.confirmed_flush_lsn() >= env.current_wal_lsn() - 1024 * 1024,
            30,
            "the last status updates",
        )
    finally:
        sampler.stop()
    assert len(depth_at_kill) >= KILLS
    assert kills_while_writing >= 3, f"only {kills_while_writing} kills while writers ran"
    final_depth = _settled_depth(env)
    msgs = env.drain(final_depth, quiet=1.5, timeout=90)
    assert len(msgs) == final_depth
    rows = env.fetch_rows()
    assert set(rows) == committed
    dups = env.check_exactly_once(msgs, rows, allow_duplicates=True)  # 0 lost, contract kept

    # A duplicate is the same event: same commit LSN.
    lsn_of: dict[str, int] = {}
    for m in msgs:
        assert lsn_of.setdefault(m.message_id, m.commit_lsn) == m.commit_lsn, m.message_id

    # The slot never confirmed past an event the broker had not confirmed.
    lsns = sorted(lsn_of.values())
    violations = []
    for t, flushed, depth in sampler.samples:
        confirmed_events = bisect.bisect_left(lsns, flushed)
        if confirmed_events > depth:
            violations.append(
                (
                    round(t - sampler.samples[0][0], 3),
                    env.format_lsn(flushed),
                    confirmed_events,
                    depth,
                )
            )
    assert len(sampler.samples) > 100
    assert not violations, (
        f"{len(violations)} samples where the slot was confirmed past events the broker did "
        f"not have (t, confirmed_flush_lsn, events below it, queue depth): {violations[:10]}"
    )

    # Duplicates per kill, against the bound.
    peak = _peak_rate(sampler.samples, STATUS_INTERVAL)
    bound = MAX_IN_FLIGHT + MAX_TXN + math.ceil(2 * peak * STATUS_INTERVAL)
    seen: set[str] = set()
    per_segment: list[int] = []
    edges = [0, *depth_at_kill, len(msgs)]
    for a, b in itertools.pairwise(edges):
        n = 0
        for m in msgs[a:b]:
            n += m.message_id in seen
            seen.add(m.message_id)
        per_segment.append(n)
    total_dups = sum(c - 1 for c in dups.values())
    print(
        f"{len(committed)} events, {len(depth_at_kill)} kills ({kills_while_writing} while "
        f"writing), {total_dups} duplicates; "
        f"per kill {per_segment[1:]} (before the first kill: {per_segment[0]}); "
        f"peak rate {peak:.0f}/s -> bound per kill {bound}; {len(sampler.samples)} samples"
    )
    assert per_segment[0] == 0, "duplicates before any kill"
    assert sum(per_segment) == total_dups
    for k, n in enumerate(per_segment[1:], 1):
        assert n <= bound, f"kill {k} caused {n} duplicates, bound {bound}"
    assert total_dups <= len(depth_at_kill) * bound
