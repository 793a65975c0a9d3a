"""The external channels against real local sockets: what is a delivery, what is retried,
what is permanent, and that webhooks run concurrently over reused connections. (No broker
or database: the channel clients alone.)"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading

import pytest
from harness.common import free_port
from harness.fakes import WebhookReceiver

from consumers.errors import PermanentError, Retry
from consumers.notifications.channels import (
    Email,
    SmtpConfig,
    SmtpPool,
    Webhook,
    WebhookClient,
)
from consumers.notifications.targets import TargetPolicy, parse_networks

pytestmark = pytest.mark.integration

#: The test servers listen on loopback: allowed explicitly, as an operator would.
LOCAL = TargetPolicy(allow_http=True, allowed_networks=parse_networks(["127.0.0.1/32"]))


def _hook(url: str) -> Webhook:
    return Webhook(url, b'{"a":1}', "key-1", "device.error", "m-1")


async def post_webhook(hook: Webhook, secret: bytes, timeout: float, policy, **kw) -> None:
    """One POST through a client of its own (closed after)."""
    client = WebhookClient(secret, timeout, policy, **kw)
    try:
        await client.post(hook)
    finally:
        await client.close()


async def send_email(mail: Email, config: SmtpConfig) -> None:
    pool = SmtpPool(config)
    try:
        await pool.send(mail)
    finally:
        await pool.close()


def _serve_once(response: bytes | None) -> tuple[str, threading.Event]:
    """A socket server that answers one request with ``response`` (None: never answers)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    done = threading.Event()

    def run() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        if response is not None:
            conn.sendall(response)
        done.wait(5)
        conn.close()
        srv.close()

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/hook?token=secret", done


async def test_a_receiver_that_never_answers_is_a_retry_after_the_timeout():
    url, done = _serve_once(None)
    try:
        with pytest.raises(Retry, match="unreachable") as err:
            await post_webhook(_hook(url), b"s", timeout=0.3, policy=LOCAL)
        assert "secret" not in str(err.value)  # the URL's token stays out of the error
    finally:
        done.set()


