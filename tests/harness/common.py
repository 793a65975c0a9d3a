"""Small helpers every service module uses: waiting, ports, LSNs, metrics text, teardown steps.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

LSN_RE = re.compile(r"^([0-9A-F]{1,8})/([0-9A-F]{1,8})$")


SNAPSHOT_RE = re.compile(r"^\d+:\d+:(\d+(,\d+)*)?$")


def parse_lsn(text: str) -> int:
    """``'16/B374D848'`` -> int (tests keep their own copy; they do not trust cdc.core.lsn)."""
    m = LSN_RE.match(text.strip().upper())
    if m is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], Any],
    timeout: float,
    message: str | Callable[[], str] = "condition",
    interval: float = 0.1,
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail with ``message`` at the end."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            text = message() if callable(message) else message
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {text}")
        time.sleep(interval)


def with_overrides(env: dict[str, str], overrides: dict[str, Any]) -> dict[str, str]:
    """``env`` with ``overrides`` applied: ``name=value`` sets ``CDC_NAME``, ``None`` removes it."""
    for key, value in overrides.items():
        name = key if key.startswith("CDC_") else f"CDC_{key.upper()}"
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text format -> {name: [(labels, value), ...]} (enough for our assertions)."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    line_re = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s+(\S+)")
    label_re = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if m is None:
            continue
        labels = dict(label_re.findall(m.group(3) or ""))
        out.setdefault(m.group(1), []).append((labels, float(m.group(4))))
    return out


def metric_sum(text: str, name: str, **labels: str) -> float | None:
    """Sum of the samples of ``name`` whose labels include ``labels``; None if absent."""
    samples = parse_metrics(text).get(name)
    if samples is None:
        return None
    return sum(v for lab, v in samples if all(lab.get(k) == val for k, val in labels.items()))


class Teardown:
    """Runs cleanup steps one after another, collecting failures instead of stopping."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def step(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:
            self.errors.append(f"{what}: {exc!r}")


def run_async_in_thread(coro_fn: Callable[[], Any], timeout: float = 60) -> Any:
    """Run a coroutine function on a fresh loop in a fresh thread (safe from any context)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = asyncio.run(coro_fn())
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    if "error" in result:
        raise result["error"]
    return result.get("value")


# RabbitMQ


def plain(value: Any) -> Any:
    """AMQP table values -> plain Python (bytes decoded as UTF-8 where possible)."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(value)
    if isinstance(value, dict):
        return {str(plain(k)): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
