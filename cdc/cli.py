"""Command line of the relay: ``cdc setup | relay | status | recover | prune | demo``.

Builds the one :class:`RelaySettings` from the environment with flags overriding, sets up
logging, and maps outcomes to the documented exit codes. Each command declares the settings
it uses (its only flags) and the connection strings it needs (exit 2, one line, if unset).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from cdc import __version__
from cdc.config import RelaySettings
from cdc.errors import (
    CdcError,
    ConfigError,
    RefusedError,
    SetupError,
    SlotLostError,
    SourceError,
)
from cdc.service.cli import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    add_setting_flags,
    add_version,
    on_stop_signals,
    print_findings,
    read_settings,
    run_fast,
)
from cdc.service.logs import configure
from cdc.shell import slot_guard

log = logging.getLogger("cdc")

#: A server refuses, or the database is not set up (the shared EXIT_REFUSED).
EXIT_SETUP = EXIT_REFUSED
EXIT_SLOT_LOST = 5

DB, AMQP = "database_url", "amqp_url"
NAMES = ("slot_name", "publication_name", "outbox_table")
LOGS = ("log_format", "log_level")
#: What publishing reads (the relay, `cdc recover`, `cdc setup --backfill`).
PUBLISH = ("exchange", "parking_queue", "max_in_flight", "confirm_timeout")


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: what it does, the settings it reads (its flags), what it needs."""

    summary: str
    uses: tuple[str, ...]
    needs: tuple[str, ...]


COMMANDS = {
    "setup": Command(
        "create the outbox table (if absent), publication, checkpoint table and slot; print "
        "the relay role's GRANTs (--check: verify as the relay's role, change nothing; "
        "--backfill: also publish rows already there, which needs CDC_AMQP_URL)",
        (DB, AMQP, *NAMES, *PUBLISH, *LOGS),
        (DB,),
    ),
    "relay": Command(
        "stream outbox inserts to RabbitMQ until SIGTERM/SIGINT",
        tuple(RelaySettings.model_fields),
        (DB, AMQP),
    ),
    "status": Command(
        "one screen: the slot and its health, the three lags, the relay's state, parked "
        "counts (CDC_AMQP_URL optional: the parking queue's depth)",
        (DB, AMQP, *NAMES, "parking_queue", "metrics_port", *LOGS),
        (DB,),
    ),
    "recover": Command(
        "after a slot loss: new slot, publish what the checkpoint cannot prove sent",
        (DB, AMQP, *NAMES, *PUBLISH, *LOGS),
        (DB, AMQP),
    ),
    "prune": Command(
        "delete outbox rows the checkpoint proves published, older than a duration",
        (DB, *NAMES, "prune_older_than", *LOGS),
        (DB,),
    ),
    "demo": Command(
        "insert sample outbox events and print what arrives on the exchange",
        (DB, AMQP, "outbox_table", "exchange", *LOGS),
        (DB, AMQP),
    ),
}

