"""``CDC_WORKER_PREFETCH`` bounds the unacked messages of a whole replica, not of each queue."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time

import pytest
from harness.rabbitmq import unacked_messages
from harness.session import SERVICES

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SERVICES.has_rabbitmqctl(), reason="needs rabbitmqctl"),
]

PREFETCH = 10
QUEUES = 3
PER_QUEUE = 40


def test_a_replica_never_holds_more_unacked_messages_than_its_prefetch(ledger):
    queues = ledger.more_queues(QUEUES)
    # Classic queues: rabbitmqctl reports their unacked count live (a quorum queue's only
    # every few seconds); basic.qos per consumer works the same on both types.
    ledger.start(
        ledger_queues=QUEUES,
        worker_prefetch=PREFETCH,
        worker_batch_size=2,
        worker_queue_type="classic",
    )
    # Slow handlers keep every queue's consumer saturated: before the split, each of the
    # three consumers held up to PREFETCH messages (30 in all).
    for i, key in enumerate(("ledger.entry", "ledger2.entry", "ledger3.entry")):
        ledger.publish(
            [ledger.entry(f"q{i}-{n}", n, sleep_ms=50) for n in range(PER_QUEUE)], routing_key=key
        )
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            # A loaded machine or a broker restart by another test may fail one reading.
            with contextlib.suppress(subprocess.SubprocessError):
                seen.append(unacked_messages(queues))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        ledger.wait_rows(QUEUES * PER_QUEUE, timeout=120)
    finally:
        done.set()
        sampler.join(70)
    busy = [n for n in seen if n > 0]
    assert len(busy) >= 3, f"too few samples while busy: {seen}"
    assert max(seen) <= PREFETCH, f"unacked over the prefetch of {PREFETCH}: {max(seen)} ({seen})"
    assert max(seen) >= PREFETCH // 2, f"the limit was never approached: {seen}"
    print(f"unacked samples while busy: {len(busy)}, max {max(seen)} (prefetch {PREFETCH})")
    assert sorted(r[1] for r in ledger.rows()) == sorted(
        f"q{i}-{n}" for i in range(QUEUES) for n in range(PER_QUEUE)
    )


def test_a_prefetch_smaller_than_the_queue_count_is_refused(ledger):
    ledger.more_queues(QUEUES)
    w = ledger.start(wait=False, ledger_queues=QUEUES, worker_prefetch=QUEUES - 1)
    assert w.wait_exit(60) == 2
    assert "CDC_WORKER_PREFETCH=2" in w.log()
