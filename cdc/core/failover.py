"""Is the relay's slot failover-ready on each standby? The rules, without I/O.

On PostgreSQL 17+ a logical slot created with ``failover = true`` is copied to standbys
that run the slot sync worker. A promoted standby lets the relay continue from that copy,
but only if the copy exists, is ``synced`` and is no longer ``temporary``: the sync worker
first creates it as temporary and makes it persistent only once the primary's slot has
moved past what the standby can guarantee; a temporary copy is dropped at promotion.

The primary can tell whether the slot is a failover slot and whether each standby is set
up for it (physical slot listed in ``synchronized_standby_slots``, feedback on); only the
standby itself can tell whether its copy is persistent. :func:`assess` combines what is
known: ``ready`` is True only when a standby was checked directly and nothing is wrong,
False when something is, and None when the primary alone cannot tell.
"""

from __future__ import annotations

from dataclasses import dataclass

#: First server version with failover slots (``server_version_num``).
FAILOVER_SLOTS_SINCE = 170000


@dataclass(frozen=True, slots=True)
class PrimaryFacts:
    """What the primary says about the relay's slot and its failover settings."""

    server_version: int
    slot_name: str
    slot_exists: bool
    slot_failover: bool | None  # None before 17 (no such column)
    synchronized_standby_slots: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StandbyLink:
    """One physical standby as the primary sees it (``pg_stat_replication`` + physical slot)."""

    name: str  # application_name, or the physical slot's name when not connected
    state: str | None  # None: not connected now
    physical_slot: str | None
    sends_feedback: bool  # an xmin arrives from it: hot_standby_feedback is on


@dataclass(frozen=True, slots=True)
class StandbyView:
    """What a standby says about itself and its copy of the slot (queried directly)."""

    name: str  # host:port it was reached at
    in_recovery: bool
    wal_level: str
    hot_standby_feedback: bool
    sync_replication_slots: bool | None  # None before 17
    primary_slot_name: str
    conninfo_has_dbname: bool | None  # None: this role may not read primary_conninfo
    copy_exists: bool
    copy_synced: bool = False
    copy_temporary: bool = False
    copy_invalidation: str | None = None


@dataclass(frozen=True, slots=True)
class Readiness:
    """The verdict for one standby; ``reasons`` say what is wrong and what to do."""

    standby: str
    physical_slot: str | None
    state: str | None
    checked: bool
    ready: bool | None
    reasons: tuple[str, ...]


def supported(server_version: int) -> bool:
    """Whether a server of ``server_version_num`` has failover slots."""
    return server_version >= FAILOVER_SLOTS_SINCE


def _slot_reasons(primary: PrimaryFacts) -> list[str]:
    if not supported(primary.server_version):
        major = primary.server_version // 10000
        return [
            f"PostgreSQL {major} has no failover slots (17+): a promoted standby has no copy "
            "of the slot, so after a failover run `cdc recover`"
        ]
    if not primary.slot_exists:
        return [f"slot {primary.slot_name} does not exist on the primary: run `cdc setup`"]
    if not primary.slot_failover:
        return [
            f"slot {primary.slot_name} is not a failover slot: with the relay stopped, run "
            f"ALTER_REPLICATION_SLOT {primary.slot_name} (FAILOVER true) on a replication "
            "connection"
        ]
    return []


def _link_reasons(primary: PrimaryFacts, link: StandbyLink) -> list[str]:
    if not supported(primary.server_version):
        return []  # nothing a standby could change: the slot reason says it all
    reasons = []
    if link.state != "streaming":
        reasons.append(f"standby {link.name} is {link.state or 'not connected'}, not streaming")
    if link.physical_slot is None:
        reasons.append(
            f"standby {link.name} streams without a physical slot: set primary_slot_name on it"
        )
    elif link.physical_slot not in primary.synchronized_standby_slots:
        reasons.append(
            f"physical slot {link.physical_slot} is not in synchronized_standby_slots on the "
            "primary: add it, or the relay may confirm WAL this standby never received"
        )
    if link.state is not None and not link.sends_feedback:
        reasons.append(
            f"no xmin arrives from standby {link.name}: set hot_standby_feedback = on there"
        )
    return reasons


def _view_reasons(
    primary: PrimaryFacts, view: StandbyView, link: StandbyLink | None
) -> list[str]:
    name, slot = view.name, primary.slot_name
    if not supported(primary.server_version):
        return []
    if not view.in_recovery:
        return [f"{name} is not a standby (not in recovery)"]
    reasons = []
    if link is None:
        reasons.append(f"the primary lists no standby on physical slot "
                       f"{view.primary_slot_name or '(none)'} for {name}")
    if view.wal_level != "logical":
        reasons.append(f"wal_level is {view.wal_level} on {name}: set it to logical")
    if not view.hot_standby_feedback:
        reasons.append(f"set hot_standby_feedback = on on {name}")
    if view.sync_replication_slots is False:
        reasons.append(f"set sync_replication_slots = on on {name}")
    if not view.primary_slot_name:
        reasons.append(f"set primary_slot_name on {name} (a physical slot on the primary)")
    if view.conninfo_has_dbname is None:
        reasons.append(f"cannot read primary_conninfo on {name}: grant pg_read_all_settings")
    elif not view.conninfo_has_dbname:
        reasons.append(f"add dbname=... to primary_conninfo on {name} (slot sync needs it)")
    if not view.copy_exists:
        reasons.append(f"no copy of slot {slot} on {name} yet (see the standby's log)")
    elif not view.copy_synced:
        reasons.append(f"slot {slot} on {name} was created there, it is not a synced copy")
    elif view.copy_invalidation:
        reasons.append(f"the copy of slot {slot} on {name} is invalidated "
                       f"({view.copy_invalidation})")
    elif view.copy_temporary:
        reasons.append(
            f"the copy of slot {slot} on {name} is still temporary and would be dropped at "
            "promotion; it turns persistent once the relay's slot moves on (keep it streaming)"
        )
    return reasons


def _match(view: StandbyView, links: list[StandbyLink]) -> StandbyLink | None:
    for link in links:
        if view.primary_slot_name and link.physical_slot == view.primary_slot_name:
            return link
    return None


def assess(
    primary: PrimaryFacts, links: list[StandbyLink], views: list[StandbyView]
) -> list[Readiness]:
    """One verdict per standby known to the primary or queried directly (see module doc)."""
    slot = _slot_reasons(primary)
    out: list[Readiness] = []
    matched: set[int] = set()
    for view in views:
        link = _match(view, links)
        reasons = list(slot)
        if link is not None:
            matched.add(id(link))
            reasons += _link_reasons(primary, link)
        reasons += _view_reasons(primary, view, link)
        out.append(
            Readiness(view.name, view.primary_slot_name or None,
                      link.state if link else None, True, not reasons, tuple(reasons))
        )
    for link in links:
        if id(link) in matched:
            continue
        reasons = slot + _link_reasons(primary, link)
        out.append(
            Readiness(link.name, link.physical_slot, link.state, False,
                      False if reasons else None, tuple(reasons))
        )
    return out