@pytest.mark.parametrize(
    ("response", "status"),
    [
        (b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n", 302),
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", 503),
        (b"HTTP/1.1 401 No\r\nContent-Length: 0\r\n\r\n", 401),
    ],
)
async def test_a_non_2xx_answer_is_a_retry_and_redirects_are_not_followed(response, status):
    url, done = _serve_once(response)
    try:
        with pytest.raises(Retry, match=f"answered {status}"):
            await post_webhook(_hook(url), b"s", timeout=2, policy=LOCAL)
    finally:
        done.set()


async def test_a_refused_connection_is_a_retry():
    with pytest.raises(Retry, match="unreachable"):
        await post_webhook(_hook(f"http://127.0.0.1:{free_port()}/"), b"s", timeout=1, policy=LOCAL)


async def test_smtp_recipient_refused_for_good_is_permanent_and_a_dead_server_a_retry():
    from aiosmtpd.controller import Controller

    class Refuse:
        async def handle_RCPT(self, server, session, envelope, address, options):
            return "550 no such user"

    port = free_port()
    controller = Controller(Refuse(), hostname="127.0.0.1", port=port)
    controller.start()
    mail = Email("x@example.test", "s", "t", "k", "m", "device.error")
    try:
        with pytest.raises(PermanentError, match="refuses"):
            await send_email(mail, SmtpConfig("127.0.0.1", port, "n@example.test", 5))
    finally:
        controller.stop()
    with pytest.raises(Retry, match="SMTP"):
        await send_email(mail, SmtpConfig("127.0.0.1", free_port(), "n@example.test", 2))


async def test_a_loopback_receiver_is_refused_unless_allowed_and_then_gets_the_post():
    receiver = WebhookReceiver()
    try:
        hook = _hook(receiver.url)
        with pytest.raises(PermanentError, match="plain http is not allowed"):
            await post_webhook(hook, b"s", timeout=2, policy=TargetPolicy())
        with pytest.raises(PermanentError, match=r"resolves to 127\.0\.0\.1, loopback"):
            await post_webhook(hook, b"s", timeout=2, policy=TargetPolicy(allow_http=True))
        assert receiver.requests == []  # nothing was sent to a refused target
        await post_webhook(hook, receiver.SECRET.encode(), timeout=2, policy=LOCAL)
        [request] = receiver.requests
        assert request.signature_ok and request.status == 200
    finally:
        receiver.close()


async def test_the_connection_goes_to_the_checked_address_not_a_new_lookup():
    """DNS rebinding: the host name is looked up once per connection, every answer checked,
    and the connection goes to the checked address. Here the name cannot be resolved by the
    system at all (.invalid): the one lookup is the client's, and its second answer (an
    address that is not allowed) is never used while the connection stays open."""
    receiver = WebhookReceiver()
    answers = [["127.0.0.1"], ["10.9.9.9"]]
    looked_up: list[str] = []

    async def lookup(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return answers[min(len(looked_up), len(answers)) - 1]

    client = WebhookClient(receiver.SECRET.encode(), 2, LOCAL, lookup=lookup)
    try:
        port = receiver.server.server_address[1]
        for n in range(3):
            await client.post(
                Webhook(f"http://rebind.invalid:{port}/hooks", b"{}", f"k{n}", "t", "m")
            )
        assert looked_up == ["rebind.invalid"]  # one connection, reused
        assert [r.headers["Host"] for r in receiver.requests] == [f"rebind.invalid:{port}"] * 3
        assert all(r.signature_ok and r.status == 200 for r in receiver.requests)
    finally:
        await client.close()
        receiver.close()
    refused = WebhookClient(b"s", 2, LOCAL, lookup=lambda h, p: _const(["10.9.9.9"]))
    try:
        with pytest.raises(PermanentError, match=r"resolves to 10\.9\.9\.9, private"):
            await refused.post(_hook("http://rebind.invalid:1/hooks"))
    finally:
        await refused.close()


async def _const(value: list[str]) -> list[str]:
    return value


@pytest.fixture
def self_signed(tmp_path):
    """(key, cert) of a self-signed certificate for ``hooks.test``."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=hooks.test",
         "-addext", "subjectAltName=DNS:hooks.test"],
        check=True, capture_output=True, timeout=60,
    )
    return key, cert


async def test_https_verifies_the_certificate_for_the_url_host_on_the_checked_address(
    self_signed,
):
    """TLS goes to the checked address, names the URL's host (SNI) and verifies the
    certificate: a self-signed receiver is not trusted (a Retry, nothing delivered)."""
    key, cert = self_signed
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    names: list[str | None] = []
    server_ctx.sni_callback = lambda _sock, name, _ctx: names.append(name)
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(2)
    port = srv.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = srv.accept()
            with contextlib.suppress(OSError):
                server_ctx.wrap_socket(conn, server_side=True).close()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        with pytest.raises(Retry, match="CERTIFICATE_VERIFY_FAILED"):
            await post_webhook(_hook(f"https://127.0.0.1:{port}/x"), b"s", timeout=5, policy=LOCAL)
        with pytest.raises(Retry, match="CERTIFICATE_VERIFY_FAILED"):
            await post_webhook(
                _hook(f"https://hooks.test:{port}/x"), b"s", timeout=5, policy=LOCAL,
                lookup=lambda h, p: _const(["127.0.0.1"]),
            )
        assert names == [None, "hooks.test"]  # an IP URL sends no SNI; a host name does
    finally:
        srv.close()


async def test_a_dead_endpoint_is_given_up_on_after_its_failures_then_fails_at_once():
    import time

    from consumers.notifications.breaker import Breaker

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)  # accepts connections, never answers
    url = f"http://127.0.0.1:{srv.getsockname()[1]}/hook"
    client = WebhookClient(b"s", 0.3, LOCAL, breaker=Breaker(2, 30))
    try:
        for _ in range(2):
            assert client.refusal(url) is None  # still tried
            with pytest.raises(Retry, match="unreachable"):
                await client.post(_hook(url))
        refused = client.refusal(url)  # no body needed to know
        assert refused is not None and "keeps failing" in str(refused)
        # Not back before the probe after the 30 s cooldown can have answered (0.3 s).
        assert 30.1 < refused.after <= 30.3
        assert client.refusal("ftp://x/") is None  # a refused URL: post says why
        started = time.monotonic()
        with pytest.raises(Retry, match="keeps failing"):
            await client.post(_hook(url))
        assert time.monotonic() - started < 0.1  # no timeout waited
    finally:
        await client.close()
        srv.close()


async def test_on_drain_a_post_waiting_for_a_slot_is_not_sent_and_one_in_flight_finishes():
    import asyncio

    receiver = WebhookReceiver(delay=0.5)
    client = WebhookClient(receiver.SECRET.encode(), 5, LOCAL, per_endpoint=1)
    try:
        first = asyncio.create_task(client.post(_hook(receiver.url)))
        await asyncio.sleep(0.1)  # in flight, holding the endpoint's only slot
        second = asyncio.create_task(
            client.post(Webhook(receiver.url, b'{"a":1}', "key-2", "t", "m-2"))
        )
        await asyncio.sleep(0.1)
        client.drain()
        with pytest.raises(Retry, match="stopping"):
            await second
        await first  # delivered
        assert [r.headers["Idempotency-Key"] for r in receiver.requests] == ["key-1"]
    finally:
        await client.close()
        receiver.close()


def _serve_script(
    script: list[list[bytes | None]],
) -> tuple[str, list[list[bytes]], threading.Event]:
    """A socket server: connection ``n`` answers its requests with ``script[n]`` in turn
    (None: close without answering). Returns the URL, the requests seen per connection, and
    an event that ends it."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    seen: list[list[bytes]] = []
    done = threading.Event()

    def run() -> None:
        for answers in script:
            conn, _ = srv.accept()
            got: list[bytes] = []
            seen.append(got)
            for answer in answers:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                while len(body) < length:
                    body += conn.recv(65536)
                got.append(data)
                if answer is None:
                    break
                conn.sendall(answer)
            conn.close()
        done.wait(5)
        srv.close()

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}/hook", seen, done


async def test_a_connection_is_reused_and_one_closed_while_idle_is_replaced_once():
    """The server answers two POSTs on one connection (one chunked), then drops the third
    unanswered as a server closing an idle connection would: the client sends it again on
    a new connection, with the same idempotency key."""
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ok = b"HTTP/1.1 204 No Content\r\n\r\n"
    url, seen, done = _serve_script([[ok, chunked, None], [ok]])
    client = WebhookClient(b"s", 2, LOCAL)
    try:
        for n in range(3):
            await client.post(Webhook(url, b"{}", f"key-{n}", "t", f"m-{n}"))
        assert [len(c) for c in seen] == [3, 1]  # 2 answered + 1 dropped, then the resend
        assert b"Idempotency-Key: key-2" in seen[0][2] and seen[0][2] == seen[1][0]
    finally:
        await client.close()
        done.set()


async def test_a_new_connection_closed_without_an_answer_is_a_retry_not_a_resend():
    url, seen, done = _serve_script([[None]])
    client = WebhookClient(b"s", 2, LOCAL)
    try:
        with pytest.raises(Retry, match="unreachable"):
            await client.post(_hook(url))
        assert [len(c) for c in seen] == [1]
    finally:
        await client.close()
        done.set()


async def test_an_answer_that_is_not_http_is_a_retry():
    url, done = _serve_once(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    try:
        with pytest.raises(Retry, match="ProtocolError"):
            await post_webhook(_hook(url), b"s", timeout=2, policy=LOCAL)
    finally:
        done.set()


async def test_an_event_field_that_would_add_a_header_is_permanent():
    with pytest.raises(PermanentError, match="not a valid header value"):
        await post_webhook(
            Webhook("http://127.0.0.1:1/", b"{}", "k", "device.error\r\nX-Evil: 1", "m"),
            b"s", timeout=1, policy=LOCAL,
        )


async def test_a_connection_idle_longer_than_the_keepalive_is_closed_not_reused():
    """Each new connection looks the host up once: counting lookups counts connections."""
    from consumers.notifications.webhook_client import KEEPALIVE

    receiver = WebhookReceiver()
    now = [1000.0]
    looked_up: list[str] = []

    async def lookup(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return ["127.0.0.1"]

    client = WebhookClient(
        receiver.SECRET.encode(), 2, LOCAL, lookup=lookup, clock=lambda: now[0]
    )
    try:
        url = f"http://idle.invalid:{receiver.server.server_address[1]}/hooks"
        await client.post(Webhook(url, b"{}", "k0", "t", "m0"))
        now[0] += 1.0
        await client.post(Webhook(url, b"{}", "k1", "t", "m1"))
        assert len(looked_up) == 1  # reused
        now[0] += KEEPALIVE + 1.0
        await client.post(Webhook(url, b"{}", "k2", "t", "m2"))
        assert len(looked_up) == 2  # the idle one was closed, a new one opened
        assert [r.status for r in receiver.requests] == [200, 200, 200]
    finally:
        await client.close()
        receiver.close()
