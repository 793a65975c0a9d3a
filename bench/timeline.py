"""Second by second through one pipeline level: commits, effects, the device queue's depth
and the CPU of each process (``python -m bench.pipeline_at --timeline``).

A level's p99 says *that* an effect fell behind, not *why*. The timeline shows whether the
two cores were busy all along (the level asks more CPU than the machine has), which process
got how much of them while its queue grew, and whether everything paused at once (a stall of
the host: every process's CPU falls in the same second while work is waiting).

The arithmetic (:func:`rows`, :func:`per_second`, :func:`render`) is pure; the
:class:`Sampler` reads cumulative CPU seconds and the queue's depth (from a
``bench.observe.DepthSampler``) once a second beside the level.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

#: Column order of the CPU part of the table (groups not sampled are left out).
#: ``bench`` is the benchmark's own process: the writer's client and the instruments.
GROUPS = ("relay", "billing", "notifications", "rabbitmq", "postgres", "receiver", "bench")


@dataclass(frozen=True, slots=True)
class Sample:
    """Cumulative readings at ``at`` (epoch seconds)."""

    at: float
    cpu: Mapping[str, float]  # CPU seconds so far, per process group
    busy: float  # seconds every core of the machine has been busy so far
    depth: int | None  # messages ready in the watched queue (None: not read)


@dataclass(frozen=True, slots=True)
class Row:
    """One interval between two samples: cores used per group and by the whole machine."""

    second: int  # the interval's end, in whole epoch seconds
    cores: dict[str, float | None]
    busy: float
    depth: int | None


def rows(samples: list[Sample]) -> list[Row]:
    """Each consecutive pair of ``samples`` as one :class:`Row`. A group whose reading went
    down (a process that ended, such as a writer's session) has no figure for that interval
    rather than a negative one."""
    out = []
    for before, after in itertools.pairwise(samples):
        span = after.at - before.at
        if span <= 0:
            continue
        cores: dict[str, float | None] = {}
        for name, value in after.cpu.items():
            used = value - before.cpu.get(name, value)
            cores[name] = used / span if used >= 0 else None
        out.append(Row(int(after.at), cores, (after.busy - before.busy) / span, after.depth))
    return out


def per_second(times: Iterable[float]) -> Counter[int]:
    """How many of ``times`` (epoch seconds) fall in each whole second."""
    return Counter(int(t) for t in times)


def render(table: list[Row], start: float, counts: Mapping[str, Counter[int]]) -> str:
    """The timeline as text: per second since ``start``, each count of ``counts`` (commits,
    effects) in the second before the row's sample, the queue depth, the machine's busy
    cores and each group's."""
    groups = [g for g in GROUPS if any(g in r.cores for r in table)]
    head = (["s"] + [f"{name:>8}" for name in counts] + ["   depth", "  busy"]
            + [f"{g[:8]:>8}" for g in groups])
    lines = [" ".join(head)]
    for r in table:
        second = r.second - 1
        cells = [f"{second - int(start):>3}"]
        cells += [f"{c.get(second, 0):>8}" for c in counts.values()]
        cells.append(f"{r.depth:>8}" if r.depth is not None else f"{'-':>8}")
        cells.append(f"{r.busy:>6.2f}")
        for g in groups:
            v = r.cores.get(g)
            cells.append(f"{v:>8.2f}" if v is not None else f"{'-':>8}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


class Sampler:
    """Reads ``cpu()`` (cumulative CPU seconds per group), ``busy()`` and ``depth()`` every
    ``interval`` seconds, from :meth:`start` to :meth:`stop`."""

    def __init__(
        self,
        cpu: Callable[[], dict[str, float]],
        busy: Callable[[], float],
        depth: Callable[[], int | None],
        interval: float = 1.0,
    ) -> None:
        self._cpu, self._busy, self._depth = cpu, busy, depth
        self._interval = interval
        self.samples: list[Sample] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Take the first sample and keep sampling on a task."""
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(Sample(time.time(), self._cpu(), self._busy(), self._depth()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self._interval)

    async def stop(self) -> list[Sample]:
        """End the sampling; the samples taken."""
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.samples
