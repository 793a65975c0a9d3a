"""HTTP/1.1 for webhook POSTs, as bytes (pure, no I/O): the request we send and an
incremental reader of the response.

The webhook client needs little of HTTP: it sends one small POST at a time on a keep-alive
connection and needs from the answer only its status, where it ends (``Content-Length``,
``Transfer-Encoding: chunked``, or the connection's close) and whether the connection may
carry the next request. The body is read and discarded. Anything malformed is a
:class:`ProtocolError` (the connection is then dropped and the send retried).

Rules:

- the request line and headers that do not change for a URL are rendered once
  (:func:`request_head`; an internationalised host name in its IDNA form); values that come
  from events (event type, message id) must be one line without control characters
  (:func:`header_value`), so no event can add a header;
- ``1xx`` answers before the final one are skipped; ``204``, ``304`` have no body;
- the connection is reused only after an HTTP/1.1 answer without ``Connection: close``
  (or an HTTP/1.0 one with ``Connection: keep-alive``) whose end was known from its
  framing, and when nothing followed it (no request of ours was pipelined).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

#: The status line and headers of an answer may not exceed this (bytes).
MAX_HEAD = 65536
_STATUS = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\r\n]*)?")
_NO_CONTROL = re.compile(r"[^\x00-\x1f\x7f]*")
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]{1,16})(?:;[^\r\n]*)?")
# What a path and query may keep as they are; the rest (spaces, non-ASCII) is %-escaped.
_PATH_SAFE = "!#$%&'()*+,/:;=?@[]~"


class ProtocolError(ValueError):
    """The answer is not HTTP/1.x as the client reads it."""


def header_value(value: str) -> str:
    """``value`` if it may be sent as a header value: one line, no control character
    (sent as UTF-8)."""
    # ASCII without control characters is printable ASCII: checked without the regex.
    if not (value.isascii() and value.isprintable()) and not _NO_CONTROL.fullmatch(value):
        raise ValueError(f"not a valid header value: {value[:80]!r}")
    return value


def request_head(host: str, port: int, default_port: int, path: str, user_agent: str) -> bytes:
    """The part of a POST to ``host:port`` + ``path`` that is the same for every request:
    the request line, ``Host``, ``Content-Type`` and ``User-Agent`` (no final blank line)."""
    if not host.isascii():  # an internationalised name: its ASCII form
        host = host.encode("idna").decode("ascii")
    authority = f"[{host}]" if ":" in host else host
    if port != default_port:
        authority += f":{port}"
    target = urllib.parse.quote(path, safe=_PATH_SAFE)
    return (
        f"POST {target} HTTP/1.1\r\nHost: {header_value(authority)}\r\n"
        f"Content-Type: application/json\r\nUser-Agent: {header_value(user_agent)}\r\n"
    ).encode("ascii")


def request(head: bytes, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """The whole request: ``head``, then ``headers`` (values checked), the length, ``body``."""
    lines = "".join(f"{name}: {header_value(value)}\r\n" for name, value in headers)
    return b"".join(
        (head, lines.encode(), b"Content-Length: %d\r\n\r\n" % len(body), body)
    )


@dataclass(frozen=True, slots=True)
class Response:
    """A complete answer: its status, and whether the connection may carry another request."""

    status: int
    reusable: bool


# Where the reader is within one answer.
_HEAD, _LENGTH, _CHUNK_HEAD, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE = range(7)


class ResponseReader:
    """Reads one answer from the bytes of a connection, fed as they arrive.

    :meth:`feed` returns the :class:`Response` once complete (None: needs more bytes);
    :meth:`eof` is called when the server closed the connection and returns the answer if
    its end was the close. One reader per request."""

    __slots__ = ("_buf", "_keep", "_left", "_state", "_status", "started")

    def __init__(self) -> None:
        self._buf = b""
        self._state = _HEAD
        self._left = 0
        self._status = 0
        self._keep = False
        self.started = False  # any byte of the answer arrived

    def feed(self, data: bytes) -> Response | None:
        """Take ``data``; the answer once it is complete (bytes after it: not reusable)."""
        if data:
            self.started = True
        buf = self._buf + data if self._buf else data
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ProtocolError("the answer's head is too long")
                    self._buf = buf
                    return None
                head, buf = buf[:end], buf[end + 4 :]
                if self._head(head):
                    continue  # a 1xx: the real answer follows
            elif state == _LENGTH:
                if len(buf) < self._left:
                    self._left -= len(buf)
                    self._buf = b""
                    return None
                buf = buf[self._left :]
                return self._done(buf)
            elif state == _UNTIL_CLOSE:
                self._buf = b""
                return None
            elif state in (_CHUNK_HEAD, _TRAILER):
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise ProtocolError("a chunk size or trailer line is too long")
                    self._buf = buf
                    return None
                line, buf = buf[:end], buf[end + 2 :]
                if state == _TRAILER:
                    if not line:
                        return self._done(buf)
                    continue
                match = _CHUNK_SIZE.fullmatch(line.strip())
                if match is None:
                    raise ProtocolError(f"bad chunk size line {line[:40]!r}")
                self._left = int(match.group(1), 16)
                self._state = _CHUNK_DATA if self._left else _TRAILER
            elif state == _CHUNK_DATA:
                if len(buf) < self._left:
                    self._left -= len(buf)
                    self._buf = b""
                    return None
                buf = buf[self._left :]
                self._state = _CHUNK_END
            else:  # _CHUNK_END: the CRLF after a chunk's data
                if len(buf) < 2:
                    self._buf = buf
                    return None
                if buf[:2] != b"\r\n":
                    raise ProtocolError("a chunk's data is not followed by CRLF")
                buf = buf[2:]
                self._state = _CHUNK_HEAD

    def eof(self) -> Response | None:
        """The server closed the connection: the answer if that was its end, else None
        (the answer was cut short, or none came)."""
        if self._state == _UNTIL_CLOSE:
            return Response(self._status, False)
        return None

    def _head(self, head: bytes) -> bool:
        """Parse a status line and headers; True if it was a 1xx (skip it)."""
        lines = head.split(b"\r\n")
        match = _STATUS.fullmatch(lines[0])
        if match is None:
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
        minor, status = match.group(1), int(match.group(2))
        if 100 <= status < 200:
            return True
        length: int | None = None
        codings: list[bytes] = []
        connection = b""
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise ProtocolError(f"bad header line {line[:60]!r}")
            key = name.lower()
            if key == b"content-length":
                try:
                    n = int(value.strip())
                except ValueError:
                    raise ProtocolError("bad Content-Length") from None
                if n < 0 or (length is not None and n != length):
                    raise ProtocolError("bad Content-Length")
                length = n
            elif key == b"transfer-encoding":
                codings += [c.strip() for c in value.lower().split(b",")]
            elif key == b"connection":
                connection += b"," + value.lower()
        tokens = {t.strip() for t in connection.split(b",")}
        self._status = status
        self._keep = b"close" not in tokens and (minor == b"1" or b"keep-alive" in tokens)
        if status in (204, 304):
            self._state, self._left = _LENGTH, 0
        elif codings and codings[-1] == b"chunked":
            self._state = _CHUNK_HEAD
        elif length is not None and not codings:
            self._state, self._left = _LENGTH, length
        else:
            self._state, self._keep = _UNTIL_CLOSE, False
        return False

    def _done(self, rest: bytes) -> Response:
        self._buf = b""
        # Bytes after the answer belong to no request of ours: do not trust the connection.
        return Response(self._status, self._keep and not rest)
