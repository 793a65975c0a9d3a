"""The external channels against real local sockets: what is a delivery, what is retried,
what is permanent. (No broker or database: the channel functions alone.)"""

from __future__ import annotations

import socket
import threading

import pytest
from conftest import free_port

from consumers.errors import PermanentError, Retry
from consumers.notifications.channels import Email, SmtpConfig, Webhook, post_webhook, send_email

pytestmark = pytest.mark.integration


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
            await post_webhook(_hook(url), b"s", timeout=0.3)
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
            await post_webhook(_hook(url), b"s", timeout=2)
    finally:
        done.set()


async def test_a_refused_connection_is_a_retry():
    with pytest.raises(Retry, match="unreachable"):
        await post_webhook(_hook(f"http://127.0.0.1:{free_port()}/"), b"s", timeout=1)


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
