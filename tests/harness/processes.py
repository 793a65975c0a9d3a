"""Processes the tests start: the relay and worker subprocesses, and long-running tools.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.common import metric_sum, wait_for
from harness.session import REPO


def run_module(
    module: str, args: tuple[str, ...], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m MODULE ARGS`` to completion with ``env`` as its only ``CDC_*`` variables."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


class Relay:
    """One ``python -m cdc relay`` subprocess; stdout+stderr go to ``log_path``."""

    def __init__(
        self,
        env_vars: dict[str, str],
        log_path: Path,
        slot_active: Callable[[], bool],
        name: str = "relay",
        argv: list[str] | None = None,
    ) -> None:
        self.argv = argv or ["-m", "cdc", "relay"]
        self.env_vars = env_vars
        self.log_path = log_path
        self.name = name
        self._slot_active = slot_active
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None
        port_var = "CDC_METRICS_PORT" if self.argv[1] == "cdc" else "CDC_WORKER_METRICS_PORT"
        port = int(env_vars.get(port_var, "0"))
        self.metrics_port = port or None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> Relay:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CDC_")}
        env.update(self.env_vars)
        env["PYTHONUNBUFFERED"] = "1"
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()/wait
        self._log_file.write(f"\n===== start {self.name} {time.time():.3f} =====\n".encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            [sys.executable, *self.argv],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sigkill(self) -> None:
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def sigterm(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the exit and return the exit code (kill -9 and fail on timeout)."""
        assert self.proc is not None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"{self.name} did not exit within {timeout}s of SIGTERM\n{self.tail()}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout}s\n{self.tail()}")

    def stop(self) -> None:
        if self.alive():
            self.sigkill()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # -- observation ------------------------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 60) -> str:
        return f"--- {self.name} log ({self.log_path}) ---\n" + "\n".join(
            self.log().splitlines()[-lines:]
        )

    def _get(self, path: str) -> tuple[int, str] | None:
        if self.metrics_port is None:
            raise AssertionError(f"{self.name} has no metrics port (CDC_METRICS_PORT=0)")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=2
            ) as resp:
                return resp.status, resp.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode("utf-8", "replace")
        except (OSError, urllib.error.URLError):
            return None

    def healthz(self) -> dict[str, Any] | None:
        got = self._get("/healthz")
        if got is None:
            return None
        try:
            return dict(json.loads(got[1]))
        except ValueError:
            return {"state": None, "raw": got[1], "status": got[0]}

    def state(self) -> str | None:
        h = self.healthz()
        return None if h is None else h.get("state")

    def metric(self, name: str, **labels: str) -> float | None:
        """Sum of ``name``'s samples matching ``labels`` from /metrics (None if absent)."""
        return metric_sum(self.metrics(), name, **labels)

    def metrics(self) -> str:
        got = self._get("/metrics")
        assert got is not None and got[0] == 200, f"/metrics not reachable: {got}"
        return got[1]

    def _check_alive(self) -> None:
        if not self.alive():
            pytest.fail(f"{self.name} exited early with code {self.proc.returncode}\n{self.tail()}")  # type: ignore[union-attr]

    def wait_state(self, state: str, timeout: float = 30.0) -> float:
        """Wait for /healthz to report ``state``; returns the seconds it took."""
        t0 = time.monotonic()

        def ok() -> bool:
            self._check_alive()
            return self.state() == state

        wait_for(
            ok,
            timeout,
            lambda: f"{self.name} state {state!r} (now {self.healthz()})\n{self.tail()}",
            interval=0.05,
        )
        return time.monotonic() - t0

    def wait_streaming(self, timeout: float = 30.0) -> float:
        """Wait until the relay streams: /healthz if it has a port, else the slot is active."""
        if self.metrics_port is not None:
            return self.wait_state("streaming", timeout)
        t0 = time.monotonic()

        def ok() -> bool:
            self._check_alive()
            return self._slot_active()

        wait_for(ok, timeout, lambda: f"{self.name} to take the slot\n{self.tail()}", interval=0.05)
        return time.monotonic() - t0


def tool(name: str) -> str | None:
    """An executable on PATH or in the venv (``make install`` unpacks Debian's Prometheus
    tools there: scripts/fetch-prometheus.sh)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


class Daemon:
    """A long-running helper process (Prometheus, an exporter); output to ``log_path``."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.argv, self.log_path, self.env = argv, log_path, env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                env={**os.environ, **(self.env or {})},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- {self.log_path.name} ---\n" + "\n".join(text.splitlines()[-lines:])
