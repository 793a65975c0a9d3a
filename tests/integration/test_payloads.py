"""Payloads arrive byte-for-byte: 1 MB values, unicode, escapes, nesting; row headers map.

The body must be exactly ``payload::text`` as PostgreSQL prints it (compared as bytes), and
parse to the same JSON as what was inserted. The row's ``headers`` jsonb keys become AMQP
headers; the relay's own keys win on conflict.
"""

from __future__ import annotations

import json
import secrets
from decimal import Decimal

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

UNICODE_PAYLOADS = [
    {"cjk": "设备已启动 云手机 日本語テキスト 한국어", "key_中文": "值"},
    {"emoji": "🚀📱✅👨‍👩‍👧‍👦🏳️‍🌈", "flag": "🇨🇳", "astral": "\U0001d11e\U0001d54f"},
    {
        "escapes": 'quote " backslash \\ slash / nl \n tab \t cr \r bs \b ff \f',
        "control": "\u0001\u001f",
        "bidi": "\u202e\u2028\u2029",
        "bom": "\ufeff",
    },
    {
        "nested": {"a": [1, 2, {"b": [True, False, None, {"c": "深"}]}], "empty": {}, "arr": []},
        "deep": {"l1": {"l2": {"l3": {"l4": {"l5": ["x"]}}}}},
    },
    {
        "numbers": [0, -1, 1.5, 1e-7, 12345678901234567890, 3.141592653589793238462643383279],
        "big": 1e300,
        "neg_zero": -0.0,
    },
    {"": "empty key", " ": "space key", 'key with "quotes"': 1, "dup_like": "1"},
    ["a", "top-level", "array", 1, None],
    "a bare JSON string 🙂",
    12345,
    {"latin": "café naïve façade Ærø Ωμέγα Кириллица עברית العربية हिन्दी"},
]


def _exact(text: str) -> object:
    return json.loads(text, parse_float=Decimal, parse_int=Decimal)


def test_large_and_unicode_payloads_byte_for_byte(env):
    env.setup()
    relay = env.relay()
    relay.wait_streaming()

    big_ascii = {"blob": secrets.token_hex(512 * 1024)}  # 1 MiB of incompressible hex
    big_cjk = {"text": "云" * (350 * 1024), "tail": "🚀"}  # ~1 MiB of 3-byte UTF-8
    big_nested = {"items": [{"i": i, "v": f"值-{i}", "ok": i % 2 == 0} for i in range(25_000)]}
    payloads = [big_ascii, big_cjk, big_nested, *UNICODE_PAYLOADS]
    events = [env.event("payload.test", p) for p in payloads]
    env.insert(events[:3])  # the three big ones in one transaction
    env.insert(events[3:])

    rows = env.fetch_rows()
    assert len(rows) == len(events)
    for r in events[:3]:
        assert len(rows[r["id"]].payload_text.encode()) >= 1_000_000

    msgs = env.drain(len(events), quiet=1.0, timeout=60)
    env.check_exactly_once(msgs, rows)  # body == payload::text, byte for byte
    by_id = {m.message_id: m for m in msgs}
    for ev in events:
        m = by_id[ev["id"]]
        # same JSON value as inserted (numbers compared as decimals: jsonb stores numeric)
        assert _exact(m.body.decode("utf-8")) == _exact(json.dumps(ev["payload"]))
        assert m.body == rows[ev["id"]].payload_text.encode("utf-8")
    assert (env.broker.queue_count(env.parking_queue) or 0) == 0


def test_row_headers_become_amqp_headers(env):
    env.setup()
    env.ensure_headers_column()
    relay = env.relay()
    relay.wait_streaming()

    events = [
        env.event(
            "headers.test",
            {"n": 1},
            aggregate_type="user",
            aggregate_id="u-1",
            headers={
                "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
                "tenant": "租户-1",
                "x-retry-policy": "none",
                "count": 7,
                "flag": True,
                # the relay's keys win over the row's
                "aggregate_type": "spoofed",
                "commit_lsn": "0/0",
            },
        ),
        env.event("headers.test", {"n": 2}, headers={}),
        env.event("headers.test", {"n": 3}),  # headers NULL
    ]
    env.insert(events)
    rows = env.fetch_rows()
    msgs = env.drain(len(events), quiet=1.0)
    env.check_exactly_once(msgs, rows)
    h = {m.message_id: m.headers for m in msgs}[events[0]["id"]]
    assert h["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert h["tenant"] == "租户-1"
    assert h["x-retry-policy"] == "none"
    assert h["count"] == 7
    assert h["flag"] is True
    assert h["aggregate_type"] == "user"
    assert h["commit_lsn"] != "0/0"
    assert env.parse_lsn(h["commit_lsn"]) > 0
    for m in msgs[1:]:
        assert set(m.headers) >= {
            "aggregate_type",
            "aggregate_id",
            "commit_lsn",
            "commit_time",
            "created_at",
        }
