"""Worker settings from the environment, flags over variables, and worker loading."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from consumers.cli import EXIT_USAGE, main
from consumers.config import ConsumerSettings
from consumers.errors import ConfigError
from consumers.loader import BUILTIN, load, module_path

BASE = {"CDC_DATABASE_URL": "postgresql://u:secret@h/db", "CDC_AMQP_URL": "amqp://g:pw@h/"}


@pytest.fixture
def environ(monkeypatch):
    for key in list(__import__("os").environ):
        if key.startswith("CDC_"):
            monkeypatch.delenv(key)
    for key, value in BASE.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_defaults(environ):
    s = ConsumerSettings()
    assert s.worker_retry_delays == (5.0, 10.0, 20.0)
    assert s.worker_max_attempts == 4
    assert s.worker_queue_type == "quorum"
    assert s.worker_metrics_port == 9191
    assert s.worker_inbox_table == "public.consumer_inbox"
    assert s.exchange == "cloudphone.events"
    assert s.worker_prefetch >= s.worker_batch_size
    assert s.worker_batch_linger_max == 0.01


@pytest.mark.parametrize(
    ("text", "delays"),
    [
        ("0.2,0.4,0.8", (0.2, 0.4, 0.8)),
        ("5", (5.0,)),
        (" 1 , 2 ", (1.0, 2.0)),
        ("[1,2]", (1.0, 2.0)),
    ],
)
def test_retry_delays_from_the_environment(environ, text, delays):
    environ.setenv("CDC_WORKER_RETRY_DELAYS", text)
    assert ConsumerSettings().worker_retry_delays == delays


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CDC_WORKER_RETRY_DELAYS", ""),
        ("CDC_WORKER_RETRY_DELAYS", "1,x"),
        ("CDC_WORKER_RETRY_DELAYS", "0,1"),
        ("CDC_WORKER_QUEUE_TYPE", "stream"),
        ("CDC_WORKER_PREFETCH", "0"),
        ("CDC_WORKER_MAX_ATTEMPTS", "0"),
        ("CDC_WORKER_INBOX_TABLE", "inbox; drop table x"),
        ("CDC_WORKER_QUEUE_PREFIX", "bad prefix"),
        ("CDC_EXCHANGE", ""),
        ("CDC_WORKER_RECONNECT_MAX_DELAY", "0.1"),
    ],
)
def test_bad_values_are_refused(environ, var, value):
    environ.setenv(var, value)
    with pytest.raises(ValidationError):
        ConsumerSettings()


def test_inbox_table_gets_a_schema(environ):
    environ.setenv("CDC_WORKER_INBOX_TABLE", "inbox")
    assert ConsumerSettings().worker_inbox_table == "public.inbox"


def test_builtin_names_map_to_module_paths():
    assert module_path("billing") == BUILTIN["billing"] == "consumers.billing.worker"
    assert module_path("notifications") == "consumers.notifications.worker"
    assert module_path("tests.workers.ledger") == "tests.workers.ledger"


def test_loading_a_worker_module():
    worker = load("tests.workers.ledger")
    assert issubclass(worker.settings, ConsumerSettings)
    with pytest.raises(ConfigError, match="not importable"):
        load("no_such_package.worker")
    with pytest.raises(ConfigError, match="SETTINGS"):
        load("consumers.config")  # importable, but not a worker


def test_cli_exit_codes_for_config_errors(environ, capsys):
    assert main(["no_such_package.worker"]) == EXIT_USAGE
    assert "not importable" in capsys.readouterr().err
    environ.setenv("CDC_WORKER_QUEUE_TYPE", "stream")
    assert main(["tests.workers.ledger"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "CDC_WORKER_QUEUE_TYPE" in err
    # flags override the environment, and a bad flag value is a config error too
    environ.delenv("CDC_WORKER_QUEUE_TYPE")
    assert main(["tests.workers.ledger", "--worker-prefetch", "0"]) == EXIT_USAGE
    assert "CDC_WORKER_PREFETCH" in capsys.readouterr().err
    assert main(["tests.workers.ledger", "--retry-delays", "1,-2"]) == EXIT_USAGE
    assert "CDC_WORKER_RETRY_DELAYS" in capsys.readouterr().err


def test_flags_override_the_environment(environ):
    import argparse

    from cdc.service.cli import read_settings
    from consumers.config import add_worker_flags

    environ.setenv("CDC_WORKER_PREFETCH", "10")
    environ.setenv("CDC_WORKER_QUEUE_TYPE", "classic")
    parser = argparse.ArgumentParser()
    add_worker_flags(parser, ConsumerSettings)
    args = parser.parse_args(["--prefetch", "77", "--worker-retry-delays", "1,2"])
    s = read_settings(ConsumerSettings, args)
    assert s is not None
    assert s.worker_prefetch == 77
    assert s.worker_retry_delays == (1.0, 2.0)
    assert s.worker_queue_type == "classic"  # no flag: the environment holds


def test_secrets_never_in_config_errors(environ, capsys):
    environ.setenv("CDC_WORKER_PREFETCH", "-1")
    assert main(["tests.workers.ledger"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "secret" not in err and "pw@" not in err


def test_dlq_usage_errors(environ, capsys):
    assert main(["dlq", "purge", "some.queue", "--yes"]) == EXIT_USAGE
    assert "not a parking queue" in capsys.readouterr().err
    assert main(["dlq", "purge", "x.parked"]) == EXIT_USAGE
    assert "--yes" in capsys.readouterr().err
    assert main(["dlq", "replay", "x.parked"]) == EXIT_USAGE
    assert "--id" in capsys.readouterr().err
