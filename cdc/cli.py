"""Command line: ``cdc setup | relay | status | demo``.

Builds the one :class:`RelaySettings` from the environment with flags overriding, sets up
logging, and maps outcomes to the documented exit codes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import orjson
from pydantic import ValidationError

from cdc import slot as slots
from cdc.config import RelaySettings
from cdc.errors import CdcError, SetupError, SourceError
from cdc.logs import configure, redact

log = logging.getLogger("cdc")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SETUP = 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "setup": "create table (if absent), publication and slot; check the server",
        "relay": "stream outbox inserts to RabbitMQ until SIGTERM/SIGINT",
        "status": "show the slot, its confirmed_flush_lsn and lag",
        "demo": "insert sample outbox events and print what arrives on the exchange",
    }
    for name, text in commands.items():
        cmd = sub.add_parser(name, help=text, description=text)
        for field, info in RelaySettings.model_fields.items():
            cmd.add_argument(
                f"--{field.replace('_', '-')}",
                dest=field,
                default=None,
                help=f"{info.description} (env CDC_{field.upper()})",
            )
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="machine-readable output")
            cmd.add_argument(
                "--standby-url",
                action="append",
                default=[],
                metavar="URL",
                help="also check this standby's copy of the slot (repeatable)",
            )
        if name == "demo":
            cmd.add_argument("--rate", type=float, default=5.0, help="events per second")
            cmd.add_argument("--count", type=int, default=0, help="stop after N (0: forever)")
    return parser


def _settings(args: argparse.Namespace) -> RelaySettings:
    overrides = {k: getattr(args, k) for k in RelaySettings.model_fields if getattr(args, k)}
    return RelaySettings(**overrides)


def _run_relay(settings: RelaySettings) -> int:
    from cdc.metrics import Metrics, serve
    from cdc.relay import Relay

    async def main() -> int:
        metrics = Metrics()
        relay = Relay(settings, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop)
        server = None
        if settings.metrics_port:
            server = await serve(
                settings.metrics_host, settings.metrics_port, metrics, relay.health
            )
        try:
            return await relay.run()
        finally:
            if server is not None:
                server.close()

    return _run_fast(main)


def _run_fast(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run ``main`` on uvloop when it is installed (the relay's hot loop), else asyncio's."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(main())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main())


def _status(settings: RelaySettings, as_json: bool, standby_urls: list[str]) -> int:
    from cdc.standbys import failover_status

    state = slots.status(settings)
    with slots.connect(settings) as conn:
        failover = failover_status(conn, settings, standby_urls)
    if as_json:
        print(orjson.dumps(state.as_dict() | {"failover": failover}).decode())
        return 0
    if not state.exists:
        print(f"slot {state.slot_name}: does not exist (run `cdc setup`)")
    else:
        print(
            f"slot {state.slot_name} ({state.plugin}) "
            f"active={state.active} pid={state.active_pid}\n"
            f"  confirmed_flush_lsn {state.confirmed_flush_lsn}  restart_lsn {state.restart_lsn}\n"
            f"  current_wal_lsn {state.current_wal_lsn}  lag {state.lag_bytes} bytes, "
            f"retained {state.retained_bytes} bytes"
        )
    _print_failover(failover)
    return 0


def _print_failover(failover: dict[str, Any]) -> None:
    print(
        f"failover slot: {failover['slot_failover']} "
        f"(supported: {failover['supported']}; synchronized_standby_slots: "
        f"{','.join(failover['synchronized_standby_slots']) or '(none)'})"
    )
    for standby in failover["standbys"]:
        ready = {True: "ready", False: "NOT ready", None: "unknown (use --standby-url)"}
        print(f"  standby {standby['standby']} ({standby['state'] or 'not connected'}): "
              f"{ready[standby['ready']]}")
        for reason in standby["reasons"]:
            print(f"    - {reason}")


def _dispatch(args: argparse.Namespace, settings: RelaySettings) -> int:
    if args.command == "setup":
        for line in slots.setup(settings):
            log.info(line)
        return 0
    if args.command == "status":
        return _status(settings, args.json, args.standby_url)
    if args.command == "demo":
        from cdc.demo import run_demo

        return asyncio.run(run_demo(settings, rate=args.rate, count=args.count))
    return _run_relay(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cdc`` console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ValidationError as exc:
        errors: list[Any] = [
            f"CDC_{'_'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()
        ]
        print(redact("invalid configuration:\n  " + "\n  ".join(errors)), file=sys.stderr)
        return EXIT_USAGE
    configure(settings.log_format, settings.log_level)
    try:
        return _dispatch(args, settings)
    except SetupError as exc:
        log.error("database is not set up for the relay: %s", exc)
        return EXIT_SETUP
    except SourceError as exc:
        log.error("%s", exc)
        return EXIT_ERROR if args.command == "relay" else EXIT_SETUP
    except CdcError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 0
