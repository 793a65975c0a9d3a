"""Topic-pattern matching (as a topic exchange does it) and route/validation decisions."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from consumers.runtime.dispatch import Accepted, Rejected, find_route, resolve
from consumers.runtime.headers import KIND_NO_MESSAGE_ID, KIND_NO_ROUTE, KIND_VALIDATION
from consumers.runtime.spec import Route
from consumers.runtime.topic import matches


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("device.started", "device.started", True),
        ("device.started", "device.stopped", False),
        ("device.*", "device.started", True),
        ("device.*", "device", False),
        ("device.*", "device.a.b", False),
        ("device.#", "device", True),  # '#' matches zero words
        ("device.#", "device.a.b.c", True),
        ("#", "anything.at.all", True),
        ("#", "", True),
        ("*", "one", True),
        ("*", "one.two", False),
        ("#.deleted", "device.deleted", True),
        ("#.deleted", "deleted", True),
        ("#.deleted", "device.deleted.not", False),
        ("*.#.c", "a.c", True),
        ("*.#.c", "a.b.b.c", True),
        ("*.#.c", "c", False),
        ("a.#.#.b", "a.b", True),
        ("user.*.x", "user.updated.x", True),
        ("user.*.x", "user..x", True),  # an empty word is still a word for '*'
        ("billing.balance_low", "billing.balance-low", False),
    ],
)
def test_topic_matching(pattern, key, expected):
    assert matches(pattern, key) is expected


class Started(BaseModel):
    device_id: str
    rate: float


class Anything(BaseModel):
    pass


async def _noop(ctx, payload):  # pragma: no cover - never called here
    return None


ROUTES = (
    Route("device.started", Started, _noop),
    Route("device.#", Anything, _noop),
)


def test_first_matching_route_wins():
    assert find_route(ROUTES, "device.started") is ROUTES[0]
    assert find_route(ROUTES, "device.stopped") is ROUTES[1]
    assert find_route(ROUTES, "user.updated") is None


def test_valid_body_is_accepted_with_its_model():
    got = resolve(ROUTES, "device.started", "m1", b'{"device_id": "d1", "rate": 0.5}')
    assert isinstance(got, Accepted)
    assert got.route is ROUTES[0]
    assert got.payload == Started(device_id="d1", rate=0.5)


@pytest.mark.parametrize(
    ("key", "mid", "body", "kind", "words"),
    [
        ("device.started", "m1", b'{"device_id": "d1"}', KIND_VALIDATION, ["rate", "required"]),
        ("device.started", "m1", b"not json", KIND_VALIDATION, ["json"]),
        ("device.started", "m1", b'{"device_id": 1, "rate": "x"}', KIND_VALIDATION, ["rate"]),
        ("user.updated", "m1", b"{}", KIND_NO_ROUTE, ["user.updated"]),
        ("device.started", None, b"{}", KIND_NO_MESSAGE_ID, ["message_id"]),
        ("device.started", "", b"{}", KIND_NO_MESSAGE_ID, ["message_id"]),
    ],
)
def test_rejections_say_why(key, mid, body, kind, words):
    got = resolve(ROUTES, key, mid, body)
    assert isinstance(got, Rejected)
    assert got.kind == kind
    for word in words:
        assert word.lower() in got.reason.lower(), got.reason
