"""``python -m consumers dlq list|show|replay|purge`` against the real broker."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration


def test_dlq_round_trip(ledger):
    w = ledger.start()
    ledger.block("blocked-key")
    a, b, c = ledger.publish(
        [
            ledger.entry("blocked-key", 1, fail="blocked"),
            ledger.entry("blocked-key", 2, fail="blocked"),
            ledger.entry("gone", 3, fail="permanent"),
        ]
    )
    ledger.wait_parked(3)
    worker = ["--worker", "tests.workers.ledger"]

    # list: the parking queue and its count
    res = ledger.consumers_cli("dlq", "list", *worker)
    assert res.returncode == 0, res.stderr
    assert f"{ledger.parking_queue}\t3" in res.stdout.splitlines()

    # show: headers and bodies, and the messages stay parked
    res = ledger.consumers_cli("dlq", "show", ledger.parking_queue, "-n", "2")
    assert res.returncode == 0, res.stderr
    shown = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(shown) == 2
    for doc in shown:
        assert doc["origin_queue"] == ledger.queue
        assert doc["routing_key"] == "ledger.entry"
        assert doc["attempts"] == 1
        assert doc["error_kind"] == "permanent"
        assert "blocked" in doc["error"] or "permanently" in doc["error"]
        assert json.loads(doc["body"])["key"] in ("blocked-key", "gone")
    assert ledger.broker.queue_count(ledger.parking_queue) == 3

    # replay one by id after fixing the cause: it goes back to the origin queue and succeeds
    ledger.unblock("blocked-key")
    res = ledger.consumers_cli("dlq", "replay", ledger.parking_queue, "--id", a)
    assert res.returncode == 0, res.stderr
    assert f"replayed {a} -> {ledger.queue}" in res.stdout
    ledger.wait_rows(1)
    assert [(r[0], r[3]) for r in ledger.rows()] == [(a, 1)]  # attempt counter reset
    assert ledger.broker.queue_count(ledger.parking_queue) == 2

    # replay an id that is not there: usage error, nothing changes
    res = ledger.consumers_cli("dlq", "replay", ledger.parking_queue, "--id", "nope")
    assert res.returncode == 2
    assert ledger.broker.queue_count(ledger.parking_queue) == 2

    # replay --all: b succeeds now, c fails permanently again and is parked again
    res = ledger.consumers_cli("dlq", "replay", ledger.parking_queue, "--all")
    assert res.returncode == 0, res.stderr
    ledger.wait_rows(2)
    ledger.wait_parked(1)
    assert {r[0] for r in ledger.rows()} == {a, b}

    # purge needs --yes, then empties the queue
    res = ledger.consumers_cli("dlq", "purge", ledger.parking_queue)
    assert res.returncode == 2 and "--yes" in res.stderr
    assert ledger.broker.queue_count(ledger.parking_queue) == 1
    res = ledger.consumers_cli("dlq", "purge", ledger.parking_queue, "--yes")
    assert res.returncode == 0, res.stderr
    assert "purged 1" in res.stdout
    assert ledger.broker.queue_count(ledger.parking_queue) == 0
    assert c not in {r[0] for r in ledger.rows()}

    # a queue that is not a parking queue, or does not exist, is refused
    res = ledger.consumers_cli("dlq", "purge", ledger.queue, "--yes")
    assert res.returncode == 2
    assert ledger.broker.queue_count(ledger.queue) is not None
    res = ledger.consumers_cli("dlq", "show", f"{ledger.ns}.missing.parked")
    assert res.returncode == 2 and "no queue" in res.stderr
    assert w.sigterm() == 0


def test_a_message_without_message_id_stays_without_one_when_parked_and_replayed(ledger):
    """The parked copy keeps the original properties, an absent message_id included, so a
    replay cannot process it under an invented id (it is parked again, for the same reason)."""
    ledger.start()
    ledger.publish_without_id(ledger.entry("anon", 5))
    ledger.wait_parked(1)

    res = ledger.consumers_cli("dlq", "show", ledger.parking_queue)
    assert res.returncode == 0, res.stderr
    [doc] = [json.loads(line) for line in res.stdout.splitlines()]
    assert doc["message_id"] is None
    assert doc["error_kind"] == "no-message-id"
    assert doc["attempts"] == 1

    res = ledger.consumers_cli("dlq", "replay", ledger.parking_queue, "--all")
    assert res.returncode == 0, res.stderr
    assert "1 replayed" in res.stdout
    # the worker takes it again, still without an id, and parks it again; nothing processed
    ledger.wait_for(
        lambda: ledger.broker.queue_count(ledger.parking_queue) == 1
        and ledger.broker.queue_count(ledger.queue) == 0,
        20,
        "the replayed message to be parked again",
    )
    [parked] = ledger.broker.drain(ledger.parking_queue, expected=1, quiet=0.3, timeout=15)
    assert parked.message_id is None
    assert parked.headers["x-cdc-error-kind"] == "no-message-id"
    assert parked.content_type == "application/json"
    assert ledger.rows() == []


def _park_raw(ledger, body: bytes, headers: dict, queue: str) -> None:
    """Publish ``body`` with ``headers`` straight to ``queue`` (default exchange, confirmed)."""
    from pamqp.commands import Basic

    async def fn(ch) -> None:
        raw = await ch.get_underlay_channel()
        props = Basic.Properties(headers=headers, delivery_mode=2, message_id="bundle-1")
        await raw.basic_publish(body, exchange="", routing_key=queue, properties=props, timeout=30)

    ledger.broker._run(fn)


def _retry_bundle(ledger, ids: list[str]) -> tuple[bytes, dict]:
    """A retry bundle of ledger entries (each after one failed attempt), as a worker makes it."""
    from pamqp.commands import Basic

    from consumers.runtime import bundle
    from consumers.runtime import headers as hdr

    members = [
        bundle.Member(
            ledger.queue,
            Basic.Properties(
                message_id=mid,
                content_type="application/json",
                delivery_mode=2,
                headers=hdr.retry_headers(
                    {}, attempts=1, routing_key="ledger.entry", origin_queue=ledger.queue,
                    retry_queue="some.retry.queue",
                ),
            ),
            json.dumps(ledger.entry(f"k{n}", n)).encode(),
        )
        for n, mid in enumerate(ids)
    ]
    headers = {bundle.BUNDLE_HEADER: bundle.VERSION, "x-cdc-origin-queue": ledger.queue}
    return bundle.encode(members), headers


def test_a_retry_bundle_parked_by_an_older_worker_is_unpacked_when_replayed(ledger):
    """An older worker parks a retry bundle as one malformed message (no route for it); after
    the upgrade ``dlq replay`` puts it back and each member is processed once, as its own
    message with its own attempt count."""
    from consumers.runtime import headers as hdr

    ledger.start()
    ids = ["m-1", "m-2", "m-3"]
    body, headers = _retry_bundle(ledger, ids)
    parked = hdr.parking_headers(
        headers, attempts=1, routing_key=ledger.queue, origin_queue=ledger.queue,
        kind="no-route", error="no route", consumer="ledger", parked_at="2026-12-06T22:00:00",
    )
    _park_raw(ledger, body, parked, ledger.parking_queue)
    res = ledger.consumers_cli("dlq", "replay", ledger.parking_queue, "--all")
    assert res.returncode == 0, res.stderr
    ledger.wait_rows(3)
    assert sorted((r[0], r[3]) for r in ledger.rows()) == [(i, 2) for i in ids]
    assert ledger.broker.queue_count(ledger.parking_queue) == 0


def test_a_damaged_bundle_is_parked_whole_and_an_outsiders_bundle_is_not_unpacked(ledger):
    """A bundle from the retry path that cannot be decoded is parked as it is, with the
    reason; a bundle-looking event from the topic exchange is an ordinary (invalid) event."""
    from consumers.runtime import bundle

    ledger.start()
    body, headers = _retry_bundle(ledger, ["d-1", "d-2"])
    _park_raw(ledger, body[:-3], headers, ledger.queue)  # as if it came back from retry
    ledger.wait_parked(1)
    [doc] = ledger.broker.drain(ledger.parking_queue, expected=1, quiet=0.3, timeout=15)
    assert "retry bundle cannot be decoded" in doc.headers["x-cdc-error"]
    assert doc.body == body[:-3]

    _park_raw(ledger, body, {bundle.BUNDLE_HEADER: 1}, ledger.queue)  # no origin: untrusted
    [doc] = ledger.broker.drain(ledger.parking_queue, expected=1, quiet=0.3, timeout=15)
    assert doc.headers["x-cdc-error-kind"] == "no-route"  # its delivery key, the queue name
    assert "retry bundle" not in doc.headers["x-cdc-error"]  # read as an ordinary event
    assert ledger.rows() == []
