"""The consumers' pure modules (routing, policy, headers, names) load no I/O library."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import consumers

PURE = [
    "consumers.errors",
    "consumers.runtime.topic",
    "consumers.runtime.policy",
    "consumers.runtime.headers",
    "consumers.runtime.names",
    "consumers.runtime.dispatch",
    "consumers.runtime.prefetch",
    "consumers.runtime.acks",
    "consumers.notifications.breaker",
    "consumers.notifications.http1",
]
FORBIDDEN = ["asyncio", "psycopg", "aiormq", "aio_pika", "pamqp", "aiohttp"]


def test_importing_the_pure_modules_loads_no_io_library():
    code = (
        "import sys\n"
        f"import {', '.join(PURE)}\n"
        f"print(','.join(sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(consumers.__file__).resolve().parent.parent,
        timeout=60,
    )
    assert out.stdout.strip() == ""


def test_the_check_would_notice_an_io_import():
    code = "import sys, consumers.runtime.batch\nprint('psycopg' in sys.modules)\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "True"
