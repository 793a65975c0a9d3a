"""Run a probe again and again until SIGINT or SIGTERM: the loop of `cdc status --watch`.

Ctrl-C must end the watch whatever a round is doing, and a KeyboardInterrupt raised in the
middle of a round can be lost: ``asyncio.run`` turns SIGINT into a cancellation that the AMQP
client may absorb (the round then ends normally), and the interpreter drops an exception
raised in a weakref callback or ``__del__`` ("Exception ignored in"). So while watching,
SIGINT and SIGTERM only set a flag; each round's probe runs in a daemon thread, and the main
thread looks at the flag at least every :data:`POLL` seconds, while a round runs and between
rounds. A round that takes longer than its bound is abandoned (its thread ends on its own
timeouts, and never holds up the exit).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, wait
from types import FrameType, TracebackType
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds between two looks at the stop flag: how late a stop signal may be noticed.
POLL = 0.1
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """While entered (in the main thread), SIGINT and SIGTERM set :attr:`requested`.

    The handler only sets a flag: it may run between any two bytecodes of the main thread,
    even while that thread holds a lock, so it must take none (a ``threading.Event`` would).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for sig in _SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = True

    def sleep(self, seconds: float) -> None:
        """Pause ``seconds``, or less if a stop signal comes."""
        deadline = time.monotonic() + seconds
        while not self.requested and (left := deadline - time.monotonic()) > 0:
            time.sleep(min(POLL, left))


def _start(probe: Callable[[], T]) -> Future[T]:
    """Run ``probe`` in a daemon thread; its result or its error lands in the future."""
    outcome: Future[T] = Future()

    def run() -> None:
        try:
            outcome.set_result(probe())
        except BaseException as exc:  # handed to the main thread, which raises it
            outcome.set_exception(exc)

    threading.Thread(target=run, name="cdc-watch-probe", daemon=True).start()
    return outcome


def repeat(
    probe: Callable[[], T], show: Callable[[T | None], None], interval: float, bound: float
) -> None:
    """``show(probe())`` every ``interval`` seconds until SIGINT or SIGTERM, then return.

    ``show(None)`` when a probe has not finished after ``bound`` seconds (it is abandoned);
    an error the probe raises is raised here. Returns within about :data:`POLL` seconds of
    a stop signal, whatever the probe is doing.
    """
    with StopSignals() as stop:
        while not stop.requested:
            outcome = _start(probe)
            deadline = time.monotonic() + bound
            while not stop.requested and not outcome.done() and time.monotonic() < deadline:
                wait([outcome], timeout=POLL)
            if stop.requested:
                return
            show(outcome.result() if outcome.done() else None)
            stop.sleep(interval)
