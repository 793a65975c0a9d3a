"""Unroutable and malformed events are parked with a reason and counted, never dropped.

The sink is bound only to ``ok.#``. An event type nobody is bound to comes back from the
broker (mandatory) and must be parked as ``unroutable`` with the original message. Rows the
relay cannot turn into a message (NULL or empty ``event_type``, a routing key over 255 bytes,
``headers`` that is not a JSON object) are parked as ``malformed`` with the row as a JSON
object. The relay keeps streaming, later events flow, and ``cdc_events_parked_total`` counts
each kind.
"""

from __future__ import annotations

import json

import pytest
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_unroutable_and_malformed_are_parked(env):
    env.broker.unbind(env.sink_queue, env.exchange, "#")
    env.broker.bind(env.sink_queue, env.exchange, "ok.#")
    env.setup()
    env.ensure_headers_column()
    t = env.table_ident()
    # the default table forbids NULL event_type; legacy tables may not: allow it here
    env.sql(sql.SQL("ALTER TABLE {} ALTER COLUMN event_type DROP NOT NULL").format(t))
    env.sql(sql.SQL("ALTER TABLE {} ALTER COLUMN event_type TYPE text").format(t))
    relay = env.relay(metrics=True)
    relay.wait_streaming()

    before = [env.event("ok.before", {"i": 0})]
    unroutable = [
        env.event("nobody.listens", {"u": 1}, headers={"trace_id": "t-1"}),
        env.event("also.unbound.here", {"u": 2}),
    ]
    malformed = {
        "null-type": env.event(None, {"m": 1}),
        "empty-type": env.event("", {"m": 2}),
        "long-key": env.event("ok." + "k" * 300, {"m": 3}),
        "headers-array": env.event("ok.bad_headers", {"m": 4}, headers=env.raw_json("[1, 2]")),
    }
    after = [env.event("ok.after", {"i": i}) for i in range(1, 4)]
    env.insert(before)
    env.insert([unroutable[0], malformed["null-type"], malformed["empty-type"]])
    env.insert([malformed["long-key"], unroutable[1], malformed["headers-array"]])
    env.insert(after)
    rows = env.fetch_rows()

    parked = env.drain(
        len(unroutable) + len(malformed), queue=env.parking_queue, quiet=1.0, timeout=30
    )
    good = env.drain(len(before) + len(after), quiet=0.5, timeout=30)

    # routable events still flow, in order, per the contract
    env.check_exactly_once(good, {r["id"]: rows[r["id"]] for r in before + after})
    assert [m.message_id for m in good] == [r["id"] for r in before + after]

    by_id = {m.message_id: m for m in parked}
    assert len(parked) == len(unroutable) + len(malformed), [m.headers for m in parked]
    assert set(by_id) == {r["id"] for r in unroutable} | {r["id"] for r in malformed.values()}
    for m in parked:
        assert m.routing_key == env.parking_queue and m.exchange == ""
        assert m.delivery_mode == 2
        assert isinstance(m.headers.get("x-parked-reason"), str) and m.headers["x-parked-reason"]
        assert m.headers.get("x-original-exchange") == env.exchange

    for r in unroutable:
        m = by_id[r["id"]]
        assert m.headers["x-parked-kind"] == "unroutable", m.headers
        assert m.headers["x-original-routing-key"] == r["event_type"]
        # the original message, untouched: body, properties, headers
        assert m.body == rows[r["id"]].payload_text.encode()
        assert m.type == r["event_type"] and m.content_type == "application/json"
        assert m.headers["aggregate_type"] == r["aggregate_type"]
        assert m.headers["aggregate_id"] == r["aggregate_id"]
        assert env.parse_lsn(m.headers["commit_lsn"]) > 0
    assert by_id[unroutable[0]["id"]].headers["trace_id"] == "t-1"

    for name, r in malformed.items():
        m = by_id[r["id"]]
        assert m.headers["x-parked-kind"] == "malformed", (name, m.headers)
        body = json.loads(m.body)
        assert isinstance(body, dict), (name, body)
        assert body["id"] == r["id"], (name, body)
        assert json.loads(body["payload"]) == r["payload"], (name, body)
        assert body["aggregate_type"] == r["aggregate_type"], (name, body)
        assert body.get("event_type") == r["event_type"], (name, body)

    def counted() -> bool:
        return relay.metric("cdc_events_parked_total", kind="unroutable") == len(
            unroutable
        ) and relay.metric("cdc_events_parked_total", kind="malformed") == len(malformed)

    env.wait_for(
        counted,
        10,
        lambda: (
            "cdc_events_parked_total "
            f"unroutable={relay.metric('cdc_events_parked_total', kind='unroutable')} "
            f"malformed={relay.metric('cdc_events_parked_total', kind='malformed')}"
        ),
    )
    assert relay.alive() and relay.state() == "streaming"
    # and it is still streaming new work after all that
    last = env.insert([env.event("ok.last")])[0]
    assert [m.message_id for m in env.drain(1, quiet=0.5)] == [last["id"]]
