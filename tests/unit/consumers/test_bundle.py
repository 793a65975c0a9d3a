"""The retry bundle codec: real retry copies in, the same messages out; damage is refused."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from types import SimpleNamespace

import pytest
from pamqp.commands import Basic

from cdc.wire.deliveries import Delivered
from consumers.errors import BadBundle
from consumers.runtime import bundle
from consumers.runtime import headers as hdr
from consumers.runtime.bundle import Member
from consumers.runtime.copies import chunks
from consumers.runtime.intake import intake, unpack
from consumers.runtime.policy import Park, RetryRules
from consumers.runtime.republish import ABSENT_ID, copy_properties


def _retry_copy(n: int, **extra: object) -> Member:
    """A member as the runtime makes it: a relay event's properties with retry headers."""
    event = Basic.Properties(
        content_type="application/json",
        message_id=f"ev-{n}",
        timestamp=dt.datetime(2026, 12, 6, 22, 30, n, tzinfo=dt.UTC),
        app_id="cdc",
        headers={"commit_time": "2026-12-06T22:30:00+00:00", "lsn": 1234 + n, **extra},
    )
    headers = hdr.retry_headers(
        event.headers,
        attempts=n,
        routing_key=f"user.{n}.signed_up",
        origin_queue="cdc.notifications.events",
        retry_queue="cdc.notifications.retry.20s",
    )
    body = b'{"user_id": %d, "email": "u%d@example.com"}' % (n, n)
    return Member("cdc.notifications.events", copy_properties(event, headers), body)


def test_members_come_back_with_their_keys_properties_typed_headers_and_bodies() -> None:
    members = [
        _retry_copy(1),
        _retry_copy(2, amount=Decimal("12.50"), flag=True, nested={"a": [1, "x"]}),
        Member("q", Basic.Properties(message_id=ABSENT_ID, headers={}), b""),
    ]
    out = bundle.decode(bundle.encode(members), bundle.VERSION)
    assert [m.routing_key for m in out] == [m.routing_key for m in members]
    assert [m.body for m in out] == [m.body for m in members]
    for before, after in zip(members[:2], out[:2], strict=True):
        assert after.properties == before.properties
    assert out[1].properties.headers["amount"] == Decimal("12.50")
    assert out[1].properties.headers["nested"] == {"a": [1, "x"]}
    assert out[1].properties.headers[hdr.ATTEMPT_HEADER] == 2
    assert not out[2].properties.message_id  # absent stays absent


def test_members_encoded_one_by_one_join_into_the_same_body() -> None:
    members = [_retry_copy(n) for n in range(1, 4)]
    encoded = [bundle.encode_member(m) for m in members]
    body = bundle.join(encoded)
    assert body == bundle.encode(members)
    assert len(body) == 4 + sum(len(e) for e in encoded)
    assert [m.properties.message_id for m in bundle.decode(body, bundle.VERSION)] == [
        m.properties.message_id for m in members
    ]


def test_a_group_over_the_body_limit_is_split_and_each_member_goes_once_whole(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    members = [_retry_copy(n) for n in range(1, 6)]
    one = len(bundle.encode_member(members[0]))
    monkeypatch.setattr(bundle, "MAX_BODY", 2 * one + one // 2)  # two members fit, not three
    copier = SimpleNamespace(member=lambda handled: handled)
    split = chunks(copier, members)  # type: ignore[arg-type]
    assert [len(c) for c in split] == [2, 2, 1]
    assert [mid for c in split for mid, _ in c] == [f"ev-{n}" for n in range(1, 6)]
    assert [e for c in split for _, e in c] == [bundle.encode_member(m) for m in members]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda b: b[:2], "a length was expected"),
        (lambda b: b[:-1], "member 2 of 2: a .*runs past"),
        (lambda b: b + b"x", "1 bytes after the last"),
        (lambda b: b"\0\0\0\1" + b"\0\0\0\1q" + b"\0\0\0\2ab" + b"\0\0\0\0", "member 1 of 1"),
    ],
)
def test_a_damaged_body_is_refused_with_where(damage, message) -> None:  # type: ignore[no-untyped-def]
    body = damage(bundle.encode([_retry_copy(1), _retry_copy(2)]))
    with pytest.raises(BadBundle, match=message):
        bundle.decode(body, bundle.VERSION)


def test_another_format_version_is_refused() -> None:
    with pytest.raises(BadBundle, match="version 2"):
        bundle.decode(bundle.encode([_retry_copy(1)]), 2)


def test_is_bundle_reads_the_header() -> None:
    assert bundle.is_bundle({bundle.BUNDLE_HEADER: 1})
    assert not bundle.is_bundle({"x-cdc-attempt": 1})
    assert not bundle.is_bundle(None)


def _delivered(body: bytes, headers: dict, exchange: str = "") -> Delivered:
    props = Basic.Properties(headers=headers, message_id="b-1")
    return Delivered("ctag", 42, True, exchange, "cdc.notifications.events", props, body)


_ORIGIN = "cdc.notifications.events"


def test_a_bundle_that_came_back_is_unpacked_into_deliveries_of_its_own() -> None:
    members = [_retry_copy(1), _retry_copy(2)]
    headers = {bundle.BUNDLE_HEADER: 1, hdr.ORIGIN_QUEUE_HEADER: _ORIGIN, "x-delivery-count": 1}
    out = unpack(_ORIGIN, _delivered(bundle.encode(members), headers))
    assert [m.properties.message_id for m in out] == ["ev-1", "ev-2"]
    assert {(m.delivery_tag, m.redelivered, m.exchange) for m in out} == {(42, True, "")}
    assert [m.body for m in out] == [m.body for m in members]
    # the bundle's redelivery counts for every member
    assert all(m.properties.headers["x-delivery-count"] == 1 for m in out)
    _, rejected = intake([], RetryRules(5, (1.0,)), [(_ORIGIN, m) for m in out])
    assert [h.delivery.attempt for h in rejected] == [3, 4]  # own attempts + the redelivery


def test_an_outsiders_or_a_damaged_bundle_stays_one_message() -> None:
    body = bundle.encode([_retry_copy(1), _retry_copy(2)])
    outsider = _delivered(body, {bundle.BUNDLE_HEADER: 1, hdr.ORIGIN_QUEUE_HEADER: _ORIGIN}, "ev")
    assert unpack(_ORIGIN, outsider) == [outsider]
    damaged = _delivered(body[:-1], {bundle.BUNDLE_HEADER: 1, hdr.ORIGIN_QUEUE_HEADER: _ORIGIN})
    assert unpack(_ORIGIN, damaged) == [damaged]
    _, [parked] = intake([], RetryRules(5, (1.0,)), [(_ORIGIN, damaged)])
    assert isinstance(parked.disposition, Park)
    assert parked.disposition.reason.startswith("retry bundle cannot be decoded: member 2 of 2")
