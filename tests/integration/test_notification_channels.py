"""The external channels against real local sockets: what is a delivery, what is retried,
what is permanent. (No broker or database: the channel functions alone.)"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading

import pytest
from conftest import WebhookReceiver, free_port

from consumers.errors import PermanentError, Retry
from consumers.notifications.channels import (
    Email,
    SmtpConfig,
    Webhook,
    pinned_connection,
    post_webhook,
    send_email,
)
from consumers.notifications.targets import TargetPolicy, parse_networks, webhook_target

pytestmark = pytest.mark.integration

#: The test servers listen on loopback: allowed explicitly, as an operator would.
LOCAL = TargetPolicy(allow_http=True, allowed_networks=parse_networks(["127.0.0.1/32"]))


def _hook(url: str) -> Webhook:
    return Webhook(url, b'{"a":1}', "key-1", "device.error", "m-1")


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


def test_the_connection_goes_to_the_checked_address_not_a_new_lookup():
    """DNS rebinding: the host name is never looked up again after the check. Here it
    cannot be resolved at all (.invalid), yet the request reaches the checked address and
    names the host in ``Host``."""
    receiver = WebhookReceiver()
    try:
        port = receiver.server.server_address[1]
        target = webhook_target(f"http://rebind.invalid:{port}/hooks", LOCAL)
        conn = pinned_connection(target, "127.0.0.1", 2)
        try:
            conn.request("POST", target.path, body=b"{}")
            assert conn.getresponse().status == 401  # reached; unsigned, so refused there
        finally:
            conn.close()
        [request] = receiver.requests
        assert request.headers["Host"] == f"rebind.invalid:{port}"
    finally:
        receiver.close()


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
        target = webhook_target(f"https://hooks.test:{port}/x", LOCAL)
        conn = pinned_connection(target, "127.0.0.1", 5)
        with pytest.raises(ssl.SSLCertVerificationError):
            conn.request("POST", target.path, body=b"{}")
        conn.close()
        assert names == [None, "hooks.test"]  # an IP URL sends no SNI; a host name does
    finally:
        srv.close()
