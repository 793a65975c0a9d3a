"""Fake servers standing in for the outside world: webhook receivers, an SMTP sink, raw TCP
servers (an untrusted TLS endpoint, a PostgreSQL that is starting up).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import secrets
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.common import free_port


@dataclass
class HookRequest:
    """One POST the webhook receiver got, and whether its signature verified."""

    body: bytes
    headers: dict[str, str]
    signature_ok: bool
    status: int
    at: float = 0.0  # time.monotonic() when it was answered


class WebhookReceiver:
    """A real HTTP/1.1 server (keep-alive) on 127.0.0.1 that verifies the HMAC-SHA256
    signature of each POST itself (not with the code under test) and answers 401 to a bad
    one. ``fail_first`` answers 500 to the first request of each idempotency key;
    ``delay`` seconds pass before each answer (longer than the client's timeout: an
    endpoint that times out); ``max_in_flight`` is the most requests it held at once;
    ``accepted()`` is what a receiver that dedups by idempotency key would keep."""

    SECRET = "whsec-" + secrets.token_hex(8)

    def __init__(self, fail_first: bool = False, delay: float = 0.0) -> None:
        import http.server

        receiver = self
        self.fail_first = fail_first
        self.delay = delay
        self.requests: list[HookRequest] = []
        self.in_flight = 0
        self.started = 0  # POSTs received, answered or not
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.in_flight += 1
                    receiver.started += 1
                    receiver.max_in_flight = max(receiver.max_in_flight, receiver.in_flight)
                try:
                    if receiver.delay and receiver._closing.wait(receiver.delay):
                        return
                finally:
                    with receiver._lock:
                        receiver.in_flight -= 1
                mac = hmac.new(receiver.SECRET.encode(), body, hashlib.sha256).hexdigest()
                ok = hmac.compare_digest(
                    f"sha256={mac}", self.headers.get("X-CDC-Signature", "")
                )
                key = self.headers.get("Idempotency-Key", "")
                with receiver._lock:
                    seen = any(r.headers.get("Idempotency-Key") == key for r in receiver.requests)
                    status = 401 if not ok else 500 if receiver.fail_first and not seen else 200
                    receiver.requests.append(
                        HookRequest(body, dict(self.headers), ok, status, time.monotonic())
                    )
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def accepted(self) -> dict[str, HookRequest]:
        """Idempotency key -> the first 2xx request with that key."""
        out: dict[str, HookRequest] = {}
        with self._lock:
            for r in self.requests:
                if r.status == 200:
                    out.setdefault(r.headers["Idempotency-Key"], r)
        return out

    def close(self) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()


class SmtpSink:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 keeping every message it accepts.
    ``fail_first`` answers 451 (try again later) to the first message of each idempotency
    key; ``refused`` counts those."""

    def __init__(self, fail_first: bool = False) -> None:
        from email import message_from_bytes
        from email.message import Message

        from aiosmtpd.controller import Controller

        sink = self
        self.messages: list[Message] = []
        self.refused = 0
        seen: set[str] = set()

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                message = message_from_bytes(envelope.content)
                key = str(message["X-Idempotency-Key"])
                if fail_first and key not in seen:
                    seen.add(key)
                    sink.refused += 1
                    return "451 4.3.0 try again later"
                sink.messages.append(message)
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


class FakeServer:
    """A local TCP server whose every connection runs ``handle(socket)`` in a thread."""

    def __init__(self, handle: Callable[[socket.socket], None]) -> None:
        self._handle = handle
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError), conn:
            conn.settimeout(10)
            self._handle(conn)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


def self_signed(tmp_path: Path) -> ssl.SSLContext:
    """A server context with a throwaway self-signed certificate (no client trusts it)."""
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


def pg_message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body
