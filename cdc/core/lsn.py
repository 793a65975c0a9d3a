"""PostgreSQL log sequence numbers: ``'16/B374D848'`` text <-> 64-bit integers.

Pure arithmetic, no I/O. Everything inside the relay handles LSNs as ``int``; text appears
only at the edges (SQL, logs, message headers).
"""

from __future__ import annotations

import re

from cdc.errors import ConfigError

_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")

MAX_LSN = (1 << 64) - 1


def parse_lsn(text: str) -> int:
    """Parse ``'X/Y'`` (two hex halves) into an integer LSN."""
    match = _LSN_RE.match(text.strip())
    if match is None:
        raise ConfigError(f"not an LSN: {text!r}; expected two hex numbers like '16/B374D848'")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(lsn: int) -> str:
    """Format an integer LSN the way PostgreSQL prints it (upper-case hex, no padding)."""
    if not 0 <= lsn <= MAX_LSN:
        raise ValueError(f"LSN out of range: {lsn}")
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"
