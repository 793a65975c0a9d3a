"""Frozen dataclasses built on the relay's hot path through their slots.

A frozen dataclass's ``__init__`` must set each field through ``object.__setattr__`` (plain
assignment is what it forbids), which costs about 1.6 times as much as setting the slots
directly. The relay builds three of them per event (XLogData, Insert, OutboxEvent), so those
are made with ``new(cls)`` and the setters from :func:`setters`: the result is the same
frozen instance, equal to the one ``cls(...)`` gives.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

#: An instance of a class without running its ``__init__``; its slots are then set.
new = object.__new__


def setters(cls: type, *names: str) -> tuple[Callable[[Any, Any], None], ...]:
    """The slot setters of ``cls``'s fields, which ``names`` must list all of, in order (so a
    field added later cannot be left unset by a builder that forgot it)."""
    declared = tuple(f.name for f in dataclasses.fields(cls))
    if names != declared:
        raise TypeError(f"{cls.__name__} has the fields {declared}, not {names}")
    return tuple(cls.__dict__[name].__set__ for name in names)
