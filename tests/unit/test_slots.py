"""Frozen dataclasses built through their slots equal the ones their constructor builds."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from cdc.wire import slots
from cdc.wire.pgoutput import Insert, decode
from cdc.wire.replication import XLogData, parse_copy_data


@dataclass(frozen=True, slots=True)
class _Pair:
    left: int
    right: str


def test_an_instance_built_through_its_slots_equals_the_constructed_one() -> None:
    set_left, set_right = slots.setters(_Pair, "left", "right")
    pair = slots.new(_Pair)
    set_left(pair, 1)
    set_right(pair, "x")
    assert pair == _Pair(1, "x") and hash(pair) == hash(_Pair(1, "x"))
    with pytest.raises(AttributeError):
        pair.left = 2  # type: ignore[misc]  # still frozen


@pytest.mark.parametrize("names", [("left",), ("right", "left"), ("left", "right", "extra")])
def test_setters_must_name_every_field_in_order(names: tuple[str, ...]) -> None:
    with pytest.raises(TypeError, match="has the fields"):
        slots.setters(_Pair, *names)


def test_the_hot_path_builders_give_the_constructed_values() -> None:
    # XLogData of an Insert of one text column 'a' into relation 16384
    insert = b"I" + (16384).to_bytes(4, "big") + b"N" + b"\x00\x01" + b"t" + b"\x00\x00\x00\x01a"
    frame = b"w" + (1).to_bytes(8, "big") + (2).to_bytes(8, "big") + (3).to_bytes(8, "big") + insert
    msg = parse_copy_data(frame)
    assert msg == XLogData(1, 2, 3, memoryview(insert))
    assert decode(insert) == Insert(None, 16384, (b"a",))
