"""Webhook probes that run on their own, and sends decided before they started (already
failed, or nothing to send): finished futures, which the runtime takes without a task."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Sequence
from typing import Any, TypeVar

from consumers.errors import PermanentError, Retry
from consumers.notifications.channels import endpoint_of
from consumers.runtime.outside import decided

log = logging.getLogger("consumers.notifications")

T = TypeVar("T")


def failed(exc: BaseException) -> asyncio.Future[Any]:
    """A send that has failed already with ``exc`` (no coroutine to run)."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def finished(value: T) -> asyncio.Future[T]:
    """An outcome known at once: ``value``."""
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def failure_of(sends: Sequence[Awaitable[Any]]) -> BaseException | None:
    """The error of ``sends`` when every one of them failed before it started
    (:func:`first_error` of theirs), so their message fails at once; None otherwise."""
    errors = []
    for send in sends:
        error = send.exception() if decided(send) else None
        if error is None:
            return None
        errors.append(error)
    return first_error(errors) if errors else None


def first_error(errors: Sequence[BaseException]) -> BaseException:
    """The error that decides a message's fate among its sends' ``errors``: a permanent one
    first (no retry can help it), else the first."""
    return next((e for e in errors if isinstance(e, PermanentError)), errors[0])


class Probes:
    """The webhook probes in flight, each on its own task.

    An endpoint's probe (its first POST after the breaker's cooldown) is not waited for by
    its message: against a dead endpoint it lasts ``CDC_WEBHOOK_TIMEOUT``, and a message held
    that long holds every later one's ``multiple`` ack (they are then acked one by one, which
    costs the broker a command each and refills the prefetch one message at a time). The
    message is retried at once instead, like those the open breaker refused; the probe
    records its delivery if it succeeds, so the message's next attempt skips the webhook."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, probe: Awaitable[None], url: str) -> asyncio.Future[None]:
        """Run ``probe`` on its own; the (failed) send its message waits for instead."""
        task = asyncio.ensure_future(probe)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return failed(
            Retry(
                f"webhook {endpoint_of(url)}: this event's POST is the endpoint's "
                "probe after CDC_WEBHOOK_BREAKER_SECONDS; the event is tried again after its "
                "retry delay, and skips the webhook if the probe delivered it"
            )
        )

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.info("webhook probe failed: %s", task.exception())

    async def close(self) -> None:
        """Cancel the probes in flight (the worker is closing)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
