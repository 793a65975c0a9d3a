"""A webhook receiver for the benchmarks: ``python -m bench.webhook_receiver``.

It listens on every port of ``--ports`` and answers every POST after ``--latency`` seconds
(asyncio, keep-alive, so thousands can wait at once), verifies the ``X-CDC-Signature``
HMAC-SHA256 of the body itself with the secret in ``BENCH_WEBHOOK_SECRET`` (401 to a bad
one, counted), and records
``arrival_epoch_seconds<TAB>messageId<TAB>idempotency key`` of each accepted POST, served as
text by ``GET /_records`` on any of its ports. The ``--dead-ports`` accept connections and
never answer (endpoints that time out). It prints ``ready`` once listening, and exits on
SIGTERM.
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

from aiohttp import web


async def serve(ports: list[int], dead_ports: list[int], latency: float, secret: bytes) -> None:
    records: list[str] = []
    bad = 0

    async def hook(request: web.Request) -> web.Response:
        nonlocal bad
        body = await request.read()
        mac = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(mac, request.headers.get("X-CDC-Signature", "")):
            bad += 1
            return web.Response(status=401)
        if latency > 0:
            await asyncio.sleep(latency)
        records.append(
            f"{time.time():.6f}\t{request.headers.get('X-CDC-Message-Id', '')}"
            f"\t{request.headers.get('Idempotency-Key', '')}"
        )
        return web.Response(status=204)

    async def never(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        return web.Response(status=204)

    async def listing(request: web.Request) -> web.Response:
        text = "\n".join(records)
        return web.Response(text=text, headers={"X-Bad-Signatures": str(bad)})

    runners = []
    for listen, handler in [(p, hook) for p in ports] + [(p, never) for p in dead_ports]:
        app = web.Application(client_max_size=8 * 2**20)
        app.router.add_get("/_records", listing)
        app.router.add_post("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", listen, backlog=1024).start()
        runners.append(runner)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("ready", flush=True)
    await stop.wait()
    for runner in runners:
        await runner.cleanup()


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
