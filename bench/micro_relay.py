"""CPU per event of a whole relay session, no database or broker: ``python -m bench.micro_relay``.

Runs a real :class:`cdc.shell.relay_session.StreamSession` (reader, publisher and confirm
path, metrics included) at the default settings on a backlog of outbox rows: its
:class:`~cdc.shell.source.ReplicationStream` reads from a stand-in for libpq that hands over
the CopyData messages (XLogData around the pgoutput bytes of :mod:`bench.micro_route`), and
the broker side is a :class:`~cdc.shell.broker.ConfirmChannel`
on a transport that keeps a SHA-256 of every byte written and answers each write with one
``multiple`` ``Basic.Ack`` per 100 publishes. Only the socket calls of the two connections
are left out.

The rows vary (``--mix``): every 7th has a headers object (a reserved key among them), every
50th a created_at PostgreSQL prints as ``infinity``, every 97th a NULL payload (parked as
malformed), so that the digest of the frames covers those paths too.

``--mode session --count N --times K`` builds the messages, then runs K sessions on them, for
an instruction counter (``valgrind --tool=callgrind``): the difference between the counts of
K=3 and K=1, divided by 2N, is the instructions per event (start-up and building the
messages cancel out). ``--sha`` prints the digest of the frames written.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import struct
import time
from typing import Any

from bench import micro_route as mr
from bench.micro_publish import Sink, ack_frame
from cdc.config import RelaySettings
from cdc.shell.broker import FRAME_MAX, ConfirmChannel
from cdc.shell.metrics import Metrics
from cdc.shell.relay_session import StreamSession
from cdc.shell.source import ReplicationStream

_XLOG = struct.Struct(">cQQq")
_HEADERS = b'{"tenant": "acme", "trace": "4bf92f35", "CC": "spoof"}'
_ACKS_PER = 100


class _Done(Exception):
    """The backlog is read and every event confirmed."""


def _insert(i: int, mix: bool) -> bytes:
    if not mix:
        return mr.insert(i, None)
    data = mr.insert(i, _HEADERS if i % 7 == 3 else None)
    if i % 50 == 11:  # created_at: 't' + Int32 length + text, the message's last value
        data = data[: data.rindex(b"t")] + b"t" + struct.pack(">i", 8) + b"infinity"
    if i % 97 == 5:  # payload NULL: parked as malformed
        head = mr.insert(i, None)
        at = head.index(mr.PAYLOAD) - 5
        data = data[:at] + b"n" + data[at + 5 + len(mr.PAYLOAD) :]
    return data


def copy_data(count: int, mix: bool) -> list[bytes]:
    """The CopyData payloads (XLogData) of a backlog of ``count`` outbox rows."""
    out = []
    row = 0
    for payload, lsn in mr.stream(count, None):
        data = bytes(payload)
        if data[:1] == b"I":
            data = _insert(row, mix)
            row += 1
        out.append(_XLOG.pack(b"w", lsn, lsn + len(data), 0) + data)
    return out


class _PgConn:
    """Stands in for psycopg's libpq connection under :class:`ReplicationStream`: hands the
    backlog over as ``get_copy_data`` does, then nothing until every event is confirmed."""

    server_version = 160000
    backend_pid = 0

    def __init__(self, messages: list[bytes], socket: int) -> None:
        self._messages = iter(messages)
        self.socket = socket  # a pipe nobody writes to: waiting on it is a plain timeout
        self.session: StreamSession | None = None

    def get_copy_data(self, async_: int) -> tuple[int, memoryview]:
        data = next(self._messages, None)
        if data is not None:
            return len(data), memoryview(data)
        assert self.session is not None
        if not self.session.watermark.in_flight:
            raise _Done
        return 0, memoryview(b"")

    def consume_input(self) -> None:
        return None

    def put_copy_data(self, data: bytes) -> int:
        return 1

    def flush(self) -> int:
        return 0


class _Conn:
    def __init__(self, pgconn: _PgConn) -> None:
        self.pgconn = pgconn

    async def close(self) -> None:
        return None


class _Broker(Sink):
    """A transport that hashes what is written and confirms the publishes in it."""

    def __init__(self, sha: bool) -> None:
        self.digest = hashlib.sha256() if sha else None
        self.channel: ConfirmChannel | None = None
        self.acked = 0

    def write(self, data: bytes) -> None:
        if self.digest is not None:
            self.digest.update(data)
        asyncio.get_running_loop().call_soon(self._ack)

    def writelines(self, pieces: list[Any]) -> None:
        for piece in pieces:
            if self.digest is not None:
                self.digest.update(piece)
        asyncio.get_running_loop().call_soon(self._ack)

    def _ack(self) -> None:
        assert self.channel is not None
        last = self.acked + self.channel.in_flight
        tags = [*range(self.acked + _ACKS_PER, last, _ACKS_PER), last]
        data = b"".join(ack_frame(tag, True) for tag in tags if tag > self.acked)
        self.acked = last
        self.channel.data_received(data)


async def session(messages: list[bytes], sha: bool) -> tuple[str, StreamSession]:
    """Run one relay session over ``messages``; the SHA-256 of the frames it wrote (if
    ``sha``, else "") and the session, to look at once it is over."""
    idle, unused = os.pipe()
    pgconn = _PgConn(messages, idle)
    stream = ReplicationStream(_Conn(pgconn))  # type: ignore[arg-type]
    # No checkpoint and no silence probe in a long run: both would connect to PostgreSQL.
    settings = RelaySettings(
        outbox_table="public.outbox", checkpoint_interval=3600, source_timeout=3600
    )
    session = StreamSession(settings, Metrics(), stream, 0, lambda blocked: None)
    pgconn.session = session
    broker = _Broker(sha)
    publisher = session.publisher
    channel = ConfirmChannel(
        confirm_timeout=30.0,
        on_ack=publisher._acked,  # what broker_connect.connect wires, minus the handshake
        on_returned=publisher._returned,
        on_republish=lambda reason: None,
    )
    broker.channel = channel
    channel.connection_made(broker)  # type: ignore[arg-type]
    publisher._channel, publisher._frame_max = channel, FRAME_MAX
    try:
        await session.run(asyncio.Event(), lambda state: None)
    except _Done:
        pass
    finally:
        os.close(idle)
        os.close(unused)
    return (broker.digest.hexdigest() if broker.digest is not None else ""), session


def run(messages: list[bytes], sha: bool = True) -> tuple[str, StreamSession]:
    """One session on uvloop, as the relay runs (``cdc.service.cli``)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(session(messages, sha))


def main() -> None:
    """Run one session (``--mode session``), or time a few and print µs per event."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["session"])
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--mix", action="store_true", help="vary the rows (see the docstring)")
    parser.add_argument("--sha", action="store_true", help="print the frames' SHA-256")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--times", type=int, default=1)
    args = parser.parse_args()
    logging.getLogger("cdc").setLevel(logging.ERROR)  # one warning per parked row
    messages = copy_data(args.count, args.mix)
    if args.mode:
        for _ in range(args.times):
            digest, _ = run(messages, args.sha)
            if args.sha:
                print(digest)
        return
    for _ in range(args.repeat):
        started = time.process_time()
        digest, _ = run(messages)
        spent = time.process_time() - started
        print(f"{spent / args.count * 1e6:.2f} µs CPU per event  sha256 {digest[:16]}")


if __name__ == "__main__":
    main()
