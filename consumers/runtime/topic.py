"""AMQP topic-pattern matching, the way a topic exchange matches binding keys (pure).

Words are separated by ``.``; ``*`` matches exactly one word, ``#`` zero or more words. The
runtime uses it to pick the route of a message by its original routing key, so the route a
handler sees is the one the broker's binding would have chosen.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1024)
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split("."))


def matches(pattern: str, routing_key: str) -> bool:
    """True when ``routing_key`` matches the topic ``pattern``."""
    return _match(_words(pattern), _words(routing_key))


@lru_cache(maxsize=4096)
def _match(pattern: tuple[str, ...], key: tuple[str, ...]) -> bool:
    if not pattern:
        return not key
    head, rest = pattern[0], pattern[1:]
    if head == "#":
        # '#' swallows 0..len(key) words; try the shortest first.
        return any(_match(rest, key[i:]) for i in range(len(key) + 1))
    if not key:
        return False
    return (head == "*" or head == key[0]) and _match(rest, key[1:])
