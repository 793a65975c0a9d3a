"""The relay's unhappy faults: each is detected in seconds and costs no event.

(a) A row whose content header cannot fit the broker's negotiated ``frame_max``, and a row
    with a header key over AMQP's field-name limit, are parked as ``malformed`` between
    normal rows; the stream goes on with no reconnect.
(b) The PostgreSQL connection freezes (a proxy stops forwarding both ways, no FIN/RST): the
    relay notices the silence within ``CDC_SOURCE_TIMEOUT``, ends its own stale walsender and
    resumes; nothing is lost, duplicates stay within the window.
(c) The broker connection freezes the same way: the heartbeat ends the session within two
    heartbeat intervals; duplicates stay within the window, no flood of warnings.
(d) A broker memory alarm (``connection.blocked``) shows as ``/healthz`` state ``blocked``
    and ``cdc_broker_blocked`` 1, back to ``streaming``/0 when it clears; nothing is lost.

The measured figures are printed (run with ``-s``) and recorded in docs/operations.md.
"""

from __future__ import annotations

import json
import time

import pytest
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

WINDOW = 2000  # CDC_MAX_IN_FLIGHT default
MAX_TXN = 20


def _parked(env, n):
    return env.drain(n, queue=env.parking_queue, quiet=1.0, timeout=30)


def test_oversized_header_and_long_header_key_are_parked(env):
    env.setup()
    env.ensure_headers_column()
    relay = env.relay(metrics=True)
    relay.wait_streaming()

    before = env.insert([env.event("big.before", {"i": i}) for i in range(50)])
    huge = env.event("big.huge", {"i": "huge"}, headers={"blob": "x" * 200_000})
    long_key = env.event("big.key", {"i": "key"}, headers={"k" * 129: "v"})
    key_128 = env.event("big.key128", {"i": "k128"}, headers={"k" * 128: "v"})
    # in one transaction with normal rows around them, then more transactions after
    mixed = [env.event("big.mixed", {"i": 0}), huge, env.event("big.mixed", {"i": 1})]
    mixed += [long_key, key_128, env.event("big.mixed", {"i": 2})]
    env.insert(mixed)
    after = env.insert([env.event("big.after", {"i": i}) for i in range(50)])

    bad_ids = {huge["id"], long_key["id"]}
    rows = {k: v for k, v in env.fetch_rows().items() if k not in bad_ids}
    assert len(rows) == len(before) + len(mixed) - 2 + len(after)
    env.wait_sink_count(len(rows), timeout=60)
    msgs = env.drain(len(rows), quiet=1.0, timeout=30)
    env.check_exactly_once(msgs, rows)
    assert any(m.message_id == key_128["id"] and "k" * 128 in m.headers for m in msgs)

    parked = {m.message_id: m for m in _parked(env, 2)}
    assert set(parked) == bad_ids, list(parked)
    big = parked[huge["id"]]
    assert big.headers["x-parked-kind"] == "malformed"
    reason = big.headers["x-parked-reason"]
    assert "frame_max of 131072" in reason and "content header of" in reason, reason
    row = json.loads(big.body)
    assert row["id"] == huge["id"] and json.loads(row["headers"])["blob"] == "x" * 200_000
    key = parked[long_key["id"]]
    assert key.headers["x-parked-kind"] == "malformed"
    assert "129 bytes" in key.headers["x-parked-reason"], key.headers
    assert "128" in key.headers["x-parked-reason"], key.headers

    assert relay.metric("cdc_events_parked_total", kind="malformed") == 2
    assert not relay.metric("cdc_reconnects_total"), relay.tail()
    assert relay.state() == "streaming"
    print(f"{len(rows)} events delivered, 2 parked (frame_max, key limit), 0 reconnects")


def _flowing(env, work, what):
    depth = env.sink_count()
    env.wait_for(lambda: env.sink_count() > depth + 200, 30, f"events to flow {what}")


