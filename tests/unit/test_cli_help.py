"""Help and version of every command (``cdc``, ``cdc-worker``/``python -m consumers``,
``dlq``): plain text without docstring markup, only the flags the command uses, and
``--version`` from the installed package's metadata everywhere."""

from __future__ import annotations

import re
from importlib.metadata import version

import pytest

from cdc import cli as cdc_cli
from cdc.config import RelaySettings
from consumers import cli as worker_cli
from consumers.config import ConsumerSettings

pytestmark = pytest.mark.usefixtures("no_cdc_env")

MARKUP = re.compile(r"``|:(class|func|mod|attr|meth|data):")
CDC_COMMANDS = ["setup", "relay", "status", "recover", "prune", "demo"]
DLQ_COMMANDS = ["list", "show", "replay", "purge"]


def _out(capsys, main, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0, capsys.readouterr()
    return capsys.readouterr().out


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", text))


def _setting_flags(model) -> set[str]:
    return {f"--{f.replace('_', '-')}" for f in model.model_fields}


@pytest.mark.parametrize("argv", [[], *[[c] for c in CDC_COMMANDS]])
def test_cdc_help_is_plain_text(capsys, argv):
    text = _out(capsys, cdc_cli.main, [*argv, "--help"])
    assert not MARKUP.search(text), text
    assert "usage: cdc" in text


def test_each_cdc_command_lists_only_its_flags(capsys):
    every = _setting_flags(RelaySettings)
    shown = {c: _flags(_out(capsys, cdc_cli.main, [c, "--help"])) & every for c in CDC_COMMANDS}
    assert shown["relay"] == every  # the relay reads every setting
    assert shown["status"] == {
        "--database-url", "--amqp-url", "--slot-name", "--publication-name", "--outbox-table",
        "--parking-queue", "--metrics-port", "--log-format", "--log-level",
    }
    # setup publishes only with --backfill: the broker and the publish window, no relay knobs
    assert {"--amqp-url", "--max-in-flight"} <= shown["setup"]
    assert "--status-interval" not in shown["setup"] and "--metrics-port" not in shown["setup"]
    assert "--amqp-url" in shown["recover"] and "--prune-older-than" not in shown["recover"]
    assert "--amqp-url" not in shown["prune"] and "--prune-older-than" in shown["prune"]
    assert "--slot-name" not in shown["demo"] and "--metrics-port" not in shown["demo"]
    status = _flags(_out(capsys, cdc_cli.main, ["status", "--help"]))
    assert {"--json", "--watch", "--relay-metrics", "--worker-metrics"} <= status
    assert "--check" not in status and "--rate" not in status
    # the command-table and the flags agree: what a command needs, it shows
    for name, command in cdc_cli.COMMANDS.items():
        assert set(command.needs) <= set(command.uses), name


def test_workers_help_shows_the_flags(capsys):
    top = _out(capsys, worker_cli.main, ["--help"])
    assert not MARKUP.search(top), top
    assert _setting_flags(ConsumerSettings) <= _flags(top)
    assert "--prefetch" in top and "dlq" in top
    billing = _out(capsys, worker_cli.main, ["billing", "--help"])
    assert not MARKUP.search(billing)
    assert {"--billing-schema", "--prefetch", "--check", "--database-url"} <= _flags(billing)
    dlq_show = _flags(_out(capsys, worker_cli.main, ["dlq", "show", "--help"]))
    assert "--amqp-url" in dlq_show and "--database-url" not in dlq_show
    assert "--prefetch" not in dlq_show
    dlq_list = _flags(_out(capsys, worker_cli.main, ["dlq", "list", "--help"]))
    assert {"--amqp-url", "--worker-queue-prefix", "--worker"} <= dlq_list
    assert "--database-url" not in dlq_list
    replay = _flags(_out(capsys, worker_cli.main, ["dlq", "replay", "--help"]))
    assert "--worker-confirm-timeout" in replay and "--database-url" not in replay


@pytest.mark.parametrize(
    ("main", "argv"),
    [
        (cdc_cli.main, []),
        *[(cdc_cli.main, [c]) for c in CDC_COMMANDS],
        (worker_cli.main, []),
        (worker_cli.main, ["billing"]),
        (worker_cli.main, ["dlq"]),
        *[(worker_cli.main, ["dlq", c]) for c in DLQ_COMMANDS],
    ],
)
def test_version_everywhere(capsys, main, argv):
    text = _out(capsys, main, [*argv, "--version"])
    assert text.strip().endswith(f"(outbox-cdc) {version('outbox-cdc')}"), text


def test_no_worker_or_flags_first_is_a_usage_error(capsys):
    assert worker_cli.main([]) == 2
    assert "name a WORKER" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        worker_cli.main(["--prefetch", "5"])
    assert info.value.code == 2
    assert "name a WORKER before the flags" in capsys.readouterr().err
