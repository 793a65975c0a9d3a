"""The outside effects in flight: ready in the order they finish, one copy of an id at a time."""

from __future__ import annotations

import asyncio
import dataclasses

from pydantic import BaseModel

from cdc.service.backoff import Backoff
from consumers.runtime.batch import FAILED, BatchMessage
from consumers.runtime.outside import OutsideEffects
from consumers.runtime.spec import Delivery, Route


class Payload(BaseModel):
    n: int


async def _handler(ctx, payload):  # pragma: no cover - the database batch is not run here
    return None


ROUTE = Route("#", Payload, _handler)


def _item(message_id: str, n: int) -> BatchMessage:
    return BatchMessage(Delivery(message_id, "k", {}, 1, b"{}"), ROUTE, Payload(n=n), "q")


def _effects(gates: dict[int, asyncio.Future[str]]) -> OutsideEffects:
    async def outside(chunk):
        return [gates[payload.n] for _, payload in chunk]

    return OutsideEffects(outside, lambda: Backoff(0.01, 0.02), asyncio.Event(), asyncio.Event())


async def test_messages_are_ready_in_the_order_their_effects_finish():
    loop = asyncio.get_running_loop()
    gates = {n: loop.create_future() for n in (1, 2, 3)}
    effects = _effects(gates)
    await effects.launch([_item("a", 1), _item("b", 2), _item("c", 3)])
    gates[2].set_result("sent b")
    gates[3].set_exception(RuntimeError("endpoint down"))
    first = await effects.next_batch(10, linger=0.05, enough=10)  # waits while 'a' runs
    assert [i.delivery.message_id for i in first] == ["b", "c"]
    assert first[0].delivery.prepared == "sent b" and first[0].outcome is None
    assert first[1].outcome == FAILED and isinstance(first[1].error, RuntimeError)
    assert effects.busy()
    gates[1].set_result("sent a")
    assert [i.delivery.message_id for i in await effects.next_batch(10, 0.0, 10)] == ["a"]
    await asyncio.sleep(0)  # the finished task leaves the running set
    assert not effects.busy()


async def test_a_batch_with_enough_ready_goes_without_waiting_out_the_linger():
    loop = asyncio.get_running_loop()
    gates = {n: loop.create_future() for n in (1, 2, 3)}
    effects = _effects(gates)
    await effects.launch([_item("a", 1), _item("b", 2), _item("c", 3)])
    gates[1].set_result(None)
    gates[2].set_result(None)
    started = loop.time()
    batch = await effects.next_batch(10, linger=5.0, enough=2)  # 'c' still runs
    assert [i.delivery.message_id for i in batch] == ["a", "b"]
    assert loop.time() - started < 1.0
    gates[3].set_result(None)
    assert [i.delivery.message_id for i in await effects.next_batch(10, 5.0, 2)] == ["c"]


async def test_a_second_copy_of_an_id_in_hand_waits_until_the_first_is_settled():
    loop = asyncio.get_running_loop()
    gates = {n: loop.create_future() for n in (1, 2)}
    effects = _effects(gates)
    first, again = _item("same", 1), _item("same", 2)
    await effects.launch([first, again])
    assert len(effects.running) == 1  # only the first copy started
    gates[1].set_result(None)
    assert await effects.next_batch(10, 0.0, 10) == [first]
    await asyncio.sleep(0)  # the finished task leaves the running set
    await effects.relaunch_deferred()
    assert not effects.running  # still in hand: deferred again
    effects.settled([first])
    await effects.relaunch_deferred()
    assert len(effects.running) == 1
    gates[2].set_result(None)
    assert await effects.next_batch(10, 0.0, 10) == [again]


async def test_a_chunk_that_cannot_start_is_tried_again_and_given_up_on_stop():
    loop = asyncio.get_running_loop()
    calls = 0
    stop = asyncio.Event()
    ready = loop.create_future()
    ready.set_result(None)

    async def outside(chunk):
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("lookup failed")  # a read the effects need: waited out
        if calls == 2:
            return [ready]
        stop.set()
        raise OSError("still failing")

    effects = OutsideEffects(outside, lambda: Backoff(0.001, 0.002), stop, asyncio.Event())
    await effects.launch([_item("a", 1)])
    assert calls == 2
    assert [i.delivery.message_id for i in await effects.next_batch(5, 0, 5)] == ["a"]
    await asyncio.sleep(0)  # the finished task leaves the running set
    effects.settled([_item("a", 1)])
    await effects.launch([_item("b", 1)])  # fails while stopping: left for redelivery
    assert calls == 3 and not effects.busy()
    await effects.launch([_item("b", 1)])  # and its id is no longer in hand
    assert calls == 4


def test_a_delivery_with_its_prepared_value_keeps_every_other_field() -> None:
    d = Delivery("m-1", "device.started", {"h": 1}, 3, b"{}", prepared="old")
    assert d.with_prepared("new") == dataclasses.replace(d, prepared="new")


async def test_a_finished_future_is_taken_as_it_is_without_a_task():
    loop = asyncio.get_running_loop()
    refused, sent = loop.create_future(), loop.create_future()
    refused.set_exception(RuntimeError("breaker open"))
    sent.set_result("known")
    effects = _effects({1: refused, 2: sent})
    await effects.launch([_item("a", 1), _item("b", 2)])
    assert not effects.running  # nothing to schedule: both are ready already
    a, b = await effects.next_batch(10, linger=5.0, enough=10)
    assert a.outcome == FAILED and str(a.error) == "breaker open"
    # Never raised again here: no traceback (and no frames) hangs on the stored error.
    assert a.error is not None and a.error.__traceback__ is None
    assert b.outcome is None and b.delivery.prepared == "known"


async def test_a_cancelled_future_still_runs_as_a_task():
    loop = asyncio.get_running_loop()
    cancelled = loop.create_future()
    cancelled.cancel()
    effects = _effects({1: cancelled})
    await effects.launch([_item("a", 1)])
    assert len(effects.running) == 1  # the task path decides, as for any awaitable
    await asyncio.gather(*effects.running, return_exceptions=True)