def _timeline(relay, proxy, t_freeze, conns, limit, on_detect=None):
    """Seconds from the freeze to leaving 'streaming', and to streaming on a new connection."""
    detect = resume = None
    while time.monotonic() - t_freeze < limit:
        state = relay.state()
        now = time.monotonic() - t_freeze
        if detect is None and state != "streaming":
            detect = now
            if on_detect is not None:
                on_detect()
        if detect is not None and state == "streaming" and proxy.upstream_connections > conns:
            resume = now
            break
        time.sleep(0.05)
    return detect, resume


def _warnings(relay):
    lines = []
    for line in relay.log().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("level") in ("warning", "error"):
            lines.append(rec.get("message") or rec.get("msg") or line)
    return lines


def _check_delivery(env, work):
    work.join(timeout=120)
    assert not work.errors, work.errors
    rows, dups = env.check_all_delivered(quiet=2.0, timeout=90)
    assert set(rows) == work.committed_ids
    return len(rows), dups


def test_frozen_postgres_connection_is_detected_and_resumed(env, pg_proxy):
    env.setup()
    relay = env.relay(metrics=True, database_url=pg_proxy.db_url(env.dbname))
    relay.wait_streaming()
    pid = relay.pid
    work = env.workload(writers=2, events_per_writer=6000, max_txn=MAX_TXN, rate_per_writer=150)
    work.start()
    _flowing(env, work, "before the freeze")
    walsender = env.slot_info()["active_pid"]

    conns = pg_proxy.upstream_connections
    t_freeze = time.monotonic()
    assert pg_proxy.freeze() >= 1, "the relay had no PostgreSQL connection to freeze"
    detect, resume = _timeline(relay, pg_proxy, t_freeze, conns, 60)
    assert detect is not None, f"frozen PostgreSQL connection not noticed in 60s\n{relay.tail()}"
    assert resume is not None, f"the relay did not stream again\n{relay.tail()}"
    now_holder = env.slot_info()["active_pid"]
    assert now_holder != walsender, "the stale walsender still holds the slot"
    assert any("ended walsender" in w for w in _warnings(relay)), relay.tail()

    total, dups = _check_delivery(env, work)
    print(
        f"PostgreSQL freeze: detected after {detect:.1f}s, streaming again after {resume:.1f}s "
        f"(CDC_SOURCE_TIMEOUT 20 s); {total} events, 0 lost, {dups} duplicates"
    )
    assert detect < 30, detect
    assert resume < 40, resume
    assert dups <= WINDOW + MAX_TXN
    assert relay.pid == pid and relay.alive()
    assert relay.metric("cdc_reconnects_total", side="database") >= 1


def test_busy_walsender_is_not_taken_for_a_dead_connection(env):
    """A large transaction on a table outside the publication: the walsender decodes it for
    seconds without a word (it reads its client only every wal_sender_timeout / 2). With
    ``CDC_SOURCE_TIMEOUT=1`` the relay looks at the walsender, sees it busy, and waits."""
    env.setup()
    name = f"scratch_{env.tag}"
    env.extra_tables.append(f"public.{name}")
    scratch = sql.Identifier("public", name)
    env.sql(sql.SQL("CREATE TABLE {} (n int)").format(scratch))
    relay = env.relay(metrics=True, source_timeout=1)
    relay.wait_streaming()
    t0 = time.monotonic()
    env.sql(sql.SQL("INSERT INTO {} SELECT generate_series(1, 3000000)").format(scratch))
    rows = env.insert([env.event("after.big", {"i": i}) for i in range(10)])
    env.wait_sink_count(len(rows), timeout=120)
    took = time.monotonic() - t0
    busy = [line for line in relay.log().splitlines() if "walsender" in line and "busy" in line]
    print(f"3M-row transaction elsewhere: next events after {took:.1f}s, {len(busy)} busy looks")
    assert busy, f"the walsender was never silent for 1 s?\n{relay.tail()}"
    assert not relay.metric("cdc_reconnects_total"), relay.tail()
    env.check_all_delivered(quiet=1.0)


