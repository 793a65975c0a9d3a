"""Broker outages: network cuts and a stopped broker delay events, never lose them.

(a) The relay reaches RabbitMQ through a TCP proxy that cuts every connection mid-stream a
    few times (once followed by refused connections, once by stalled ones). The same relay
    process reconnects by itself each time; nothing is lost.
(b) ``rabbitmqctl stop_app`` while events are being committed; while the broker is down the
    slot must not be confirmed past the events it could not publish; after ``start_app`` the
    same relay process recovers by itself and nothing is lost. The broker is restored in
    ``finally`` (the ``rabbit_app`` fixture) and the test waits until it accepts AMQP again.
"""

from __future__ import annotations

import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def test_connection_cuts_through_proxy(env, tcp_proxy):
    env.setup()
    relay = env.relay(metrics=True, amqp_url=tcp_proxy.url())
    relay.wait_streaming()
    pid = relay.pid
    work = env.workload(writers=2, events_per_writer=1500, max_txn=40, rate_per_writer=250)
    work.start()

    outages = [None, "refuse", "stall"]
    for i, pause in enumerate(outages):
        depth = env.sink_count()
        env.wait_for(
            lambda d=depth: env.sink_count() > d + 100, 30, "events to flow before the cut"
        )
        conns = tcp_proxy.upstream_connections
        if pause:
            tcp_proxy.pause(pause)
        cut = tcp_proxy.cut()
        assert cut >= 1, "the relay had no broker connection to cut"
        if pause:
            env.wait_for(lambda: relay.state() != "streaming", 10, "the relay to notice")
            t_pause = time.monotonic()
            env.wait_for(
                lambda c=conns, t=t_pause: tcp_proxy.accepted > c + 1 or time.monotonic() - t > 1.5,
                10,
                "reconnect attempts",
            )
            tcp_proxy.resume()
        env.wait_for(
            lambda c=conns: tcp_proxy.upstream_connections > c and relay.state() == "streaming",
            30,
            lambda i=i: (
                f"the relay to reconnect after cut {i + 1} (state {relay.state()})\n{relay.tail()}"
            ),
        )
        assert relay.pid == pid and relay.alive()

    work.join(timeout=90)
    rows = env.fetch_rows()
    assert set(rows) == work.committed_ids
    env.wait_sink_count(len(rows), timeout=60)
    msgs = env.drain(len(rows), quiet=1.5, timeout=60)
    dups = env.check_exactly_once(msgs, rows, allow_duplicates=True)
    reconnects = relay.metric("cdc_reconnects_total")
    print(
        f"{len(rows)} events through {len(outages)} cuts: {sum(n - 1 for n in dups.values())} "
        f"duplicates; proxy saw {tcp_proxy.accepted} connections; "
        f"cdc_reconnects_total {reconnects}"
    )
    assert reconnects is not None and reconnects >= len(outages)
    assert relay.pid == pid and relay.alive() and relay.state() == "streaming"


def test_broker_stop_app_and_start_app(env, rabbit_app):
    env.setup()
    relay = env.relay(metrics=True)
    relay.wait_streaming()
    pid = relay.pid
    before = env.insert([env.event("outage.before", {"i": i}) for i in range(300)])
    env.wait_sink_count(len(before), timeout=30)

    rabbit_app.stop()
    try:
        during = []
        for k in range(10):
            during += env.insert([env.event("outage.during", {"k": k, "i": i}) for i in range(50)])
        inserted_at = env.current_wal_lsn()
        # with events to publish and no broker, the relay cannot claim to be streaming
        t0 = time.monotonic()
        states = {relay.state()}
        while time.monotonic() - t0 < 15 and states == {"streaming"}:
            states.add(relay.state())
            time.sleep(0.1)
        noticed_s = time.monotonic() - t0
        # while the broker is down, the slot stays behind what could not be published
        flushed_during = []
        t_end = time.monotonic() + 2.0
        while time.monotonic() < t_end:
            flushed_during.append(env.confirmed_flush_lsn())
            time.sleep(0.1)
        assert relay.alive(), relay.tail()
    finally:
        rabbit_app.start()

    after = env.insert([env.event("outage.after", {"i": i}) for i in range(300)])
    rows = env.fetch_rows()
    total = len(before) + len(during) + len(after)
    assert len(rows) == total
    env.wait_for(lambda: relay.state() == "streaming", 60, lambda: f"recovery\n{relay.tail()}")
    env.wait_sink_count(total, timeout=60)
    msgs = env.drain(total, quiet=1.5, timeout=60)
    dups = env.check_exactly_once(msgs, rows, allow_duplicates=True)
    first_outage_commit = min(m.commit_lsn for m in msgs if m.type == "outage.during")
    assert first_outage_commit < inserted_at
    assert max(flushed_during) <= first_outage_commit, (
        f"slot confirmed to {env.format_lsn(max(flushed_during))} while the broker was down, "
        f"past the unpublished commit at {env.format_lsn(first_outage_commit)}"
    )
    print(
        f"{total} events across stop_app/start_app: {sum(n - 1 for n in dups.values())} dups; "
        f"/healthz states during the outage {states} ({noticed_s:.1f}s)"
    )
    assert states != {"streaming"}, "/healthz said 'streaming' all through the broker outage"
    assert relay.pid == pid and relay.alive()
