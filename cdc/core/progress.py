"""Progress of a long job (a backfill): done/total, rate and ETA, at most every few seconds.

Pure: the caller passes the clock in; :meth:`ProgressReport.update` returns the line to
print when one is due (and always for the last one), else ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds + 0.5))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


@dataclass(slots=True)
class ProgressReport:
    """Lines like ``backfill: 4000/10000 rows (40.0%), 2500 rows/s, ETA 0m02s``."""

    what: str
    total: int
    start_done: int
    started: float
    every: float = 3.0
    _last: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._last = self.started

    def line(self, done: int, now: float) -> str:
        """The progress line for ``done`` rows at ``now``."""
        elapsed = max(now - self.started, 1e-9)
        rate = (done - self.start_done) / elapsed
        shown = min(done, self.total) if self.total else done
        share = f" ({100.0 * shown / self.total:.1f}%)" if self.total else ""
        left = max(self.total - done, 0)
        eta = _clock(left / rate) if rate > 0 else "unknown"
        return f"{self.what}: {shown}/{self.total} rows{share}, {rate:.0f} rows/s, ETA {eta}"

    def update(self, done: int, now: float, *, final: bool = False) -> str | None:
        """The line to show now, if one is due (every ``every`` seconds, and at the end)."""
        if not final and now - self._last < self.every:
            return None
        self._last = now
        return self.line(done, now)
