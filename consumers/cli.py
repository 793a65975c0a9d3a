"""Command line: ``python -m consumers <worker> [flags]`` and ``python -m consumers dlq ...``.

``<worker>`` is ``billing``, ``notifications`` or a dotted module path (see ``loader``). The
settings model is the worker's ``SETTINGS``; every field is a ``--flag`` overriding its
``CDC_*`` variable. Exit codes: 0 stopped by SIGTERM/SIGINT after draining, 1 unexpected
error, 2 configuration or usage error, 3 a server refuses the configuration (login,
database, vhost, privilege, TLS certificate: ``cdc/refusals.py``), 4 the shutdown drain
timed out (what was not acked is redelivered to another replica or on the next start).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError

from cdc.errors import ConfigError as SettingsProblem
from cdc.logs import configure
from cdc.settings_base import load
from consumers.config import ConsumerSettings
from consumers.errors import ConfigError, ConsumerError, Refused

log = logging.getLogger("consumers")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_DRAIN_TIMEOUT = 4

S = TypeVar("S", bound=ConsumerSettings)


def add_setting_flags(parser: argparse.ArgumentParser, model: type[ConsumerSettings]) -> None:
    """One ``--name`` flag per settings field (``CDC_NAME`` is the variable it overrides).

    The runtime's ``worker_*`` fields also answer to the short form (``--prefetch``).
    """
    fields = model.model_fields
    for field, info in fields.items():
        flags = [f"--{field.replace('_', '-')}"]
        short = field.removeprefix("worker_")
        if short != field and short not in fields:
            flags.append(f"--{short.replace('_', '-')}")  # --prefetch for --worker-prefetch
        parser.add_argument(
            *flags,
            dest=field,
            default=None,
            help=f"{info.description} (env CDC_{field.upper()})",
        )


def build_settings(model: type[S], args: argparse.Namespace) -> S:
    """The settings from the environment, with the flags that were given overriding.

    Raises ``cdc.errors.ConfigError`` (one line) for anything invalid, a secret in a flag
    included.
    """
    return load(model, {k: getattr(args, k, None) for k in model.model_fields})


def _run_worker(argv: Sequence[str]) -> int:
    from consumers.loader import build_spec, load

    name = argv[0]
    try:
        worker = load(name)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(
        prog=f"python -m consumers {name}", description=f"run the {name} worker"
    )
    add_setting_flags(parser, worker.settings)
    parser.add_argument(
        "--check",
        action="store_true",
        help="change nothing: check the worker's database role and broker login "
        "(exit 0, or 3 listing what is missing)",
    )
    args = parser.parse_args(argv[1:])
    try:
        settings = build_settings(worker.settings, args)
    except SettingsProblem as exc:
        print(exc, file=sys.stderr)
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
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(_serve(settings, spec))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop where installed: less event-loop CPU per message than asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - a platform without uvloop
        return None
    return uvloop.new_event_loop


async def _serve(settings: ConsumerSettings, spec: Any) -> int:
    from cdc.metrics import serve
    from consumers.runtime.metrics import WorkerMetrics
    from consumers.runtime.runner import Runner

    metrics = WorkerMetrics(spec.name)
    runner = Runner(settings, spec, metrics)
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()

    def on_signal() -> None:
        if not stopped.is_set():
            log.info("stop requested: finishing in-flight messages")
        stopped.set()
        runner.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m consumers``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(
            "usage: python -m consumers {billing,notifications,<module.path>} [--flags]\n"
            "       python -m consumers dlq {list,show,replay,purge} ...\n\n" + (__doc__ or ""),
            file=sys.stderr if not argv else sys.stdout,
        )
        return EXIT_USAGE if not argv else EXIT_OK
    try:
        if argv[0] == "dlq":
            from consumers.dlq import main as dlq_main

            return dlq_main(argv[1:])
        return _run_worker(argv)
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
        return EXIT_OK
    except Exception:
        log.exception("unexpected error")
        return EXIT_ERROR
