"""How long a short batch waits for more messages (``consumers.runtime.linger``)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumers.runtime.linger import Gathering, Linger

CAP = 0.05


def _after(took: float, cap: float = CAP) -> Linger:
    """A policy whose previous batch ran from t=100 for ``took`` seconds."""
    linger = Linger(cap)
    linger.ran(100.0, 100.0 + took)
    return linger


def test_the_first_batch_does_not_wait() -> None:
    assert Linger(CAP).wait(5.0) == 0.0


def test_a_short_batch_found_right_after_a_slow_one_waits_as_long_as_that_took() -> None:
    # a 30 ms transaction (a busy database): the next batch gets 30 ms to fill
    assert _after(0.030).wait(100.030) == pytest.approx(0.030)


def test_a_fast_batch_means_a_short_wait() -> None:
    # a message or two committed in 2 ms: the next batch waits no longer than that
    assert _after(0.002).wait(100.0025) == pytest.approx(0.002)


def test_an_idle_worker_does_not_wait() -> None:
    # the previous batch (3 ms) ended a second before this message came: a sparse flow,
    # one message now is worth more than a bigger batch later
    assert _after(0.003).wait(101.003) == 0.0


def test_idle_for_longer_than_the_last_batch_took_counts_as_idle() -> None:
    linger = _after(0.010)
    assert linger.wait(100.010 + 0.009) == pytest.approx(0.010)
    assert linger.wait(100.010 + 0.011) == 0.0


def test_the_wait_is_capped() -> None:
    # a 400 ms batch (a loaded machine, a full batch of slow statements): at most the cap
    assert _after(0.400).wait(100.400) == CAP


def test_a_cap_of_zero_never_waits() -> None:
    assert _after(0.030, cap=0.0).wait(100.030) == 0.0


def test_only_the_previous_batch_counts() -> None:
    linger = _after(0.040)
    linger.ran(200.0, 200.001)  # a quick batch since: the database is no longer slow
    assert linger.wait(200.001) == pytest.approx(0.001)


@given(
    took=st.floats(0, 5, allow_nan=False),
    idle=st.floats(0, 5, allow_nan=False),
    cap=st.floats(0, 1, allow_nan=False),
)
def test_the_wait_is_never_above_the_cap_nor_the_last_batch(
    took: float, idle: float, cap: float
) -> None:
    linger = Linger(cap)
    linger.ran(10.0, 10.0 + took)
    wait = linger.wait(10.0 + took + idle)
    assert 0.0 <= wait <= min(cap, took) + 1e-12


async def test_calls_close_together_share_one_run_and_each_gets_its_result() -> None:
    runs: list[list[str]] = []

    async def run(items: list[str]) -> str:
        runs.append(items)
        return "+".join(items)

    gather: Gathering[str, str] = Gathering(run, linger=0.05, enough=10)
    first = asyncio.create_task(gather("a"))
    await asyncio.sleep(0)
    await asyncio.sleep(0)  # the run's task is waiting for more by now
    assert await asyncio.gather(first, gather("b")) == ["a+b", "a+b"]
    assert runs == [["a", "b"]]


async def test_items_that_weigh_enough_run_without_waiting_out_the_linger() -> None:
    async def run(items: list[list[int]]) -> int:
        return sum(len(i) for i in items)

    gather: Gathering[list[int], int] = Gathering(run, linger=5.0, enough=3, weight=len)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.gather(gather([1, 2]), gather([3])) == [3, 3]
    assert loop.time() - started < 1.0


async def test_a_failed_run_fails_every_call_in_it_and_the_next_run_goes_on() -> None:
    calls = 0

    async def run(items: list[str]) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("statement failed")
        return len(items)

    gather: Gathering[str, int] = Gathering(run, linger=0.01, enough=10)
    failed = await asyncio.gather(gather("a"), gather("b"), return_exceptions=True)
    assert [type(e) for e in failed] == [OSError, OSError]
    assert await gather("c") == 1


async def test_calls_made_during_a_run_go_in_the_next_one() -> None:
    release, running = asyncio.Event(), asyncio.Event()
    runs: list[list[str]] = []

    async def run(items: list[str]) -> None:
        runs.append(items)
        running.set()
        if len(runs) == 1:
            await release.wait()

    gather: Gathering[str, None] = Gathering(run, linger=0.0, enough=1)
    first = asyncio.create_task(gather("a"))
    await running.wait()
    later = [asyncio.create_task(gather(x)) for x in ("b", "c")]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *later)
    assert runs == [["a"], ["b", "c"]]
