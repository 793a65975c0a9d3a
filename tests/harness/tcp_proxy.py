"""A small TCP proxy for fault tests: ``127.0.0.1:<free port> -> upstream``.

It runs its own asyncio loop in a daemon thread, so synchronous tests drive it directly:

- :meth:`TcpProxy.cut` closes every current connection abruptly (RST on both sides);
- :meth:`TcpProxy.pause` refuses (``mode="refuse"``: accept then reset) or stalls
  (``mode="stall"``: accept and hold without connecting upstream) new connections until
  :meth:`TcpProxy.resume`;
- :meth:`TcpProxy.hold` stops forwarding what the upstream sends (the client hears nothing,
  as behind a stalled network) until :meth:`TcpProxy.release`; the client's bytes still flow;
- :meth:`TcpProxy.freeze` stops forwarding both ways on every *current* connection without
  closing it (no FIN, no RST: a silently dead network path or a hung peer); connections
  opened later flow normally. :meth:`TcpProxy.thaw` lets frozen ones flow again;
- :meth:`TcpProxy.stop` ends everything; the ``tcp_proxy`` fixture calls it at test end, and
  the proxy is also a context manager.

Counters (``accepted``, ``upstream_connections``, ``cuts``) let a test check that a client
really reconnected.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from typing import Literal

_PauseMode = Literal["refuse", "stall"]


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close a connection abruptly: SO_LINGER 0 makes the kernel send RST, not FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forward TCP from a free local port to ``upstream_host:upstream_port``."""

    def __init__(
        self,
        upstream_port: int = 5672,
        upstream_host: str = "127.0.0.1",
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.listen_host = listen_host
        self.port = 0
        self.accepted = 0
        self.upstream_connections = 0
        self.cuts = 0
        self._mode: _PauseMode | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        # Per connection: set while it may forward (freeze clears it).
        self._gates: dict[tuple[asyncio.StreamWriter, asyncio.StreamWriter], asyncio.Event] = {}
        self._stalled: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="proxy")
        self._server: asyncio.Server | None = None
        self._resumed: asyncio.Event | None = None
        self._flowing: asyncio.Event | None = None

    # -- control (called from the test's thread) -------------------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def url(self, user: str = "guest", password: str = "guest", vhost: str = "") -> str:
        """An amqp:// URL pointing at the proxy."""
        return f"amqp://{user}:{password}@{self.listen_host}:{self.port}/{vhost}"

    def cut(self) -> int:
        """Reset every open connection (and stalled ones); returns how many were cut."""
        self.cuts += 1
        return self._call(self._cut())

    def pause(self, mode: _PauseMode = "refuse") -> None:
        self._call(self._pause(mode))

    def resume(self) -> None:
        self._call(self._resume())

    def hold(self) -> None:
        """Hold every upstream -> client byte (of current and new connections)."""
        self._call(self._gate(False))

    def release(self) -> None:
        """Deliver what was held and forward again."""
        self._call(self._gate(True))

    def freeze(self) -> int:
        """Stop forwarding, both ways, on every current connection; returns how many."""
        return self._call(self._freeze(True))

    def thaw(self) -> int:
        """Forward again on every frozen connection still open; returns how many."""
        return self._call(self._freeze(False))

    @property
    def open_connections(self) -> int:
        return len(self._pairs)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._stop(), timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- loop side ----------------------------------------------------------------------------

    def _call(self, coro, timeout: float = 10):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _start(self) -> None:
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._handle, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> int:
        pairs = list(self._pairs)
        for pair in pairs:
            for w in pair:
                _abort(w)
            gate = self._gates.get(pair)
            if gate is not None:
                gate.set()  # a frozen pipe must wake to see its connection gone
        self._pairs.clear()
        for client in list(self._stalled):
            _abort(client)
        self._stalled.clear()
        return len(pairs)

    async def _pause(self, mode: _PauseMode) -> None:
        assert self._resumed is not None
        self._mode = mode
        self._resumed.clear()

    async def _resume(self) -> None:
        assert self._resumed is not None
        self._mode = None
        self._resumed.set()

    async def _gate(self, open_: bool) -> None:
        assert self._flowing is not None
        (self._flowing.set if open_ else self._flowing.clear)()

    async def _freeze(self, frozen: bool) -> int:
        gates = list(self._gates.values())
        for gate in gates:
            (gate.clear if frozen else gate.set)()
        return len(gates)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        if self._resumed is not None:
            self._resumed.set()
        if self._flowing is not None:
            self._flowing.set()

    async def _handle(self, reader: asyncio.StreamReader, client: asyncio.StreamWriter) -> None:
        self.accepted += 1
        assert self._resumed is not None
        if self._mode == "refuse":
            _abort(client)
            return
        if self._mode == "stall":
            self._stalled.add(client)
            await self._resumed.wait()
            self._stalled.discard(client)
            if client.transport.is_closing():
                return
        try:
            up_reader, upstream = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(client)
            return
        self.upstream_connections += 1
        pair = (client, upstream)
        self._pairs.add(pair)
        gate = self._gates[pair] = asyncio.Event()
        gate.set()
        try:
            await asyncio.gather(
                self._pipe(reader, upstream, gate),
                self._pipe(up_reader, client, self._flowing, gate),
            )
        finally:
            self._pairs.discard(pair)
            self._gates.pop(pair, None)
            for w in pair:
                if not w.transport.is_closing():
                    _abort(w)

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *gates: asyncio.Event
    ) -> None:
        try:
            while True:
                for gate in gates:  # a frozen pipe reads nothing: the peer's TCP window fills
                    await gate.wait()
                data = await reader.read(65536)
                if not data:
                    break
                for gate in gates:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            # One direction ended: end the whole connection abruptly, like a cut network.
            if not writer.transport.is_closing():
                _abort(writer)
