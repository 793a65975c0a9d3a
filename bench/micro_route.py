"""CPU per event from pgoutput bytes to publish frames, without a database or broker.

``python -m bench.micro_route`` feeds the outbox feed (:class:`cdc.core.feed.OutboxFeed`) the
pgoutput messages of a backlog of outbox rows (a Relation, then transactions of 100
Inserts between a Begin and a Commit) and encodes each event's frames the way the
publisher does (:func:`cdc.wire.amqp.properties_block`, then
:func:`~cdc.wire.amqp.publish_frames`): decode, route and encode, the relay's work per
event before the socket. The rows have the shape ``cdc setup`` creates and ``bench/load.py``
writes (every column of the table, ``headers`` NULL or a small object, a 500-byte jsonb
payload); the bytes are built per PostgreSQL's "Logical Replication Message Formats",
protocol v1, which is what the relay asks for.

Prints the minimum and median µs per event of many repeats. ``--mode NAME --count N
--times K`` builds the messages, then runs one mode K times without timing, for
``valgrind --tool=callgrind``: the difference between the counts of K=3 and K=1, divided
by 2N, is the instructions per event (start-up and building the bytes cancel out).
"""

from __future__ import annotations

import argparse
import struct
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from bench.micro_publish import report_modes
from cdc.core.feed import OutboxFeed
from cdc.core.outbox import OutboxEvent
from cdc.core.watermark import Watermark
from cdc.wire import amqp as wire

OID = 16390
ROWS_PER_TXN = 100
EXCHANGE = "cdc.events"
FRAME_MAX = 131072
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
# (name, type oid) of the table `cdc setup` creates, in its column order.
COLUMNS = (
    ("id", 2950),
    ("aggregate_type", 1043),
    ("aggregate_id", 1043),
    ("event_type", 1043),
    ("payload", 3802),
    ("headers", 3802),
    ("status", 1043),
    ("retry_count", 23),
    ("error_message", 25),
    ("last_error_at", 1184),
    ("published_at", 1184),
    ("created_at", 1184),
)
PAYLOAD = b'{"seq": 1, "pad": "' + b"x" * 480 + b'"}'


def _s(text: str) -> bytes:
    return text.encode() + b"\0"


def _micros(when: datetime) -> int:
    return (when - _PG_EPOCH) // timedelta(microseconds=1)


def relation() -> bytes:
    """The Relation message of the outbox table."""
    out = b"R" + struct.pack(">I", OID) + _s("public") + _s("outbox") + b"d"
    out += struct.pack(">H", len(COLUMNS))
    for name, type_oid in COLUMNS:
        out += struct.pack(">B", name == "id") + _s(name) + struct.pack(">Ii", type_oid, -1)
    return out


def insert(i: int, headers: bytes | None) -> bytes:
    """The Insert message of outbox row number ``i``."""
    created = f"2026-12-06 19:{i // 6000 % 60:02d}:{i // 100 % 60:02d}.{i % 1000000:06d}+00"
    values = (
        str(uuid.UUID(int=i)).encode(),
        b"device",
        f"d-{i % 5000:04d}".encode(),
        b"device.started",
        PAYLOAD,
        headers,
        b"pending",
        b"0",
        None,
        None,
        None,
        created.encode(),
    )
    out = b"I" + struct.pack(">I", OID) + b"N" + struct.pack(">H", len(values))
    for value in values:
        out += b"n" if value is None else b"t" + struct.pack(">i", len(value)) + value
    return out


def stream(count: int, headers: bytes | None) -> list[tuple[memoryview, int]]:
    """``(payload, lsn)`` of a backlog of ``count`` rows, as XLogData hands them over."""
    when = datetime(2026, 12, 6, 19, 0, tzinfo=UTC)
    lsn = 0x1_0000_0000
    out = [(memoryview(relation()), lsn)]
    for first in range(0, count, ROWS_PER_TXN):
        rows = range(first, min(first + ROWS_PER_TXN, count))
        commit_lsn = lsn + 200 * len(rows)
        stamp = _micros(when + timedelta(milliseconds=first))
        out.append((memoryview(b"B" + struct.pack(">QqI", commit_lsn, stamp, 1000 + first)), lsn))
        out += [(memoryview(insert(i, headers)), lsn + 200 * (i - first)) for i in rows]
        end = struct.pack(">BQQq", 0, commit_lsn, commit_lsn + 48, stamp)
        out.append((memoryview(b"C" + end), commit_lsn))
        lsn = commit_lsn + 48
    return out


def encode(event: OutboxEvent) -> bytes | tuple[bytes | memoryview, ...]:
    """The frames of one event, encoded as :meth:`cdc.shell.publisher.Publisher.publish` does."""
    props = wire.properties_block(
        content_type="application/json",
        delivery_mode=2,
        headers=event.headers,
        message_id=event.message_id,
        message_type=event.routing_key,
        timestamp=event.timestamp,
    )
    return wire.publish_frames(1, EXCHANGE, event.routing_key, props, event.body, FRAME_MAX)


def pipeline(count: int, headers: bytes | None) -> Callable[[], int]:
    """A function feeding the backlog through decode, route and encode; returns its bytes."""
    messages = stream(count, headers)

    def run() -> int:
        feed = OutboxFeed("public", "outbox", Watermark(), lambda kind: None)
        size = 0
        for payload, lsn in messages:
            item = feed.handle(payload, lsn)
            if item is not None:
                event = item[1]
                assert type(event) is OutboxEvent, event
                size += len(encode(event))
        return size

    return run


MODES: dict[str, Callable[[int], Callable[[], int]]] = {
    "route": lambda n: pipeline(n, None),
    "route-headers": lambda n: pipeline(n, b'{"tenant": "acme", "trace": "4bf92f35"}'),
}


def main() -> None:
    """Print min and median µs per event of each mode, or run one mode once (``--mode``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=sorted(MODES))
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--times", type=int, default=1)
    args = parser.parse_args()
    if args.mode:
        run = MODES[args.mode](args.count)
        for _ in range(args.times):
            run()
        return
    report_modes(MODES, args.count, args.repeat)


if __name__ == "__main__":
    main()
