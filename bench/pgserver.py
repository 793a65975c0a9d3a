"""The benchmark's own PostgreSQL server: logical WAL, durable commits, removed at the end.

The relay needs ``wal_level = logical``, and a machine's own server is often ``replica`` and
is not ours to reconfigure. So unless ``BENCH_PG_URL`` names a server, ``python -m bench``
runs one of its own from the newest local PostgreSQL binaries (``/usr/lib/postgresql/*/bin``,
as the ``postgres`` unix user when run as root, since the server refuses root) on a free
port, in a directory of its own under ``/tmp``, and stops and deletes it when the run ends.
Its settings are the server defaults (``fsync`` and ``synchronous_commit`` on, as in
production) plus what the relay and the workers need.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

_OS_USER = "postgres"
#: On top of the defaults: logical decoding and slots for the relay (one per scenario),
#: connections for the workers' pools, shared buffers that keep a scenario's tables in memory.
SETTINGS = {
    "wal_level": "logical",
    "max_wal_senders": "20",
    "max_replication_slots": "20",
    "max_connections": "200",
    "shared_buffers": "256MB",
    "log_min_messages": "warning",
}


def binaries() -> Path:
    """The newest local PostgreSQL's ``bin`` directory (Debian layout)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    usable = [p for p in found if (p / "pg_ctl").exists()]
    if not usable:
        raise RuntimeError(
            "no PostgreSQL binaries in /usr/lib/postgresql/*/bin; install the server package "
            "or set BENCH_PG_URL to a server with wal_level=logical"
        )
    return usable[-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(argv: Sequence[str]) -> None:
    command = list(argv)
    if os.geteuid() == 0:
        command = ["runuser", "-u", _OS_USER, "--", *command]
    res = subprocess.run(command, capture_output=True, text=True, timeout=180,
                         stdin=subprocess.DEVNULL, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: {res.stderr.strip()}")


@contextlib.contextmanager
def own_server() -> Iterator[str]:
    """Start a throwaway server; yield its admin URL; stop it and delete its data."""
    bin_dir = binaries()
    base = Path(tempfile.mkdtemp(prefix="cdc_benchpg_"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam(_OS_USER)
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data = base / "data"
    port = _free_port()
    options = " ".join(f"-c {k}={v}" for k, v in SETTINGS.items())
    try:
        _run([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
              "--encoding=UTF8"])
        _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "server.log"),
              "-w", "-t", "90", "-o",
              f"-p {port} -k {base} -c listen_addresses=127.0.0.1 {options}", "start"])
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        with contextlib.suppress(Exception):
            _run([str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60",
                  "stop"])
        shutil.rmtree(base, ignore_errors=True)
