"""The webhook client's HTTP/1.1 bytes: the request it sends, and its reading of answers
as real servers send them (fed whole and split at every byte)."""

from __future__ import annotations

import pytest

from consumers.notifications.http1 import (
    ProtocolError,
    Response,
    ResponseReader,
    header_value,
    request,
    request_head,
)

# Answers as servers send them: Python's http.server (HTTP/1.0, no length, ends with the
# close), nginx (keep-alive, length), a chunked one with an extension and a trailer, a
# 100 Continue before the answer, a 204, an explicit close.
HTTP_SERVER_10 = (
    b"HTTP/1.0 200 OK\r\nServer: BaseHTTP/0.6 Python/3.11.7\r\n"
    b"Date: Sun, 06 Dec 2026 19:00:00 GMT\r\n\r\nok"
)
NGINX = (
    b"HTTP/1.1 202 Accepted\r\nServer: nginx/1.24.0\r\nDate: Sun, 06 Dec 2026 19:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 11\r\nConnection: keep-alive\r\n\r\n"
    b'{"ok":true}'
)
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
    b"5;ext=1\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-Trailer: t\r\n\r\n"
)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
NO_CONTENT = b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"
CLOSE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"


def _read(data: bytes, step: int) -> tuple[Response | None, ResponseReader]:
    reader = ResponseReader()
    for i in range(0, len(data), step):
        got = reader.feed(data[i : i + step])
        if got is not None:
            assert i + step >= len(data)  # complete exactly at the end
            return got, reader
    return None, reader


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (NGINX, Response(202, True)),
        (CHUNKED, Response(200, True)),
        (CONTINUE, Response(201, True)),
        (NO_CONTENT, Response(204, True)),
        (CLOSE, Response(503, False)),
    ],
)
def test_framed_answers_are_complete_at_their_last_byte_however_split(data, expected):
    for step in (len(data), *range(1, 8)):
        got, _ = _read(data, step)
        assert got == expected, step


def test_an_answer_without_length_ends_with_the_close_and_is_not_reused():
    got, reader = _read(HTTP_SERVER_10, 3)
    assert got is None
    assert reader.eof() == Response(200, False)


def test_an_answer_cut_short_is_none_at_the_close():
    reader = ResponseReader()
    assert reader.eof() is None and not reader.started  # nothing came: not an answer
    assert reader.feed(NGINX[:-3]) is None
    assert reader.started and reader.eof() is None


def test_http10_keeps_the_connection_only_when_it_says_keep_alive():
    keep = b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 0\r\n\r\n"
    plain = b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert ResponseReader().feed(keep) == Response(200, True)
    assert ResponseReader().feed(plain) == Response(200, False)


def test_bytes_after_the_answer_make_the_connection_unusable():
    assert ResponseReader().feed(NGINX + b"HTTP/1.1 200 OK\r\n") == Response(202, False)


def test_chunked_wins_over_a_length_and_another_coding_reads_until_close():
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert ResponseReader().feed(both) == Response(200, True)
    gzip = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxxxx"
    reader = ResponseReader()
    assert reader.feed(gzip) is None
    assert reader.eof() == Response(200, False)


@pytest.mark.parametrize(
    "data",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/2 200\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nab\r\n",
    ],
)
def test_malformed_answers_are_protocol_errors(data):
    with pytest.raises(ProtocolError):
        ResponseReader().feed(data)


def test_a_head_that_never_ends_is_refused():
    reader = ResponseReader()
    reader.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ProtocolError, match="too long"):
        reader.feed(b"X: " + b"a" * 70_000)


def test_the_request_is_one_post_with_its_length_and_checked_headers():
    head = request_head("hooks.example", 8443, 443, "/in/ü x?token=a%2Fb", "agent/1")
    data = request(head, [("Idempotency-Key", "k-1"), ("X-CDC-Event-Type", "device.error")],
                   b'{"a":1}')
    assert data == (
        b"POST /in/%C3%BC%20x?token=a%2Fb HTTP/1.1\r\nHost: hooks.example:8443\r\n"
        b"Content-Type: application/json\r\nUser-Agent: agent/1\r\n"
        b"Idempotency-Key: k-1\r\nX-CDC-Event-Type: device.error\r\n"
        b'Content-Length: 7\r\n\r\n{"a":1}'
    )
    assert request_head("::1", 443, 443, "/", "a").startswith(b"POST / HTTP/1.1\r\nHost: [::1]\r\n")


def test_an_internationalised_host_goes_in_its_ascii_form_and_utf8_values_pass():
    head = request_head("b\u00fccher.example", 443, 443, "/", "a")
    assert b"Host: xn--bcher-kva.example\r\n" in head
    assert request(b"", [("X-CDC-Event-Type", "caf\u00e9")], b"").startswith(
        "X-CDC-Event-Type: caf\u00e9\r\n".encode()
    )


@pytest.mark.parametrize(
    "value",
    ["a\r\nX-Injected: 1", "a\nb", "nul\x00", "tab\there", "d\x7f", "caf\u00e9\r\nX: 1",
     "\u00fc\x7f"],
)
def test_an_event_field_cannot_add_a_header(value):
    with pytest.raises(ValueError, match="not a valid header value"):
        header_value(value)
    with pytest.raises(ValueError):
        request(b"", [("X-CDC-Event-Type", value)], b"")
