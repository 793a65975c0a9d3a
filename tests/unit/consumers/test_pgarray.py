"""``text[]`` literals of id lists (pure): any text arrives unchanged."""

from __future__ import annotations

import re

import pytest

from consumers.runtime.pgarray import text_array

_ELEMENT = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _parse(literal: str) -> list[str]:
    """PostgreSQL's reading of a literal whose elements are all double-quoted."""
    assert literal[0] == "{" and literal[-1] == "}"
    inner = literal[1:-1]
    found = _ELEMENT.findall(inner)
    assert ",".join(f'"{e}"' for e in found) == inner  # nothing between the elements
    return [re.sub(r"\\(.)", r"\1", e) for e in found]


@pytest.mark.parametrize(
    "values",
    [
        [],
        ["0b7d1c4e-3f0a-5a8e-9b61-2d4c8f6e1a37"],
        ["a", "b c", "", "NULL", "{x,y}", " lead", "trail "],
        ['say "hi"', "back\\slash", '\\"', "é ü 日本", "tab\there"],
    ],
)
def test_every_element_is_quoted_and_comes_back_unchanged(values: list[str]) -> None:
    literal = text_array(values)
    assert literal == "{}" if not values else _parse(literal) == values
    assert text_array(iter(values)) == literal  # any iterable

