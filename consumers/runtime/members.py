"""When a delivery that carries several messages (a retry bundle) is finished (pure).

Each member of a bundle is handled as its own message, but they share the bundle's one
delivery tag. :class:`MemberCounts` lets that tag through to the acks only when every
member is settled (acked, or its copy confirmed), so a crash before that redelivers the
whole bundle; the inbox absorbs the members that were already done.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable


class MemberCounts:
    """The members still unsettled per delivery tag that carries more than one."""

    def __init__(self) -> None:
        self._left: dict[int, int] = {}

    def expect(self, tag: int, members: int) -> None:
        """Delivery ``tag`` carries ``members`` messages."""
        if members > 1:
            self._left[tag] = members

    def finished(self, tags: Iterable[int]) -> list[int]:
        """``tags`` are those of settled messages, one per message: the tags now finished."""
        done = []
        left = self._left
        for tag in tags:
            if tag in left:
                left[tag] -= 1
                if left[tag]:
                    continue
                del left[tag]
            done.append(tag)
        return done

    def would_finish(self, tags: Iterable[int]) -> list[int]:
        """The tags :meth:`finished` would let through for ``tags``, nothing settled yet."""
        return [tag for tag, n in Counter(tags).items() if self._left.get(tag, 1) <= n]

    def clear(self) -> None:
        """The channel is gone: its deliveries come back whole."""
        self._left.clear()
