"""A webhook receiver for the benchmarks: ``python -m bench.webhook_receiver``.

It listens on every port of ``--ports`` and answers every POST after ``--latency`` seconds
(HTTP/1.1 keep-alive, asyncio, so thousands can wait at once), verifies the
``X-CDC-Signature`` HMAC-SHA256 of the body itself with the secret in
``BENCH_WEBHOOK_SECRET`` (401 to a bad one, counted), and records
``arrival_epoch_seconds<TAB>messageId<TAB>idempotency key`` of each accepted POST, served as
text by ``GET /_records`` on any of its ports. The ``--dead-ports`` accept connections and
never answer (endpoints that time out). It prints ``ready`` once listening, and exits on
SIGTERM.

It is a bare ``asyncio.Protocol`` rather than a web framework: it shares the benchmark's two
cores with the pipeline it measures, so the less CPU it takes per request the less it
distorts the figures (its own CPU is reported beside them).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import signal
import sys
import time


class Receiver:
    """What every connection shares: the secret, the latency, the records."""

    def __init__(self, secret: bytes, latency: float) -> None:
        self.secret = secret
        self.latency = latency
        self.records: list[str] = []
        self.bad = 0


class _Hook(asyncio.Protocol):
    def __init__(self, receiver: Receiver, dead: bool) -> None:
        self.receiver = receiver
        self.dead = dead
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].decode("latin-1").split("\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            self.buf = self.buf[end + 4 + length :]
            self._request(head[0], headers, body)

    def _request(self, line: str, headers: dict[str, str], body: bytes) -> None:
        if self.dead:
            return  # never answers
        r = self.receiver
        if line.startswith("GET /_records"):
            text = "\n".join(r.records).encode()
            self._reply(f"200 OK\r\nX-Bad-Signatures: {r.bad}", text)
            return
        mac = "sha256=" + hmac.new(r.secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, headers.get("x-cdc-signature", "")):
            r.bad += 1
            self._reply("401 Unauthorized")
            return
        record = (
            f"\t{headers.get('x-cdc-message-id', '')}\t{headers.get('idempotency-key', '')}"
        )

        def answer() -> None:
            r.records.append(f"{time.time():.6f}{record}")
            self._reply("204 No Content")

        asyncio.get_running_loop().call_later(r.latency, answer)

    def _reply(self, status: str, body: bytes = b"") -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(
                f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )


async def serve(ports: list[int], dead_ports: list[int], latency: float, secret: bytes) -> None:
    receiver = Receiver(secret, latency)
    loop = asyncio.get_running_loop()
    servers = []
    for port, dead in [(p, False) for p in ports] + [(p, True) for p in dead_ports]:

        def factory(dead: bool = dead) -> _Hook:
            return _Hook(receiver, dead)

        servers.append(await loop.create_server(factory, "127.0.0.1", port, backlog=1024))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.webhook_receiver")
    parser.add_argument("--ports", required=True, help="comma-separated ports that answer")
    parser.add_argument("--dead-ports", default="", help="comma-separated ports that never do")
    parser.add_argument("--latency", type=float, default=0.02)
    args = parser.parse_args(argv)
    secret = os.environ.get("BENCH_WEBHOOK_SECRET", "").encode()
    if not secret:
        print("BENCH_WEBHOOK_SECRET is not set", file=sys.stderr)
        return 2

    def ports(text: str) -> list[int]:
        return [int(p) for p in text.split(",") if p.strip()]

    asyncio.run(serve(ports(args.ports), ports(args.dead_ports), args.latency, secret))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
