"""A small confirm-mode AMQP publisher: one connection, one channel, pipelined confirms.

Why not aiormq's ``basic_publish``: it builds pamqp objects, a future, a lock round and a
socket write per message, about 200 µs of CPU each, which caps a client at half of what
the broker takes. Here a publish is a few bytes appended to an outgoing buffer that is
written once per event-loop turn, and confirms are tracked by delivery tag in a deque.

Contract:

* :meth:`ConfirmChannel.connect` opens the connection (PLAIN auth, heartbeats, ``amqps``
  with the default TLS checks), opens channel 1 and puts it in confirm mode. Any failure
  raises :class:`~cdc.errors.SinkError`.
* :meth:`ConfirmChannel.publish` takes the encoded frames of one mandatory publish
  (:func:`cdc.amqp_frames.publish_frames`) and an opaque ``token``. Frames go out in call
  order on the one channel. For every publish exactly one of two callbacks runs once:
  ``on_ack`` (batched: a list of tokens, in publish order) when the broker confirms it, or
  ``on_returned(token, reason)`` when it was returned as unroutable and then confirmed. A
  nack re-publishes the same frames after a short backoff; so does a confirm that does not
  come within ``confirm_timeout`` while the broker is otherwise heard from (a late confirm
  of the old copy is then ignored). The confirm clock stops while the broker blocks
  publishers (``connection.blocked``); ``on_blocked(bool)`` reports both transitions.
* :attr:`ConfirmChannel.closed` completes with a :class:`SinkError` as soon as the
  connection is lost, the broker closes it or the channel, nothing (not even a heartbeat)
  arrives for two heartbeat intervals, a confirm times out on a connection from which
  nothing arrived since that publish, or :meth:`fail` is called; with a
  :class:`~cdc.errors.RefusedError` (not retried) when the broker refuses the login, the
  vhost or a permission, or its TLS certificate does not verify. A silent connection is
  never written to again: nothing is re-sent into it, so what is buffered stays bounded
  by the window. Unconfirmed tokens are then dropped without a callback: the relay
  re-reads them from the replication slot.
* The socket has TCP keepalives on (``_KEEPALIVE``), so a peer that vanished without a
  word is noticed by the kernel too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from pamqp import base, commands

from cdc import amqp_frames as wire
from cdc.errors import CdcError, ConfigError, RefusedError, SinkError
from cdc.service.refusals import amqp_refusal, tls_hint
from cdc.urls import parse_amqp_url

log = logging.getLogger(__name__)

_CHANNEL = 1
_FRAME_MAX = 131072
_CONNECT_TIMEOUT = 10.0
# TCP keepalive: first probe after 10 s idle, then every 5 s, dead after 3 unanswered.
_KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
_RETRY_FIRST, _RETRY_MAX = 0.05, 5.0
_CLIENT_PROPERTIES: dict[str, Any] = {
    "product": "outbox-cdc",
    "capabilities": {
        "publisher_confirms": True,
        "basic.nack": True,
        "connection.blocked": True,
        "authentication_failure_close": True,
    },
}


def _set_keepalive(sock: Any) -> None:
    """Turn TCP keepalives on (where the platform has the options)."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _KEEPALIVE:
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class _Pending:
    """One publish awaiting its confirm."""

    __slots__ = ("attempts", "exchange", "frames", "message_id", "returned", "routing_key",
                 "sent", "token")  # fmt: skip

    def __init__(
        self, frames: wire.Frames, token: Any, exchange: str, routing_key: str, message_id: str
    ) -> None:
        self.frames = frames
        self.token = token
        self.exchange = exchange
        self.routing_key = routing_key
        self.message_id = message_id
        self.sent = 0.0
        self.attempts = 0
        self.returned: str | None = None


