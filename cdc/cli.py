"""Command line: ``cdc setup | relay | status | recover | prune | demo``.

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

from cdc import slot as slots
from cdc.config import RelaySettings
from cdc.errors import (
    CdcError,
    ConfigError,
    RefusedError,
    SetupError,
    SlotLostError,
    SourceError,
)
from cdc.logs import configure
from cdc.settings_base import load

log = logging.getLogger("cdc")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_SETUP = 3
EXIT_SLOT_LOST = 5


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {
        "setup": "create table (if absent), publication, checkpoint table and slot; print the "
        "relay role's GRANTs (--check: verify, change nothing)",
        "relay": "stream outbox inserts to RabbitMQ until SIGTERM/SIGINT",
        "status": "show the slot, its confirmed_flush_lsn and lag",
        "demo": "insert sample outbox events and print what arrives on the exchange",
        "recover": "after a slot loss: new slot, publish what the checkpoint cannot prove sent",
        "prune": "delete outbox rows the checkpoint proves published, older than a duration",
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
        if name == "setup":
            cmd.add_argument(
                "--check",
                action="store_true",
                help="change nothing; check, as the relay's role, that everything it needs "
                "is in place (exit 0, or 3 listing what is missing)",
            )
            cmd.add_argument(
                "--relay-role",
                default=None,
                help="apply the relay role's GRANTs to this existing role (always printed)",
            )
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "setup":
            cmd.add_argument(
                "--backfill",
                metavar="pending|all|since=ISO",
                help="publish rows already in the table from the new slot's snapshot "
                "(pending: those whose status is not 'published'); run again to resume",
            )
        if name == "prune":
            cmd.add_argument(
                "--older-than", metavar="DURATION", help="e.g. 90s, 12h, 7d (default: "
                "CDC_PRUNE_OLDER_THAN)",
            )
        if name == "demo":
            cmd.add_argument("--rate", type=float, default=5.0, help="events per second")
            cmd.add_argument("--count", type=int, default=0, help="stop after N (0: forever)")
    return parser


def _settings(args: argparse.Namespace) -> RelaySettings:
    return load(RelaySettings, {k: getattr(args, k) for k in RelaySettings.model_fields})


def _run_relay(settings: RelaySettings) -> int:
    from cdc import maintenance
    from cdc.metrics import Metrics, serve
    from cdc.relay import Relay

    async def main() -> int:
        metrics = Metrics()
        relay = Relay(settings, metrics)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.stop)
        upkeep = asyncio.create_task(maintenance.run(settings, metrics), name="cdc-upkeep")
        server = None
        if settings.metrics_port:
            server = await serve(
                settings.metrics_host, settings.metrics_port, metrics, relay.health
            )
        try:
            return await relay.run()
        finally:
            upkeep.cancel()
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


def _status(settings: RelaySettings, as_json: bool) -> int:
    state = slots.status(settings)
    if as_json:
        print(orjson.dumps(state.as_dict()).decode())
        return 0
    if not state.exists:
        print(f"slot {state.slot_name}: does not exist")
    else:
        print(
            f"slot {state.slot_name} ({state.plugin}) "
            f"active={state.active} pid={state.active_pid}\n"
            f"  confirmed_flush_lsn {state.confirmed_flush_lsn}  restart_lsn {state.restart_lsn}\n"
            f"  current_wal_lsn {state.current_wal_lsn}  lag {state.lag_bytes} bytes, "
            f"retained {state.retained_bytes} bytes\n"
            f"  wal_status {state.wal_status}  safe_wal_size {state.safe_wal_size}"
            + (f"  invalidation_reason {state.invalidation_reason}"
               if state.invalidation_reason else "")
        )
    hint = ": run `cdc recover`" if state.health == "lost" else ""
    reason = f" ({state.health_reason})" if state.health_reason else ""
    print(f"health: {state.health}{reason}{hint}")
    cp = state.checkpoint
    if cp is not None:
        print(
            f"checkpoint: {cp['state']}"
            + (f" ({cp['lost_reason']})" if cp["lost_reason"] else "")
            + f"  proven_at {cp['proven_at']}  confirmed_lsn {cp['confirmed_lsn']}\n"
            f"  backfill {cp['backfill_mode']}: {cp['backfill_rows_done']}/"
            f"{cp['backfill_rows_total']} rows, done={cp['backfill_done']}"
        )
    return 0


def _setup(settings: RelaySettings, args: argparse.Namespace) -> int:
    from cdc import privileges

    if args.check:
        findings = privileges.check(settings)
        for finding in findings:
            print(finding.line())
        return 0 if all(f.ok for f in findings) else EXIT_SETUP
    role = privileges.check_role_name(args.relay_role or privileges.DEFAULT_ROLE)
    for line in _setup_lines(args, settings):
        log.info(line)
    for line in privileges.grant_lines(settings, role, apply=args.relay_role is not None):
        print(line)
    return 0


def _setup_lines(args: argparse.Namespace, settings: RelaySettings) -> list[str]:
    if args.backfill is None:
        return slots.setup(settings)
    from cdc import backfill
    from cdc.horizon import parse_backfill

    try:
        mode, since = parse_backfill(args.backfill)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return backfill.run(settings, mode, since)


def _prune(args: argparse.Namespace, settings: RelaySettings) -> list[str]:
    from cdc.durations import parse_duration
    from cdc.prune import prune

    text = args.older_than or settings.prune_older_than
    if not text:
        raise ConfigError("say how old a row must be: --older-than 7d (or CDC_PRUNE_OLDER_THAN)")
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"--older-than: {exc}") from exc
    return [prune(settings, seconds).summary(text)]


def _dispatch(args: argparse.Namespace, settings: RelaySettings) -> int:
    if args.command == "setup":
        return _setup(settings, args)
    if args.command in ("recover", "prune"):
        if args.command == "recover":
            from cdc.recovery import recover

            lines = recover(settings)
        else:
            lines = _prune(args, settings)
        for line in lines:
            log.info(line)
        return 0
    if args.command == "status":
        return _status(settings, args.json)
    if args.command == "demo":
        from cdc.demo import run_demo

        return asyncio.run(run_demo(settings, rate=args.rate, count=args.count))
    return _run_relay(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cdc`` console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    configure(settings.log_format, settings.log_level)
    try:
        return _dispatch(args, settings)
    except ConfigError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    except SlotLostError as exc:
        log.error("%s", exc)
        return EXIT_SLOT_LOST
    except SetupError as exc:
        log.error("database is not set up for the relay: %s", exc)
        return EXIT_SETUP
    except RefusedError as exc:
        log.error("%s", exc)
        return EXIT_SETUP
    except SourceError as exc:
        log.error("%s", exc)
        return EXIT_ERROR if args.command == "relay" else EXIT_SETUP
    except CdcError as exc:
        log.error("%s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 0
