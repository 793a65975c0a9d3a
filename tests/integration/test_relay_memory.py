"""The relay's memory with a large event: its resident set may grow by at most twice the
payload while it carries one, measured on a real relay process (VmHWM, the kernel's peak
RSS, reset just before the insert) with a 50 MB payload.

Two copies are the floor: libpq reads the whole CopyData message into its input buffer and
hands out a malloc'd copy of it; the relay decodes, routes and frames the payload as views
of that copy (it used to make four: 4.0x). Beyond the two copies only the frames'
bookkeeping is allowed (a view and a header per 128 KiB body frame, ~0.2% of the body)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

PAYLOAD_MB = 50


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def test_a_50_mb_event_raises_the_relay_rss_by_at_most_twice_its_size(env):
    env.setup()
    relay = env.relay()
    relay.wait_streaming()
    # Warm up with ordinary events so the baseline is the relay at work, not at rest.
    env.insert([env.event("memory.small", {"n": i}) for i in range(50)])
    env.drain(50, quiet=0.5, timeout=60)
    time.sleep(1.0)
    Path(f"/proc/{relay.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS from now on
    baseline = _status(relay.pid)["VmRSS"]

    blob = "x" * (PAYLOAD_MB * 2**20)
    event = env.event("memory.large", {"blob": blob})
    env.insert([event])
    [msg] = env.drain(1, quiet=1.0, timeout=120)
    size = len(msg.body)
    assert size >= PAYLOAD_MB * 2**20
    time.sleep(0.5)
    status = _status(relay.pid)
    growth = status["VmHWM"] - baseline
    print(
        f"relay RSS baseline {baseline / 2**20:.1f} MiB, peak {status['VmHWM'] / 2**20:.1f} MiB,"
        f" growth {growth / 2**20:.1f} MiB = {growth / size:.2f}x the {size / 2**20:.1f} MiB"
        f" payload; after {status['VmRSS'] / 2**20:.1f} MiB"
    )
    assert growth <= 2 * size + size // 100, f"peak grew {growth / size:.3f}x the payload"
