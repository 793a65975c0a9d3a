"""The reconnect loop both programs run (cdc/service/session.py): its decisions, then the loop
with sessions that are plain coroutines (no server: the loop itself does no I/O)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.service.backoff import Backoff
from cdc.service.session import AGAIN, HEALTHY_SESSION, Reconnects, run_sessions


class Outage(Exception):
    pass


class Refusal(Outage):
    pass


# -- the pure decision -------------------------------------------------------------------


def test_short_sessions_grow_the_backoff():
    schedule = Reconnects(Backoff(1.0, 64.0))
    for _ in range(5):
        schedule.delay_after(1.0)
    assert schedule.backoff.attempts == 5


@given(st.integers(1, 40), st.floats(HEALTHY_SESSION + 0.001, 1e6))
def test_a_healthy_session_starts_the_backoff_over(failures, lasted):
    schedule = Reconnects(Backoff(1.0, 64.0))
    for _ in range(failures):
        schedule.delay_after(0.0)
    delay = schedule.delay_after(lasted)
    # The first delay of a fresh backoff: at most its minimum.
    assert 0.5 <= delay <= 1.0
    assert schedule.backoff.attempts == 1


@given(st.floats(0.0, HEALTHY_SESSION))
def test_a_session_up_to_the_healthy_mark_does_not_reset(lasted):
    schedule = Reconnects(Backoff(1.0, 64.0))
    schedule.delay_after(0.0)
    schedule.delay_after(lasted)
    assert schedule.backoff.attempts == 2


# -- the loop ------------------------------------------------------------------------------


def _tiny() -> Backoff:
    return Backoff(0.001, 0.002)


async def test_outages_are_retried_until_a_session_returns():
    outcomes: list[object] = [Outage("one"), Outage("two"), 7]
    ended: list[tuple[str, float]] = []

    async def session() -> int:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        assert isinstance(outcome, int)
        return outcome

    result = await run_sessions(
        session,
        stop=asyncio.Event(),
        backoff=_tiny(),
        outages=(Outage,),
        ended=lambda exc, delay: ended.append((str(exc), delay)),
    )
    assert result == 7
    assert [text for text, _ in ended] == ["one", "two"]
    assert all(0 < delay <= 0.002 for _, delay in ended)


@pytest.mark.parametrize("error", [ValueError("not an outage"), Refusal("no retry helps")])
async def test_a_refusal_or_any_other_error_stops_at_once(error):
    calls = []

    async def session() -> None:
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        await run_sessions(
            session,
            stop=asyncio.Event(),
            backoff=_tiny(),
            outages=(Outage,),
            ended=lambda exc, delay: pytest.fail("a refusal is not an outage"),
            refusals=(Refusal,),
        )
    assert calls == [1]


async def test_again_starts_the_next_session_without_counting_a_failure():
    outcomes: list[object] = [AGAIN, AGAIN, "done"]
    backoff = _tiny()

    async def session() -> object:
        return outcomes.pop(0)

    result = await run_sessions(
        session,
        stop=asyncio.Event(),
        backoff=backoff,
        outages=(Outage,),
        ended=lambda exc, delay: pytest.fail("AGAIN is not a failure"),
    )
    assert result == "done"
    assert backoff.attempts == 0


async def test_stop_cuts_the_wait_short_and_ends_the_loop():
    stop = asyncio.Event()
    calls = []

    async def session() -> None:
        calls.append(1)
        raise Outage("down")

    def ended(exc: BaseException, delay: float) -> None:
        stop.set()  # the signal arrives while the loop waits for the next session

    result = await asyncio.wait_for(
        run_sessions(
            session, stop=stop, backoff=Backoff(60.0, 60.0), outages=(Outage,), ended=ended
        ),
        timeout=5,
    )
    assert result is None
    assert calls == [1]


async def test_an_outage_while_stopping_is_not_announced():
    stop = asyncio.Event()

    async def session() -> None:
        stop.set()
        raise Outage("lost during the drain")

    result = await run_sessions(
        session,
        stop=stop,
        backoff=_tiny(),
        outages=(Outage,),
        ended=lambda exc, delay: pytest.fail("no next session to announce"),
    )
    assert result is None


async def test_a_stopped_loop_starts_no_session():
    stop = asyncio.Event()
    stop.set()

    async def session() -> None:
        pytest.fail("started after stop")

    assert (
        await run_sessions(
            session, stop=stop, backoff=_tiny(), outages=(Outage,), ended=lambda e, d: None
        )
        is None
    )