DESCRIPTION = """Stream the transactional outbox from PostgreSQL to RabbitMQ.

Every setting is a CDC_* environment variable; a command's flags override the
ones it uses (see `cdc COMMAND --help`). Exit codes: 0 done, 1 unexpected
error, 2 invalid configuration, 3 a server refuses it or the database is not
set up, 4 the shutdown drain timed out, 5 the slot is lost (run `cdc recover`).
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdc", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        cmd = sub.add_parser(name, help=command.summary, description=command.summary)
        add_version(cmd)
        _add_own_flags(name, cmd)
        settings = cmd.add_argument_group("settings (each overrides its CDC_* variable)")
        add_setting_flags(settings, RelaySettings, command.uses, command.needs)
    return parser


def _add_own_flags(name: str, cmd: argparse.ArgumentParser) -> None:
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
            metavar="ROLE",
            help="apply the relay role's GRANTs to this existing role (always printed)",
        )
    if name == "status":
        cmd.add_argument("--json", action="store_true", help="one JSON document (a line)")
        cmd.add_argument(
            "--watch",
            nargs="?",
            type=float,
            const=2.0,
            default=None,
            metavar="SECONDS",
            help="redraw every SECONDS (default 2) until Ctrl-C; with --json, a line each time",
        )
        cmd.add_argument(
            "--relay-metrics",
            metavar="URL",
            default=None,
            help="the relay's /metrics (default http://127.0.0.1:$CDC_METRICS_PORT/metrics); "
            "its /healthz is read beside it",
        )
        cmd.add_argument(
            "--worker-metrics",
            metavar="URL",
            nargs="+",
            action="extend",
            default=[],
            help="workers' /metrics, for the consumer lag and their parked counts",
        )
        cmd.add_argument(
            "--standby-url",
            action="append",
            default=[],
            metavar="URL",
            help="also check this standby's copy of the slot (repeatable)",
        )
    if name == "setup":
        cmd.add_argument(
            "--backfill",
            metavar="pending|all|since=ISO",
            help="publish rows already in the table from the new slot's snapshot "
            "(pending: those whose status is not 'published'); run again to resume",
        )
    if name == "prune":
        cmd.add_argument(
            "--older-than",
            metavar="DURATION",
            help="e.g. 90s, 12h, 7d (default: CDC_PRUNE_OLDER_THAN)",
        )
    if name == "demo":
        cmd.add_argument("--rate", type=float, default=5.0, help="events per second (default 5)")
        cmd.add_argument("--count", type=int, default=0, help="stop after N (default 0: forever)")


def _needs(args: argparse.Namespace) -> tuple[str, ...]:
    """The URLs this invocation needs: a backfill publishes, plain setup does not."""
    needs = COMMANDS[args.command].needs
    if args.command == "setup" and args.backfill is not None:
        return (*needs, AMQP)
    return needs


def _settings(args: argparse.Namespace) -> RelaySettings | None:
    backfill = args.command == "setup" and args.backfill is not None
    user = "`cdc setup --backfill`" if backfill else f"`cdc {args.command}`"
    return read_settings(RelaySettings, args, _needs(args), user)


def _run_relay(settings: RelaySettings) -> int:
    from cdc.service.metrics_server import serve
    from cdc.shell import maintenance
    from cdc.shell.metrics import Metrics
    from cdc.shell.relay import Relay

    async def main() -> int:
        metrics = Metrics()
        relay = Relay(settings, metrics)
        on_stop_signals(relay.stop)
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

    return run_fast(main)


def _status(settings: RelaySettings, args: argparse.Namespace) -> int:
    from cdc.shell import status_probe, watch

    def probe() -> tuple[str, dict[str, Any] | SourceError]:
        """The heading and the document, or (watching) the outage that stood in the way."""
        now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        heading = f"cdc status  outbox-cdc {__version__}  {now}"
        try:
            return heading, status_probe.gather(
                settings, args.relay_metrics, args.worker_metrics, args.standby_url
            )
        except SourceError as exc:
            if args.watch is None:
                raise
            return heading, exc

    def show(seen: tuple[str, dict[str, Any] | SourceError] | None) -> None:
        if seen is None:
            print(f"no answer within {status_probe.ROUND_BOUND:g} s (trying again)",
                  file=sys.stderr, flush=True)
        elif isinstance(seen[1], SourceError):
            # Watching through a PostgreSQL outage: say so and look again next round.
            print(f"{seen[0]}\nPostgreSQL: {seen[1]} (trying again in {args.watch:g} s)",
                  file=sys.stderr, flush=True)
        else:
            _show(seen[1], seen[0], args)

    if args.watch is None:
        show(probe())
        return 0
    # Ctrl-C (or SIGTERM) ends the watch with 0 at once, whatever the probe is doing
    watch.repeat(probe, show, max(args.watch, 0.2), status_probe.ROUND_BOUND)
    return 0


def _show(doc: dict[str, Any], heading: str, args: argparse.Namespace) -> None:
    from cdc.core import status_report

    if args.json:
        print(orjson.dumps(doc).decode(), flush=True)
        return
    if args.watch is not None and sys.stdout.isatty():
        print("\x1b[H\x1b[2J", end="")  # home and clear: redraw in place
    print("\n".join(status_report.render(doc, heading)), flush=True)


def _setup(settings: RelaySettings, args: argparse.Namespace) -> int:
    from cdc.shell import privileges

    if args.check:
        return print_findings(privileges.check(settings))
    role = privileges.check_role_name(args.relay_role or privileges.DEFAULT_ROLE)
    for line in _setup_lines(args, settings):
        log.info(line)
    for line in privileges.grant_lines(settings, role, apply=args.relay_role is not None):
        print(line)
    return 0


def _setup_lines(args: argparse.Namespace, settings: RelaySettings) -> list[str]:
    if args.backfill is None:
        return slot_guard.setup(settings)
    from cdc.core.horizon import parse_backfill
    from cdc.shell import backfill

    try:
        mode, since = parse_backfill(args.backfill)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    return backfill.run(settings, mode, since)


def _prune(args: argparse.Namespace, settings: RelaySettings) -> list[str]:
    from cdc.core.durations import parse_duration
    from cdc.shell.prune import prune

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
            from cdc.shell.recovery import recover

            lines = recover(settings)
        else:
            lines = _prune(args, settings)
        for line in lines:
            log.info(line)
        return 0
    if args.command == "status":
        return _status(settings, args)
    if args.command == "demo":
        from cdc.demo import run_demo

        return asyncio.run(run_demo(settings, rate=args.rate, count=args.count))
    return _run_relay(settings)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``cdc`` console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    settings = _settings(args)
    if settings is None:
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
        # The relay and the watch stop on a flag; the demo is stopped by Ctrl-C as a matter
        # of course. Any other command here did not finish, so it must not report success.
        return EXIT_OK if args.command == "demo" else EXIT_INTERRUPTED
