"""Dead-letter operations: ``cdc-worker dlq list|show|replay|purge`` (``DESCRIPTION`` is
what ``--help`` prints).

- ``list [--worker W ...]``: the parking queue of each worker (default: the built-in ones
  that are installed) with its message count;
- ``show QUEUE [-n N]``: the first N parked messages as JSON lines (headers, reason, body);
  they are taken without ack and given back, so nothing is lost;
- ``replay QUEUE (--id MESSAGE_ID | --all)``: each chosen message is published to its origin
  queue (``x-cdc-origin-queue``) with the attempt count reset, *confirmed*, and only then
  acked in the parking queue; the others are given back untouched;
- ``purge QUEUE --yes``: delete every parked message (refused without ``--yes``).

Only queues named ``*.parked`` are accepted. Exit codes: 0 done, 1 unexpected error or
the broker not reachable, 2 usage error or no such queue, 3 the broker refuses the
configuration (login, vhost, TLS certificate).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import Any

import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from pydantic_settings import SettingsError

from cdc.service.cli import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    add_version,
    read_settings,
)
from cdc.service.logs import redact
from consumers.config import AMQP, ConsumerSettings, add_worker_flags
from consumers.connect import open_broker
from consumers.errors import ConfigError, DlqError, Refused
from consumers.runtime import headers as hdr
from consumers.runtime.republish import copy_properties, publish_confirmed

PARKED_SUFFIX = ".parked"


DESCRIPTION = """\
Look at, replay or purge the messages workers parked after their last attempt.
Only queues named *.parked are accepted; only CDC_AMQP_URL is needed.
Exit codes: 0 done, 1 unexpected error or the broker not reachable, 2 usage
error or no such queue, 3 the broker refuses the configuration.
"""


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_version(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str, fields: tuple[str, ...]) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text, description=text)
        add_version(cmd)
        add_worker_flags(cmd.add_argument_group("settings"), ConsumerSettings, fields, (AMQP,))
        return cmd

    ls = command(
        "list", "parking queues and their message counts", (AMQP, "worker_queue_prefix")
    )
    ls.add_argument(
        "--worker", action="append", default=None, help="worker name or module (repeatable; "
        "default: the built-in workers that are installed)"
    )
    show = command("show", "print parked messages (JSON lines) without removing them", (AMQP,))
    show.add_argument("queue", metavar="QUEUE")
    show.add_argument("-n", type=int, default=10, help="how many (default 10)")
    replay = command(
        "replay",
        "send parked messages back to their origin queue (confirmed, then removed here)",
        (AMQP, "worker_confirm_timeout"),
    )
    replay.add_argument("queue", metavar="QUEUE")
    replay.add_argument("--id", dest="message_id", default=None, help="only this message_id")
    replay.add_argument("--all", action="store_true", help="every parked message")
    purge = command("purge", "delete every parked message", (AMQP,))
    purge.add_argument("queue", metavar="QUEUE")
    purge.add_argument("--yes", action="store_true", help="confirm the deletion")
    return parser


def _value(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "replace")
    if isinstance(value, dict):
        return {str(k): _value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_value(v) for v in value]
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def describe(message: AbstractIncomingMessage) -> dict[str, Any]:
    """One parked message as a JSON-ready dict (what ``show`` prints)."""
    h = message.headers or {}
    return {
        "message_id": message.message_id,
        "routing_key": hdr.text(h.get(hdr.ROUTING_KEY_HEADER)),
        "origin_queue": hdr.text(h.get(hdr.ORIGIN_QUEUE_HEADER)),
        "attempts": _value(h.get(hdr.ATTEMPT_HEADER)),
        "error_kind": hdr.text(h.get(hdr.ERROR_KIND_HEADER)),
        "error": hdr.text(h.get(hdr.ERROR_HEADER)),
        "parked_at": hdr.text(h.get(hdr.PARKED_AT_HEADER)),
        "type": message.type,
        "headers": _value(dict(h)),
        "body": bytes(message.body).decode("utf-8", "replace"),
    }


async def _queue_count(channel: AbstractChannel, queue: str) -> int | None:
    raw = await channel.get_underlay_channel()
    try:
        ok = await raw.queue_declare(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        return None
    return int(ok.message_count or 0)


async def _with_channel(settings: ConsumerSettings, fn: Any) -> int:
    connection = await open_broker(settings.broker_url(), timeout=10)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        return int(await fn(connection, channel))
    finally:
        await connection.close()


def _parking_queues(settings: ConsumerSettings, workers: Sequence[str] | None) -> list[str]:
    from consumers.loader import BUILTIN, build_spec, load
    from consumers.runtime.names import parking_queue

    queues = []
    for name in workers or sorted(BUILTIN):
        try:
            worker = load(name)
        except ConfigError:
            if workers:
                raise
            continue  # a built-in worker that is not installed
        spec = build_spec(worker, worker.settings(**settings.model_dump()))
        queues.append(parking_queue(settings.worker_queue_prefix, spec.service))
    return queues


async def _list(connection: AbstractConnection, queues: list[str]) -> int:
    for queue in queues:
        # A missing queue closes the channel: ask on a fresh one each time.
        probe = await connection.channel(publisher_confirms=False)
        count = await _queue_count(probe, queue)
        print(f"{queue}\t{'missing' if count is None else count}")
    return EXIT_OK


async def _take(channel: AbstractChannel, queue: str, limit: int) -> list[AbstractIncomingMessage]:
    q = await channel.get_queue(queue, ensure=False)
    taken: list[AbstractIncomingMessage] = []
    while len(taken) < limit:
        message = await q.get(no_ack=False, fail=False, timeout=10)
        if message is None:
            break
        taken.append(message)
    return taken


async def _give_back(messages: list[AbstractIncomingMessage]) -> None:
    """Requeue everything taken and not acked (one nack covers all earlier unacked tags)."""
    if messages:
        await messages[-1].nack(multiple=True, requeue=True)


async def _show(channel: AbstractChannel, queue: str, n: int) -> int:
    taken = await _take(channel, queue, n)
    for message in taken:
        print(orjson.dumps(describe(message)).decode())
    await _give_back(taken)
    return EXIT_OK


async def _replay(
    channel: AbstractChannel, settings: ConsumerSettings, queue: str, message_id: str | None
) -> int:
    count = await _queue_count(channel, queue) or 0
    raw = await channel.get_underlay_channel()
    kept: list[AbstractIncomingMessage] = []
    replayed = skipped = 0
    for message in await _take(channel, queue, count):
        origin = hdr.text((message.headers or {}).get(hdr.ORIGIN_QUEUE_HEADER))
        if message_id is not None and message.message_id != message_id:
            kept.append(message)
            continue
        if not origin:
            why = f"no {hdr.ORIGIN_QUEUE_HEADER} header"
            print(f"skipped {message.message_id}: {why}", file=sys.stderr)
            kept.append(message)
            skipped += 1
            continue
        props = copy_properties(message.properties, hdr.replay_headers(message.headers))
        await publish_confirmed(
            raw, message.body, "", origin, props, settings.worker_confirm_timeout
        )
        await message.ack()
        replayed += 1
        print(f"replayed {message.message_id} -> {origin}")
    # The replayed ones are acked, so one multiple-nack gives back exactly the kept ones.
    if kept:
        await kept[-1].nack(multiple=True, requeue=True)
    print(f"{replayed} replayed, {skipped} skipped, {len(kept) - skipped} left in {queue}")
    if message_id is not None and replayed == 0:
        print(f"no replayable message {message_id} in {queue}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


async def _purge(channel: AbstractChannel, queue: str) -> int:
    q = await channel.get_queue(queue, ensure=False)
    ok = await q.purge()
    print(f"purged {int(ok.message_count or 0)} messages from {queue}")
    return EXIT_OK


def _check_queue(queue: str) -> None:
    if not queue.endswith(PARKED_SUFFIX):
        raise DlqError(f"{queue!r} is not a parking queue (their names end in {PARKED_SUFFIX!r})")


async def _exists(connection: AbstractConnection, queue: str) -> int:
    probe = await connection.channel(publisher_confirms=False)
    if await _queue_count(probe, queue) is None:
        raise DlqError(f"no queue {queue!r} on the broker (see `python -m consumers dlq list`)")
    return EXIT_OK


def main(argv: Sequence[str], prog: str = "cdc-worker dlq") -> int:
    """Run one DLQ command; returns the exit code."""
    args = _parser(prog).parse_args(argv)
    settings = read_settings(ConsumerSettings, args, (AMQP,), f"`dlq {args.command}`")
    if settings is None:
        return EXIT_USAGE
    try:
        return asyncio.run(_dispatch(args, settings))
    except DlqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Refused as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except SettingsError as exc:  # a worker's own settings, read for `list`
        print(redact(f"invalid configuration: {exc}"), file=sys.stderr)
        return EXIT_USAGE
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
        # A one-shot command does not wait for the broker: say so in one line.
        print(redact(f"error: the broker is not reachable: {exc!r}"), file=sys.stderr)
        return EXIT_ERROR


async def _dispatch(args: argparse.Namespace, settings: ConsumerSettings) -> int:
    if args.command == "list":
        queues = _parking_queues(settings, args.worker)
        return await _with_channel(settings, lambda conn, _ch: _list(conn, queues))
    _check_queue(args.queue)
    if args.command == "replay" and (args.message_id is None) == (not args.all):
        raise DlqError("replay needs exactly one of --id MESSAGE_ID or --all")
    if args.command == "purge" and not args.yes:
        raise DlqError(f"purge deletes every message in {args.queue}; add --yes to confirm")

    async def run(connection: AbstractConnection, channel: AbstractChannel) -> int:
        await _exists(connection, args.queue)
        if args.command == "show":
            return await _show(channel, args.queue, max(args.n, 0))
        if args.command == "replay":
            return await _replay(channel, settings, args.queue, args.message_id)
        return await _purge(channel, args.queue)

    return await _with_channel(settings, run)
