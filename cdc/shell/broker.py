"""The broker connection: a confirm-mode AMQP channel as a thin ``asyncio.Protocol``.

A publish is a few pre-encoded bytes appended to a buffer written once per event-loop turn
(aiormq's ``basic_publish`` costs about 200 µs of CPU per message: pamqp objects, a future,
a lock round and a write each), or with a ``linger`` that many seconds after the first of
them (sooner once the buffer holds :data:`LINGER_BYTES`): at a paced rate one write per few
transactions instead of one each costs the broker far less per message (fewer, larger
batches through its queues), for a few milliseconds of latency. This shell does the frame
reading, the write batching and the liveness clock (the handshake: ``broker_connect``);
which publish a confirm, a nack or a return is about, and what to re-send when, the pure
:class:`~cdc.core.confirms.ConfirmTracker` decides.

Contract:

* :func:`cdc.shell.broker_connect.connect` opens the connection and returns the channel in
  confirm mode.
* :meth:`ConfirmChannel.publish` takes the encoded frames of one mandatory publish
  (:func:`cdc.wire.amqp.publish_frames`) and an opaque ``token``. Frames go out in call
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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from pamqp import base, commands

from cdc.core.confirms import ConfirmTracker, Publish
from cdc.errors import CdcError, RefusedError, SinkError
from cdc.service.refusals import amqp_refusal
from cdc.wire import amqp as wire

log = logging.getLogger(__name__)

_CHANNEL = 1
FRAME_MAX = 131072
#: With a linger, buffered publishes are written as soon as they reach this many bytes.
LINGER_BYTES = 65536


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
        linger: float = 0.0,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._tracker: ConfirmTracker[wire.Frames, Any] = ConfirmTracker(confirm_timeout)
        self._on_ack = on_ack
        self._on_returned = on_returned
        self._on_republish = on_republish
        self._on_blocked = on_blocked
        self._transport: asyncio.Transport | None = None
        self._reader = wire.FrameReader()
        self.frame_max = FRAME_MAX
        self._heartbeat = 0
        self._out: list[wire.Frames] = []
        self._out_pieces = False  # _out holds the pieces of a large body (not to be joined)
        self._out_bytes = 0
        self._linger = linger
        self._flush_handle: asyncio.Handle | None = None
        self._flush_soon = False  # _flush_handle runs at the end of this turn, not later
        self._tick_handle: asyncio.TimerHandle | None = None
        # Replies to synchronous methods (and Connection.Start), in arrival order.
        self._replies: deque[base.Frame] = deque()
        self._reply_ready: asyncio.Future[None] = self._loop.create_future()
        self._returns = wire.ReturnReader()
        self._writable = asyncio.Event()
        self._writable.set()
        self._paused = False
        self._last_read = self._last_write = time.monotonic()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        # A session that ends for another reason must not log "exception never retrieved".
        self.closed.add_done_callback(lambda f: f.cancelled() or f.exception())

    # -- opening (the handshake itself: cdc/shell/broker_connect.py) ---------------------------

    def tuned(self, tune_ok: commands.Connection.TuneOk, heartbeat: int) -> None:
        """Take the negotiated frame size and heartbeat, and send ``tune_ok``."""
        self.frame_max = tune_ok.frame_max
        self._reader.set_frame_max(self.frame_max)
        self._heartbeat = heartbeat
        self._write(wire.method_frame(0, tune_ok))

    def opened(self) -> None:
        """The channel is in confirm mode: start the liveness and confirm clock."""
        self._schedule_tick()

    async def declare_exchange(self, name: str, kind: str) -> None:
        """Declare a durable exchange (SinkError if it exists with other settings)."""
        method = commands.Exchange.Declare(exchange=name, exchange_type=kind, durable=True)
        await self.call(method, commands.Exchange.DeclareOk)

    async def declare_queue(self, name: str) -> None:
        """Declare a durable queue."""
        await self.call(commands.Queue.Declare(queue=name, durable=True), commands.Queue.DeclareOk)

    async def call(
        self, method: base.Frame | None, reply: type[base.Frame], channel: int = _CHANNEL
    ) -> base.Frame:
        """Send ``method`` (if any) and wait for ``reply``; only while nothing is published."""
        if method is not None:
            self._write(wire.method_frame(channel, method))
        while not self._replies:
            if self.closed.done():
                raise self.error()
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
        return self._tracker.in_flight

    def publish(
        self, frames: wire.Frames, token: Any, exchange: str, routing_key: str, message_id: str
    ) -> None:
        """Queue one publish: written at the end of this loop turn, or when a linger ends."""
        if self.closed.done():
            raise self.error()
        self._tracker.publish(frames, token, exchange, routing_key, message_id, time.monotonic())
        self._queue(frames)

    def _queue(self, frames: wire.Frames) -> None:
        self._out.append(frames)
        if type(frames) is tuple:  # a large body: no reason to wait for company
            self._out_pieces = True
        self._out_bytes += LINGER_BYTES if self._out_pieces else len(frames)
        handle = self._flush_handle
        if self._linger and self._out_bytes < LINGER_BYTES:
            if handle is None:
                self._flush_handle = self._loop.call_later(self._linger, self._flush)
        elif not self._flush_soon:  # no linger, or enough to fill a write: end of this turn
            if handle is not None:
                handle.cancel()
            self._flush_soon = True
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()  # close() flushes before a lingering write is due
        self._flush_handle = None
        self._flush_soon = False
        self._out_bytes = 0
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
            raise self.error()

    def _update_writable(self) -> None:
        if self._paused or self._tracker.blocked:
            self._writable.clear()
        else:
            self._writable.set()

    # -- confirms: the tracker decides, this carries it out ------------------------------------

    def _acked(self, tag: int, multiple: bool) -> None:
        acked, returned = self._tracker.ack(tag, multiple)
        if acked:
            self._on_ack(acked)
        for token, reason in returned:
            self._on_returned(token, reason)

    def _nacked(self, tag: int, multiple: bool) -> None:
        resends = self._tracker.nack(tag, multiple)
        if resends:
            log.warning("broker nacked %d publish(es); publishing again", len(resends))
        for publish, delay in resends:
            self._on_republish("nack")
            self._loop.call_later(delay, self._resend, publish)

    def _resend(self, publish: Publish[wire.Frames, Any]) -> None:
        if not self.closed.done():
            self._tracker.again(publish, time.monotonic())
            self._queue(publish.frames)

    def _expire(self, now: float) -> None:
        """Carry out the tracker's decision about publishes past ``confirm_timeout``.

        A dead connection (nothing read since the oldest of them was sent) is ended:
        re-sending into it would only grow the buffer and the duplicates.
        """
        expired = self._tracker.expire(now, self._last_read)
        if expired.silent_for is not None:
            self._fail(
                SinkError(
                    f"no confirm and no frame at all from the broker in "
                    f"{expired.silent_for:.0f}s; the connection is presumed dead"
                )
            )
            return
        if expired.resend:
            log.warning(
                "%d publish(es) got no confirm in time; publishing again", len(expired.resend)
            )
        for publish in expired.resend:
            self._on_republish("timeout")
            self._loop.call_soon(self._resend, publish)

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self._transport = cast(asyncio.Transport, transport)
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
            self._returns.start(method)
        elif isinstance(method, commands.Connection.Blocked | commands.Connection.Unblocked):
            self._set_blocked(method)
        else:
            self._replies.append(method)
            if not self._reply_ready.done():
                self._reply_ready.set_result(None)

    def _set_blocked(self, method: base.Frame) -> None:
        blocked = isinstance(method, commands.Connection.Blocked)
        if not self._tracker.block(blocked, time.monotonic()):
            return
        if blocked:
            reason = getattr(method, "reason", "") or "no reason given"
            log.warning("broker blocks publishers (%s)", reason)
        else:
            log.warning("broker unblocks publishers")
        self._update_writable()
        if self._on_blocked is not None:
            self._on_blocked(blocked)

    def _on_content(self, kind: int, payload: bytes) -> None:
        back = self._returns.content(kind, payload)
        if back is not None and not self._tracker.returned(
            back.exchange, back.routing_key, back.message_id, back.reply_code, back.reply_text
        ):
            log.warning("basic.return for no pending publish", extra={"key": back.routing_key})

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
        period = min(1.0, self._tracker.confirm_timeout / 4)
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

    def error(self) -> CdcError:
        """Why the channel is closed (a plain SinkError if it carries no reason)."""
        closed = self.closed
        exc = closed.exception() if closed.done() and not closed.cancelled() else None
        if isinstance(exc, SinkError | RefusedError):
            return exc
        return SinkError("broker channel is closed")

    def fail(self, exc: CdcError) -> None:
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
                await self.call(bye, commands.Connection.CloseOk, channel=0)
        self._fail(SinkError("broker channel is closed"))
