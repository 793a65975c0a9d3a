"""The silence clock of the replication reader (cdc/core/liveness.py): when to ask PostgreSQL for
a keepalive, when to look at the walsender, and that a busy one gets more time."""

from __future__ import annotations

from cdc.core.liveness import PING, PROBE, SilenceClock

T = 20.0


def test_a_quiet_connection_is_pinged_at_half_then_probed_at_the_timeout():
    clock = SilenceClock(T, now=100.0)
    assert clock.due(100.0 + T / 2 - 0.01) is None
    assert clock.wake() == 100.0 + T / 2
    assert clock.due(100.0 + T / 2) is PING
    clock.ping(100.0 + T / 2)
    assert clock.due(100.0 + T - 0.01) is None  # one ping per silence
    assert clock.wake() == 100.0 + T
    assert clock.due(100.0 + T) is PROBE
    assert clock.silent_for(100.0 + T) == T


def test_any_message_starts_the_silence_over():
    clock = SilenceClock(T, now=0.0)
    clock.ping(T / 2)
    clock.heard = T / 2 + 1  # the keepalive came
    assert clock.due(T) is None  # no probe: the silence is 9 s old, not 20
    assert clock.wake() == T + 1
    assert clock.due(T + 1) is PING  # a new silence gets its own ping


def test_a_busy_walsender_gets_another_half_timeout_each_time():
    clock = SilenceClock(T, now=0.0)
    clock.ping(T / 2)
    assert clock.due(T) is PROBE
    clock.busy(T)
    assert clock.due(T + T / 2 - 0.01) is None
    assert clock.wake() == T + T / 2
    assert clock.due(T + T / 2) is PROBE
    clock.heard = T + 5  # it finished and spoke: the grace does not linger
    assert clock.due(T + 5 + T / 2) is PING


def test_time_not_spent_listening_is_not_silence():
    clock = SilenceClock(T, now=0.0)
    clock.reset(3 * T)  # the window was full: the reader did not read
    assert clock.due(3 * T + 1) is None
    assert clock.due(3 * T + T / 2) is PING
