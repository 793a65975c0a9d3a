"""Opening the broker connection: TCP or TLS, the AMQP handshake, channel 1 in confirm mode.

:func:`connect` opens a :class:`~cdc.shell.broker.ConfirmChannel` (:func:`open_channel` one
already made, such as the workers' consuming channel) to an already parsed and checked broker
address (:class:`~cdc.service.urls.AmqpUrl`; PLAIN auth, heartbeats, ``amqps``
with the default TLS checks): connection.start/tune/open, channel.open, confirm.select. Any
failure raises :class:`~cdc.errors.SinkError`; a refused login, vhost or permission, or a
TLS certificate that does not verify, a :class:`~cdc.errors.RefusedError` (not retried).
The socket has TCP keepalives on (``_KEEPALIVE``), so a peer that vanished without a word is
noticed by the kernel too.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable
from typing import Any

from pamqp import commands

from cdc.errors import RefusedError, SinkError
from cdc.service.refusals import tls_hint
from cdc.service.urls import AmqpUrl
from cdc.shell.broker import FRAME_MAX, ConfirmChannel
from cdc.wire import amqp as wire

_CONNECT_TIMEOUT = 10.0
# TCP keepalive: first probe after 10 s idle, then every 5 s, dead after 3 unanswered.
_KEEPALIVE = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))


def _set_keepalive(sock: Any) -> None:
    """Turn TCP keepalives on (where the platform has the options)."""
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in _KEEPALIVE:
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


async def connect(
    address: AmqpUrl,
    *,
    confirm_timeout: float,
    on_ack: Callable[[list[Any]], None],
    on_returned: Callable[[Any, str], None],
    on_republish: Callable[[str], None],
    on_blocked: Callable[[bool], None] | None = None,
    linger: float = 0.0,
) -> ConfirmChannel:
    """Connect to ``address`` and return a channel in confirm mode (SinkError on failure)."""
    channel = ConfirmChannel(
        confirm_timeout=confirm_timeout,
        on_ack=on_ack,
        on_returned=on_returned,
        on_republish=on_republish,
        on_blocked=on_blocked,
        linger=linger,
    )
    await open_channel(address, channel)
    return channel


async def open_channel(address: AmqpUrl, channel: ConfirmChannel) -> None:
    """Connect ``channel`` (a new one) to ``address`` and open it in confirm mode."""
    tls = ssl.create_default_context(cafile=address.cafile) if address.tls else None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(_CONNECT_TIMEOUT):
            transport, _ = await loop.create_connection(
                lambda: channel, address.host, address.port, ssl=tls
            )
            _set_keepalive(transport.get_extra_info("socket"))
            await _open(channel, address)
    except ssl.SSLCertVerificationError as exc:
        refused = RefusedError(f"cannot connect to the broker: {exc}: {tls_hint()}")
        channel.fail(refused)
        raise refused from exc
    except RefusedError:
        raise
    except (OSError, TimeoutError, SinkError) as exc:
        cause = channel.error() if channel.closed.done() else exc
        error = SinkError(f"cannot connect to the broker: {cause!r}")
        channel.fail(error)
        raise error from exc
    except BaseException:
        channel.fail(SinkError("connecting was cancelled"))
        raise


async def _open(channel: ConfirmChannel, address: AmqpUrl) -> None:
    start = await channel.call(None, commands.Connection.Start, channel=0)
    ok = wire.start_ok(start, address.user, address.password)
    tune = await channel.call(ok, commands.Connection.Tune, channel=0)
    channel.tuned(wire.tune_ok(tune, FRAME_MAX, address.heartbeat), address.heartbeat)
    open_vhost = commands.Connection.Open(virtual_host=address.vhost)
    await channel.call(open_vhost, commands.Connection.OpenOk, channel=0)
    await channel.call(commands.Channel.Open(), commands.Channel.OpenOk)
    await channel.call(commands.Confirm.Select(), commands.Confirm.SelectOk)
    channel.opened()
