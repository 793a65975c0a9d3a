"""Reads the failover facts for `cdc status`: from the primary and, if given, from standbys.

The rules that turn these facts into a verdict are in ``cdc/core/failover.py``; this module
only queries. A standby is reached with its own URL (``cdc status --standby-url``); it is
reported by ``host:port``, never by its URL, so no password reaches the output.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from cdc.config import RelaySettings
from cdc.core.failover import PrimaryFacts, Readiness, StandbyLink, StandbyView, assess, supported
from cdc.errors import SourceError

Conn = psycopg.Connection[tuple[Any, ...]]

# Physical walsenders have no database; pg_basebackup's show the state 'backup'.
_LINKS = """
SELECT coalesce(r.application_name, s.slot_name), r.state, s.slot_name,
       (r.backend_xmin IS NOT NULL OR s.xmin IS NOT NULL)
FROM pg_stat_replication r
JOIN pg_stat_activity a ON a.pid = r.pid AND a.datname IS NULL
LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid AND s.slot_type = 'physical'
WHERE r.state IS DISTINCT FROM 'backup'
UNION ALL
SELECT slot_name, NULL, slot_name, false
FROM pg_replication_slots WHERE slot_type = 'physical' AND NOT active
ORDER BY 1
"""


def primary_facts(conn: Conn, slot_name: str) -> tuple[PrimaryFacts, list[StandbyLink]]:
    """The slot's failover flag, ``synchronized_standby_slots`` and the physical standbys."""
    version = conn.info.server_version
    failover: bool | None = None
    listed: tuple[str, ...] = ()
    if supported(version):
        row = conn.execute(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = %s", (slot_name,)
        ).fetchone()
        exists = row is not None
        failover = bool(row[0]) if row else None
        setting = conn.execute("SELECT current_setting('synchronized_standby_slots')").fetchone()
        listed = tuple(s.strip() for s in (setting[0] if setting else "").split(",") if s.strip())
    else:
        exists = conn.execute(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot_name,)
        ).fetchone() is not None
    links = [StandbyLink(*row) for row in conn.execute(_LINKS).fetchall()]
    return PrimaryFacts(version, slot_name, exists, failover, listed), links


def _where(url: str) -> str:
    try:
        info = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "standby"
    return f"{info.get('host', 'localhost')}:{info.get('port', '5432')}"


def standby_view(url: str, slot_name: str) -> StandbyView:
    """What the standby at ``url`` says about itself and its copy of ``slot_name``."""
    name = _where(url)
    try:
        conn = psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        raise SourceError(f"cannot connect to standby {name}: {exc}".strip()) from exc
    with conn:
        new = supported(conn.info.server_version)
        row = conn.execute(
            "SELECT pg_is_in_recovery(), current_setting('wal_level'), "
            "current_setting('hot_standby_feedback')::bool, "
            + ("current_setting('sync_replication_slots')::bool, " if new else "NULL, ")
            + "current_setting('primary_slot_name')"
        ).fetchone()
        assert row is not None
        has_dbname = _conninfo_has_dbname(conn)
        copy = conn.execute(
            "SELECT " + ("synced, temporary, invalidation_reason" if new else
                         "false, temporary, NULL")
            + " FROM pg_replication_slots WHERE slot_name = %s",
            (slot_name,),
        ).fetchone()
    in_recovery, wal_level, feedback, sync, primary_slot = row
    return StandbyView(
        name, in_recovery, wal_level, feedback, sync, primary_slot, has_dbname,
        copy_exists=copy is not None,
        copy_synced=bool(copy and copy[0]),
        copy_temporary=bool(copy and copy[1]),
        copy_invalidation=copy[2] if copy else None,
    )


def _conninfo_has_dbname(conn: Conn) -> bool | None:
    """Whether primary_conninfo names a database; None if this role may not read it."""
    try:
        row = conn.execute("SELECT current_setting('primary_conninfo')").fetchone()
    except psycopg.errors.InsufficientPrivilege:
        return None
    try:
        return bool(row and row[0] and conninfo_to_dict(row[0]).get("dbname"))
    except psycopg.ProgrammingError:
        return False


def failover_status(
    conn: Conn, settings: RelaySettings, standby_urls: list[str]
) -> dict[str, Any]:
    """The ``failover`` part of `cdc status --json` (keys in docs/contract.md)."""
    primary, links = primary_facts(conn, settings.slot_name)
    views = [standby_view(url, settings.slot_name) for url in standby_urls]
    verdicts: list[Readiness] = assess(primary, links, views)
    return {
        "supported": supported(primary.server_version),
        "slot_failover": primary.slot_failover,
        "synchronized_standby_slots": list(primary.synchronized_standby_slots),
        "standbys": [asdict(v) | {"reasons": list(v.reasons)} for v in verdicts],
    }
