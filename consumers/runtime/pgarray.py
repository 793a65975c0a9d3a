"""A list of strings as the text of a PostgreSQL ``text[]`` (pure).

Statements that take many ids (``message_id = ANY(%s::text[])``, ``unnest(%s::text[])``)
get them as one string, the array's text form, instead of a Python list: psycopg adapts a
list element by element in Python (a few µs per id, per statement), which made up a
noticeable share of a notifications worker's CPU per webhook. The text form is built with
two C-level joins. Every element is double-quoted, ``"`` and ``\\`` escaped with a
backslash (the array input rules), so any text arrives unchanged; a string cannot hold
NUL, like any ``text``.
"""

from __future__ import annotations

from collections.abc import Iterable


def text_array(values: Iterable[str]) -> str:
    """The ``text[]`` literal of ``values``, e.g. ``{"a","b \\"c\\""}``; ``{}`` if none."""
    items = list(values)
    if not items:
        return "{}"
    raw = "".join(items)
    if '"' in raw or "\\" in raw:
        items = [v.replace("\\", "\\\\").replace('"', '\\"') for v in items]
    return '{"' + '","'.join(items) + '"}'
