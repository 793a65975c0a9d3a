"""Durations as operators write them: ``90s``, ``15m``, ``12h``, ``7d`` (also ``1.5h``).

Pure: text in, seconds out, or a :class:`ValueError` whose message shows the accepted form.
"""

from __future__ import annotations

import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FORM = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*")


def parse_duration(text: str) -> float:
    """Seconds in ``text`` (a number and one unit of s, m, h, d, w); must be positive."""
    match = _FORM.fullmatch(text.lower())
    if match is None:
        raise ValueError(
            f"{text!r} is not a duration: write a number and a unit, e.g. 90s, 12h, 7d"
        )
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ValueError(f"{text!r}: the duration must be longer than zero")
    return seconds
