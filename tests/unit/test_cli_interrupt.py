"""Ctrl-C during a one-shot command exits 130, never 0: the command did not finish."""

from __future__ import annotations

import pytest

import cdc.cli
import consumers.cli
import consumers.dlq
from cdc.service.cli import EXIT_INTERRUPTED, EXIT_OK

URLS = {
    "CDC_DATABASE_URL": "postgresql://postgres@127.0.0.1:1/postgres",
    "CDC_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/",
}


def _interrupt(*_args: object, **_kwargs: object) -> int:
    raise KeyboardInterrupt


@pytest.fixture
def urls(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in URLS.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("argv", [["prune"], ["recover"], ["setup", "--backfill", "pending"]])
def test_an_interrupted_relay_command_exits_130(
    argv: list[str], urls: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cdc.cli, "_dispatch", _interrupt)
    assert cdc.cli.main(argv) == EXIT_INTERRUPTED


def test_the_demo_stopped_by_ctrl_c_exits_0(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cdc.cli, "_dispatch", _interrupt)
    assert cdc.cli.main(["demo"]) == EXIT_OK


def test_an_interrupted_dlq_command_exits_130(urls: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumers.dlq, "main", _interrupt)
    assert consumers.cli.main(["dlq", "list"]) == EXIT_INTERRUPTED
