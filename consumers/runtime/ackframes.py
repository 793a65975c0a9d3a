"""Sending the ``basic.ack`` frames that settle a batch: all of them in one socket write.

``aiormq``'s ``basic_ack`` queues one frame for its writer task, which writes it on its own
and wakes the caller: a batch whose messages finished out of order (each behind an unfinished
one is acked on its own, see ``acks``) then cost a write system call and two task switches
per message, a large share of a notifications worker's CPU. Here the batch's ack frames
are marshalled together into one entry of the connection's write queue (the same queue, so
the order with every other frame of the connection is kept) and written at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiormq.abc import AbstractChannel, ChannelFrame
from aiormq.exceptions import ChannelInvalidStateError
from pamqp import commands as spec


async def send_acks(channel: AbstractChannel, acks: Sequence[tuple[int, bool]]) -> None:
    """Write the ``(delivery tag, multiple)`` acks on ``channel`` in one frame write and
    return once they are written (like ``basic_ack``)."""
    if not acks:
        return
    if channel.is_closed:
        raise ChannelInvalidStateError(f"{channel!r} closed")
    written = channel.create_future()
    frame = ChannelFrame.marshall(
        channel_number=channel.number,
        frames=[spec.Basic.Ack(delivery_tag=tag, multiple=multiple) for tag, multiple in acks],
        drain_future=written,
    )
    await channel.connection.write_queue.put(frame)
    await written
