"""Sends decided before they start: which error a message whose sends all failed at once gets."""

from __future__ import annotations

import asyncio

from consumers.errors import PermanentError, Retry
from consumers.notifications.probes import failed, failure_of, finished


async def test_every_send_refused_at_once_fails_the_message_with_a_permanent_error_first():
    retry, permanent = Retry("breaker open"), PermanentError("address refused")
    assert failure_of([failed(retry), failed(permanent)]) is permanent
    assert failure_of([failed(retry), failed(Retry("other"))]) is retry


async def test_a_send_that_has_yet_to_run_or_succeeded_leaves_the_message_to_run():
    pending = asyncio.get_running_loop().create_future()
    assert failure_of([failed(Retry("breaker open")), pending]) is None
    assert failure_of([failed(Retry("breaker open")), finished(None)]) is None
    assert failure_of([]) is None
    pending.cancel()


async def test_a_coroutine_is_never_taken_for_a_decided_send():
    async def send() -> None:
        raise Retry("not reached")

    coro = send()
    assert failure_of([coro]) is None
    coro.close()