class ConfirmChannel(asyncio.Protocol):
    """See the module docstring."""

    def __init__(
        self,
        *,
        confirm_timeout: float,
        on_ack: Callable[[list[Any]], None],
        on_returned: Callable[[Any, str], None],
        on_republish: Callable[[str], None],
        on_blocked: Callable[[bool], None] | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._confirm_timeout = confirm_timeout
        self._on_ack = on_ack
        self._on_returned = on_returned
        self._on_republish = on_republish
        self._on_blocked = on_blocked
        self._transport: asyncio.Transport | None = None
        self._reader = wire.FrameReader()
        self.frame_max = _FRAME_MAX
        self._heartbeat = 0
        self._out: list[wire.Frames] = []
        self._out_pieces = False  # _out holds the pieces of a large body (not to be joined)
        self._flush_handle: asyncio.Handle | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._pending: deque[_Pending | None] = deque()
        self._base_tag = 1  # delivery tag of _pending[0]
        self._next_tag = 1
        # Replies to synchronous methods (and Connection.Start), in arrival order.
        self._replies: deque[base.Frame] = deque()
        self._reply_ready: asyncio.Future[None] = self._loop.create_future()
        self._returning: tuple[commands.Basic.Return, int] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = self._blocked = False
        self._last_read = self._last_write = time.monotonic()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        # A session that ends for another reason must not log "exception never retrieved".
        self.closed.add_done_callback(lambda f: f.cancelled() or f.exception())

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        confirm_timeout: float,
        on_ack: Callable[[list[Any]], None],
        on_returned: Callable[[Any, str], None],
        on_republish: Callable[[str], None],
        on_blocked: Callable[[bool], None] | None = None,
    ) -> ConfirmChannel:
        """Connect to ``url`` and return a channel in confirm mode (SinkError on failure)."""
        try:
            parts = parse_amqp_url(url)
        except ValueError as exc:
            raise ConfigError(f"CDC_AMQP_URL {exc}") from None
        tls = ssl.create_default_context(cafile=parts.cafile) if parts.tls else None
        channel = cls(
            confirm_timeout=confirm_timeout,
            on_ack=on_ack,
            on_returned=on_returned,
            on_republish=on_republish,
            on_blocked=on_blocked,
        )
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(_CONNECT_TIMEOUT):
                await loop.create_connection(lambda: channel, parts.host, parts.port, ssl=tls)
                await channel._open(parts.user, parts.password, parts.vhost, parts.heartbeat)
        except ssl.SSLCertVerificationError as exc:
            refused = RefusedError(f"cannot connect to the broker: {exc}: {tls_hint()}")
            channel._fail(refused)
            raise refused from exc
        except RefusedError:
            raise
        except (OSError, TimeoutError, SinkError) as exc:
            cause = channel._error() if channel.closed.done() else exc
            error = SinkError(f"cannot connect to the broker: {cause!r}")
            channel._fail(error)
            raise error from exc
        except BaseException:
            channel._fail(SinkError("connecting was cancelled"))
            raise
        return channel

    async def _open(self, user: str, password: str, vhost: str, heartbeat: int) -> None:
        start = await self._call(None, commands.Connection.Start, channel=0)
        assert isinstance(start, commands.Connection.Start)
        if b"PLAIN" not in (start.mechanisms or "").encode().split():
            raise SinkError(f"the broker offers no PLAIN login ({start.mechanisms})")
        ok = commands.Connection.StartOk(
            client_properties=_CLIENT_PROPERTIES,
            mechanism="PLAIN",
            response=f"\0{user}\0{password}",
        )
        tune = await self._call(ok, commands.Connection.Tune, channel=0)
        assert isinstance(tune, commands.Connection.Tune)
        self.frame_max = min(tune.frame_max or _FRAME_MAX, _FRAME_MAX)
        self._reader.set_frame_max(self.frame_max)
        self._heartbeat = heartbeat
        tune_ok = commands.Connection.TuneOk(
            channel_max=tune.channel_max, frame_max=self.frame_max, heartbeat=heartbeat
        )
        self._write(wire.method_frame(0, tune_ok))
        open_vhost = commands.Connection.Open(virtual_host=vhost)
        await self._call(open_vhost, commands.Connection.OpenOk, channel=0)
        await self._call(commands.Channel.Open(), commands.Channel.OpenOk)
        await self._call(commands.Confirm.Select(), commands.Confirm.SelectOk)
        self._schedule_tick()

    async def declare_exchange(self, name: str, kind: str) -> None:
        """Declare a durable exchange (SinkError if it exists with other settings)."""
        method = commands.Exchange.Declare(exchange=name, exchange_type=kind, durable=True)
        await self._call(method, commands.Exchange.DeclareOk)

    async def declare_queue(self, name: str) -> None:
        """Declare a durable queue."""
        await self._call(commands.Queue.Declare(queue=name, durable=True), commands.Queue.DeclareOk)

    async def _call(
        self, method: base.Frame | None, reply: type[base.Frame], channel: int = _CHANNEL
    ) -> base.Frame:
        """Send ``method`` (if any) and wait for ``reply``; only while nothing is published."""
        if method is not None:
            self._write(wire.method_frame(channel, method))
        while not self._replies:
            if self.closed.done():
                raise self._error()
            if self._reply_ready.done():
                self._reply_ready = self._loop.create_future()
            waiting: set[asyncio.Future[None]] = {self._reply_ready, self.closed}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        frame = self._replies.popleft()
        if not isinstance(frame, reply):
            raise SinkError(f"expected {reply.name} from the broker, got {frame.name}")
        return frame

    # -- publishing ----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Publishes not yet settled (confirmed, returned or given up with the connection)."""
        return self._next_tag - self._base_tag

    def publish(
        self, frames: wire.Frames, token: Any, exchange: str, routing_key: str, message_id: str
    ) -> None:
        """Queue one publish; it is written at the end of this event-loop turn."""
        if self.closed.done():
            raise self._error()
        self._send(_Pending(frames, token, exchange, routing_key, message_id))

    def _send(self, entry: _Pending) -> None:
        entry.sent = time.monotonic()
        self._pending.append(entry)
        self._next_tag += 1
        self._out.append(entry.frames)
        if type(entry.frames) is tuple:
            self._out_pieces = True
        if self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_handle = None
        if self._out and self._transport is not None and not self.closed.done():
            if self._out_pieces:
                self._out_pieces = False
                # A large body: its pieces go as they are (joining would copy it).
                pieces: list[bytes | memoryview] = []
                for f in self._out:
                    if isinstance(f, tuple):
                        pieces.extend(f)
                    else:
                        pieces.append(f)
                self._out.clear()
                self._transport.writelines(pieces)
                self._last_write = time.monotonic()
                return
            data = b"".join(self._out)  # type: ignore[arg-type]  # only bytes on this path
            self._out.clear()
            self._write(data)

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)
            self._last_write = time.monotonic()

    async def wait_writable(self) -> None:
        """Wait while the socket buffer is full or the broker blocks publishers."""
        if not self._writable.is_set():
            waiter = asyncio.ensure_future(self._writable.wait())
            waiting: set[asyncio.Future[Any]] = {waiter, self.closed}
            try:
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
        if self.closed.done():
            raise self._error()

    def _update_writable(self) -> None:
        if self._paused or self._blocked:
            self._writable.clear()
        else:
            self._writable.set()

    # -- confirms ------------------------------------------------------------------------------

    def _settle(self, tag: int, multiple: bool) -> list[_Pending]:
        """Take the entries a confirm with ``tag`` covers out of the pending deque."""
        pending = self._pending
        settled: list[_Pending] = []
        if multiple:
            for _ in range(min(tag - self._base_tag + 1, len(pending))):
                entry = pending.popleft()
                self._base_tag += 1
                if entry is not None:
                    settled.append(entry)
        else:
            index = tag - self._base_tag
            if 0 <= index < len(pending):
                entry = pending[index]
                pending[index] = None
                if entry is not None:
                    settled.append(entry)
        while pending and pending[0] is None:
            pending.popleft()
            self._base_tag += 1
        return settled

    def _acked(self, tag: int, multiple: bool) -> None:
        settled = self._settle(tag, multiple)
        tokens = [e.token for e in settled if e.returned is None]
        if tokens:
            self._on_ack(tokens)
        for entry in settled:
            if entry.returned is not None:
                self._on_returned(entry.token, entry.returned)

    def _nacked(self, tag: int, multiple: bool) -> None:
        settled = self._settle(tag, multiple)
        if settled:
            log.warning("broker nacked %d publish(es); publishing again", len(settled))
        for entry in settled:
            self._on_republish("nack")
            entry.attempts += 1
            entry.returned = None
            delay = min(_RETRY_FIRST * 2 ** (entry.attempts - 1), _RETRY_MAX)
            self._loop.call_later(delay * (0.5 + random.random()), self._resend, entry)

    def _resend(self, entry: _Pending) -> None:
        if not self.closed.done():
            self._send(entry)

    def _returned(self, method: commands.Basic.Return, message_id: str | None) -> None:
        # Returns come in publish order, each before its message's confirm: the oldest
        # unreturned pending publish with the same exchange, key and id is the one.
        reason = f"unroutable: {method.reply_code} {method.reply_text}".rstrip()
        for entry in self._pending:
            if (
                entry is not None
                and entry.returned is None
                and entry.routing_key == method.routing_key
                and entry.exchange == method.exchange
                and entry.message_id == (message_id or "")
            ):
                entry.returned = reason
                return
        log.warning("basic.return for no pending publish", extra={"key": method.routing_key})

    def _expire(self, now: float) -> None:
        """Handle publishes that waited longer than ``confirm_timeout`` for their confirm.

        If nothing at all came from the broker since the oldest of them was sent, the
        connection is dead: end it (re-sending into it would only grow the buffer and the
        duplicates). Otherwise the broker is alive and lost track of them: publish again.
        """
        if self._blocked:
            return  # a blocked broker reads nothing we send; the clock restarts on unblock
        limit = now - self._confirm_timeout
        pending = self._pending
        expired = 0
        for index, entry in enumerate(pending):
            if entry is None:
                continue
            if entry.sent > limit:
                break
            if self._last_read < entry.sent:
                self._fail(
                    SinkError(
                        f"no confirm and no frame at all from the broker in "
                        f"{now - entry.sent:.0f}s; the connection is presumed dead"
                    )
                )
                return
            pending[index] = None
            self._on_republish("timeout")
            entry.returned = None
            self._loop.call_soon(self._resend, entry)
            expired += 1
        if expired:
            log.warning("%d publish(es) got no confirm in time; publishing again", expired)
        while pending and pending[0] is None:
            pending.popleft()
            self._base_tag += 1

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
        _set_keepalive(transport.get_extra_info("socket"))
        self._transport.write(wire.PROTOCOL_HEADER)

    def data_received(self, data: bytes) -> None:
        self._last_read = time.monotonic()
        try:
            for kind, channel, payload in self._reader.feed(data):
                if kind == wire.METHOD:
                    self._on_method(channel, payload)
                elif kind != wire.HEARTBEAT_TYPE:
                    self._on_content(kind, payload)
        except SinkError as exc:
            self._fail(exc)

    def _on_method(self, channel: int, payload: bytes) -> None:
        which = wire.method_id(payload)
        if which == wire.ACK or which == wire.NACK:
            _, tag, multiple, _ = wire.parse_confirm(payload)
            if which == wire.ACK:
                self._acked(tag, multiple)
            else:
                self._nacked(tag, multiple)
            return
        method = wire.decode_method(channel, payload)
        if isinstance(method, commands.Connection.Close | commands.Channel.Close):
            reply = commands.Connection.CloseOk() if channel == 0 else commands.Channel.CloseOk()
            self._write(wire.method_frame(channel, reply))
            side = "connection" if channel == 0 else "channel"
            text = f"broker closed the {side}: {method.reply_code} {method.reply_text}"
            hint = amqp_refusal(method.reply_code or 0)
            error = SinkError(text) if hint is None else RefusedError(f"{text}: {hint}")
            self._fail(error, graceful=True)
        elif isinstance(method, commands.Basic.Return):
            self._returning = (method, -1)
        elif isinstance(method, commands.Connection.Blocked | commands.Connection.Unblocked):
            self._set_blocked(method)
        else:
            self._replies.append(method)
            if not self._reply_ready.done():
                self._reply_ready.set_result(None)

    def _set_blocked(self, method: base.Frame) -> None:
        blocked = isinstance(method, commands.Connection.Blocked)
        if blocked == self._blocked:
            return
        self._blocked = blocked
        if blocked:
            reason = getattr(method, "reason", "") or "no reason given"
            log.warning("broker blocks publishers (%s)", reason)
        else:
            log.warning("broker unblocks publishers")
            # Whatever waited did so because of the block: restart its confirm clock.
            now = time.monotonic()
            for entry in self._pending:
                if entry is not None:
                    entry.sent = now
        self._update_writable()
        if self._on_blocked is not None:
            self._on_blocked(blocked)

    def _on_content(self, kind: int, payload: bytes) -> None:
        if self._returning is None:
            raise SinkError("content frame outside a returned message")
        method, left = self._returning
        if kind == wire.CONTENT_HEADER:
            content = wire.decode_header(payload)
            self._returned(method, content.properties.message_id)
            left = content.body_size
        else:
            left -= len(payload)
        self._returning = (method, left) if left > 0 else None

    def pause_writing(self) -> None:
        self._paused = True
        self._update_writable()

    def resume_writing(self) -> None:
        self._paused = False
        self._update_writable()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._fail(SinkError(f"broker connection lost: {exc or 'closed by the peer'}"))

    # -- liveness and closing --------------------------------------------------------------------

    def _schedule_tick(self) -> None:
        period = min(1.0, self._confirm_timeout / 4)
        if self._heartbeat:
            period = min(period, self._heartbeat / 2)
        self._tick_handle = self._loop.call_later(period, self._tick)

    def _tick(self) -> None:
        if self.closed.done():
            return
        now = time.monotonic()
        if self._heartbeat:
            if now - self._last_read > 2 * self._heartbeat:
                self._fail(SinkError(f"no heartbeat from the broker in {2 * self._heartbeat}s"))
                return
            if now - self._last_write >= self._heartbeat / 2:
                self._write(wire.HEARTBEAT)
        self._expire(now)
        self._schedule_tick()

    def _error(self) -> CdcError:
        closed = self.closed
        exc = closed.exception() if closed.done() and not closed.cancelled() else None
        if isinstance(exc, SinkError | RefusedError):
            return exc
        return SinkError("broker channel is closed")

    def fail(self, exc: SinkError) -> None:
        """End the connection with ``exc`` as the reason (:attr:`closed` carries it)."""
        self._fail(exc)

    def _fail(self, exc: CdcError, *, graceful: bool = False) -> None:
        if not self.closed.done():
            self.closed.set_exception(exc)
        for handle in (self._tick_handle, self._flush_handle):
            if handle is not None:
                handle.cancel()
        self._writable.set()  # wake waiters; they see `closed`
        if self._transport is not None:
            # graceful: let the Close-Ok we just queued reach the broker
            (self._transport.close if graceful else self._transport.abort)()
            self._transport = None

    async def close(self) -> None:
        """Close politely (Connection.Close, wait briefly for Close-Ok), then drop the socket."""
        if self.closed.done() or self._transport is None:
            self._fail(SinkError("broker channel is closed"))
            return
        self._flush()
        self._replies.clear()
        bye = commands.Connection.Close(200, "relay session ends", 0, 0)
        with contextlib.suppress(TimeoutError, SinkError):
            async with asyncio.timeout(2):
                await self._call(bye, commands.Connection.CloseOk, channel=0)
        self._fail(SinkError("broker channel is closed"))