@pytest.mark.parametrize("mode", ["freeze", "mute"])
def test_frozen_broker_connection_is_detected_within_the_heartbeat(env, tcp_proxy, mode):
    """``freeze``: nothing passes either way. ``mute``: the broker gets every publish but
    nothing it sends (confirms, heartbeats) reaches the relay, until the relay gave up on the
    connection: every publish of the window is then a duplicate, and only once."""
    env.setup()
    relay = env.relay(metrics=True, amqp_url=tcp_proxy.url())
    relay.wait_streaming()
    pid = relay.pid
    work = env.workload(writers=2, events_per_writer=6000, max_txn=MAX_TXN, rate_per_writer=150)
    work.start()
    _flowing(env, work, "before the freeze")

    conns = tcp_proxy.upstream_connections
    warned_before = len(_warnings(relay))
    t_freeze = time.monotonic()
    if mode == "freeze":
        assert tcp_proxy.freeze() >= 1, "the relay had no broker connection to freeze"
        detect, resume = _timeline(relay, tcp_proxy, t_freeze, conns, 60)
    else:
        tcp_proxy.hold()  # holds new connections too: released once the relay gave up
        detect, resume = _timeline(relay, tcp_proxy, t_freeze, conns, 60, tcp_proxy.release)
    assert detect is not None, f"frozen broker connection not noticed in 60s\n{relay.tail()}"
    assert resume is not None, f"the relay did not stream again\n{relay.tail()}"

    total, dups = _check_delivery(env, work)
    warnings = _warnings(relay)[warned_before:]
    print(
        f"broker {mode}: detected after {detect:.1f}s, streaming again after {resume:.1f}s "
        f"(heartbeat 10 s); {total} events, 0 lost, {dups} duplicates, "
        f"{len(warnings)} warning lines: {warnings}"
    )
    assert detect < 25, detect
    assert resume < 35, resume
    assert dups <= WINDOW + MAX_TXN
    assert len(warnings) <= 5, warnings
    assert relay.metric("cdc_republished_total") in (None, 0)
    assert relay.pid == pid and relay.alive()


def test_broker_memory_alarm_reports_blocked(env, memory_alarm):
    env.setup()
    # A short confirm timeout: waiting on a blocked broker must not count against it.
    relay = env.relay(metrics=True, confirm_timeout=1)
    relay.wait_streaming()
    before = env.insert([env.event("alarm.before", {"i": i}) for i in range(100)])
    env.wait_sink_count(len(before), timeout=30)
    assert relay.metric("cdc_broker_blocked") == 0

    memory_alarm.raise_()
    try:
        during = env.insert([env.event("alarm.during", {"i": i}) for i in range(100)])
        blocked_after = relay.wait_state("blocked", timeout=30)
        assert relay.metric("cdc_broker_blocked") == 1
        assert relay.metric("cdc_relay_state", state="blocked") == 1
        time.sleep(3)  # three confirm timeouts while blocked
        assert relay.state() == "blocked"
    finally:
        memory_alarm.restore()
    unblocked_after = relay.wait_state("streaming", timeout=30)
    assert relay.metric("cdc_broker_blocked") == 0

    after = env.insert([env.event("alarm.after", {"i": i}) for i in range(100)])
    rows, dups = env.check_all_delivered(quiet=1.0)
    assert len(rows) == len(before) + len(during) + len(after)
    print(
        f"memory alarm: 'blocked' {blocked_after:.1f}s after the insert, 'streaming' "
        f"{unblocked_after:.1f}s after the alarm cleared; {len(rows)} events, 0 lost, "
        f"{dups} duplicates"
    )
    assert not relay.metric("cdc_reconnects_total"), relay.tail()
    assert not relay.metric("cdc_republished_total"), relay.tail()
