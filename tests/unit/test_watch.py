"""`cdc status --watch`'s loop (cdc.shell.watch): a stop signal ends it promptly, whatever the
probe is doing, and the signal handlers are put back. Real signals to this process."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from cdc.shell import watch


def _interrupt() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_stop_signals_set_a_flag_and_restore_the_handlers():
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with watch.StopSignals() as stop:
            os.kill(os.getpid(), sig)
            stop.sleep(5)  # returns at the signal, not after 5 s
            assert stop.requested
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_ctrl_c_during_a_probe_that_never_ends_returns_at_once():
    never = threading.Event()
    shown: list[object] = []

    def probe() -> str:
        threading.Timer(0.2, _interrupt).start()
        never.wait()  # a server that never answers (the daemon thread is abandoned)
        return "late"

    start = time.monotonic()
    watch.repeat(probe, shown.append, interval=1.0, bound=60.0)
    assert time.monotonic() - start < 0.2 + 10 * watch.POLL
    assert shown == []
    never.set()


def test_ctrl_c_between_rounds_ends_the_pause():
    shown: list[object] = []

    def show(screen: object) -> None:
        shown.append(screen)
        if len(shown) == 2:
            _interrupt()

    start = time.monotonic()
    watch.repeat(lambda: len(shown), show, interval=0.3, bound=60.0)
    # two screens, one pause of 0.3 s, then the second pause ends at the signal
    assert shown == [0, 1]
    assert time.monotonic() - start < 0.3 + 10 * watch.POLL


def test_a_probe_over_its_bound_is_abandoned_and_the_next_round_runs():
    calls: list[int] = []
    release = threading.Event()

    def probe() -> int:
        calls.append(1)
        if len(calls) == 1:
            release.wait()  # the first round hangs past the bound
        return len(calls)

    shown: list[int | None] = []

    def show(screen: int | None) -> None:
        shown.append(screen)
        if len(shown) == 2:
            _interrupt()

    watch.repeat(probe, show, interval=0.0, bound=0.3)
    release.set()
    assert shown == [None, 2]


def test_the_probes_error_is_raised_in_the_caller():
    def probe() -> None:
        raise ValueError("no such slot")

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(ValueError, match="no such slot"):
        watch.repeat(probe, lambda _: None, interval=0.1, bound=5.0)
    assert signal.getsignal(signal.SIGINT) is before
