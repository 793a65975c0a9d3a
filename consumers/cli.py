"""Command line of the workers: ``cdc-worker WORKER [flags]`` (or ``python -m consumers``)
and ``cdc-worker dlq ...``.

``WORKER`` is ``billing``, ``notifications`` or a dotted module path (see ``loader``). The
settings model is the worker's ``SETTINGS``; every field is a ``--flag`` overriding its
``CDC_*`` variable (``DESCRIPTION`` below is what ``--help`` prints).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from cdc.service.cli import (
    EXIT_DRAIN_TIMEOUT,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    add_version,
    on_stop_signals,
    read_settings,
    run_fast,
)
from cdc.service.logs import configure
from consumers.config import AMQP, DB, ConsumerSettings, add_worker_flags
from consumers.errors import ConfigError, ConsumerError, Refused

log = logging.getLogger("consumers")

DESCRIPTION = """\
Run a consumer worker: it takes events from its queues, runs each handler in a
PostgreSQL transaction with an inbox against duplicates, retries and parks
what fails. Start several processes of one worker to share the work.

Every setting is a CDC_* environment variable that its flag overrides.
Exit codes: 0 stopped by SIGTERM/SIGINT after draining, 1 unexpected error,
2 invalid configuration or usage, 3 a server refuses the configuration (login,
database, vhost, privilege, TLS certificate), 4 the shutdown drain timed out
(what was not acked is redelivered).
"""


def _top_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        usage=f"{prog} WORKER [flags]\n       {prog} dlq {{list,show,replay,purge}} ...",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version(parser)
    parser.add_argument(
        "worker",
        metavar="WORKER",
        help="billing, notifications, or the dotted path of a module that exposes SETTINGS "
        "and build(settings); `dlq` manages the parking queues (`dlq --help`)",
    )
    flags = parser.add_argument_group(
        f"flags of every worker (a worker may add its own: {prog} WORKER --help)"
    )
    add_worker_flags(flags, ConsumerSettings)
    return parser


def _run_worker(argv: Sequence[str], prog: str) -> int:
    from consumers.loader import build_spec, load

    name = argv[0]
    try:
        worker = load(name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(
        prog=f"{prog} {name}",
        description=f"Run the {name} worker ({worker.module}) until SIGTERM/SIGINT. "
        "Every flag overrides its CDC_* variable.",
    )
    add_version(parser)
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing: check the worker's database role and broker login "
        "(exit 0, or 3 listing what is missing)",
    )
    add_worker_flags(parser.add_argument_group("settings"), worker.settings)
    args = parser.parse_args(argv[1:])
    settings = read_settings(worker.settings, args, (DB, AMQP), f"worker {name}")
    if settings is None:
        return EXIT_USAGE
    configure(settings.worker_log_format, settings.worker_log_level)
    try:
        spec = build_spec(worker, settings)
    except (ConfigError, ValidationError, ValueError) as exc:
        log.error("worker %s cannot start: %s", name, exc)
        return EXIT_USAGE
    if args.check:
        from consumers import check

        return asyncio.run(check.run(settings, spec))
    return run_fast(lambda: _serve(settings, spec))


async def _serve(settings: ConsumerSettings, spec: Any) -> int:
    from cdc.service.metrics_server import serve
    from consumers.runtime.metrics import WorkerMetrics
    from consumers.runtime.runner import Runner

    metrics = WorkerMetrics(spec.name)
    runner = Runner(settings, spec, metrics)
    stopped = asyncio.Event()

    def on_signal() -> None:
        if not stopped.is_set():
            log.info("stop requested: finishing in-flight messages")
        stopped.set()
        runner.stop()

    on_stop_signals(on_signal)
    server = None
    if settings.worker_metrics_port:
        try:
            server = await serve(
                settings.worker_metrics_host, settings.worker_metrics_port, metrics, runner.health
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on port {settings.worker_metrics_port}: {exc.strerror}. "
                "Replicas on one host need distinct CDC_WORKER_METRICS_PORT values (0 disables)"
            ) from exc
    task = asyncio.create_task(runner.run())
    code = EXIT_OK
    try:
        waiter = asyncio.create_task(stopped.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), settings.worker_shutdown_timeout)
            except TimeoutError:
                log.error(
                    "in-flight messages not finished within %ss; they will be redelivered",
                    settings.worker_shutdown_timeout,
                )
                task.cancel()
                code = EXIT_DRAIN_TIMEOUT
        if task.done() and not task.cancelled():
            task.result()  # an unexpected error propagates
    finally:
        if not task.done():
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.close()
        if server is not None:
            server.close()
    return code


def main(argv: Sequence[str] | None = None, prog: str = "cdc-worker") -> int:
    """Entry point of ``cdc-worker`` and ``python -m consumers``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        parser = _top_parser(prog)
        if not argv:
            parser.print_usage(sys.stderr)
            print(f"{prog}: error: name a WORKER (or dlq); see {prog} --help", file=sys.stderr)
            return EXIT_USAGE
        if argv[0] in ("-h", "--help", "--version"):
            parser.parse_args(argv[:1])  # prints and exits 0
        parser.error(f"name a WORKER before the flags: {prog} WORKER {' '.join(argv)}")
    try:
        if argv[0] == "dlq":
            from consumers.dlq import main as dlq_main

            return dlq_main(argv[1:], f"{prog} dlq")
        return _run_worker(argv, prog)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except Refused as exc:
        log.error("%s", exc)
        return EXIT_REFUSED
    except ConsumerError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        # Only one-shot commands get here (the relay, the workers and the watch stop on
        # a flag): an interrupted one did not finish, so it must not report success.
        return EXIT_INTERRUPTED
    except Exception:
        log.exception("unexpected error")
        return EXIT_ERROR
