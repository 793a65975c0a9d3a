"""The slot seen over an ordinary connection: connect, `cdc setup`, health, status, walsenders.

The outbox table and the publication are :mod:`cdc.shell.schema`'s. Queries use bound
parameters; identifiers are composed with ``psycopg.sql.Identifier``, never pasted in.
Every refusal is a :class:`SetupError` whose message says what the operator should run.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc.config import RelaySettings
from cdc.core.checkpoint import Action, Checkpoint, Observed, SlotSeen, assess
from cdc.core.lsn import format_lsn
from cdc.errors import RefusedError, SetupError, SourceError
from cdc.service.refusals import refused_by_postgres
from cdc.shell.schema import ensure_publication, ensure_table, table_exists, table_published
from cdc.shell.slot_create import SystemIdentity
from cdc.shell.source import with_keepalives

Conn = psycopg.Connection[tuple[Any, ...]]


def connect(settings: RelaySettings) -> Conn:
    """Open an autocommit connection, translating failures into actionable errors."""
    try:
        dsn = with_keepalives(settings.dsn())
        return psycopg.connect(dsn, autocommit=True)
    except psycopg.OperationalError as exc:
        refused = refused_by_postgres(str(exc), "cannot connect to PostgreSQL")
        raise refused or SourceError(f"cannot connect to PostgreSQL: {exc}".strip()) from exc


def _one(conn: Conn, query: str | sql.Composed, params: tuple[Any, ...] = ()) -> Any:
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def check_server(conn: Conn) -> None:
    """Refuse with instructions unless wal_level is logical and the role may replicate."""
    level = _one(conn, "SHOW wal_level")
    if level != "logical":
        raise SetupError(
            f"wal_level is {level!r}, logical replication needs 'logical': run "
            "ALTER SYSTEM SET wal_level = logical; then restart PostgreSQL"
        )
    can = _one(conn, "SELECT rolsuper OR rolreplication FROM pg_roles WHERE rolname = current_user")
    if not can:
        user = _one(conn, "SELECT current_user")
        raise SetupError(f"role {user!r} may not replicate: run ALTER ROLE {user} REPLICATION")


def _slot_columns(conn: Conn) -> str:
    """pg_replication_slots columns of this server version, NULL where it lacks them."""
    version = conn.info.server_version
    return ", ".join(
        [
            "plugin",
            "wal_status",
            "invalidation_reason" if version >= 170000 else "NULL::text",
            "conflicting" if version >= 160000 else "NULL::boolean",
            "failover" if version >= 170000 else "NULL::boolean",
        ]
    )


def slot_seen(conn: Conn, settings: RelaySettings) -> SlotSeen | None:
    """The slot's health columns, or ``None`` if there is no such slot."""
    query = sql.SQL("SELECT {} FROM pg_replication_slots WHERE slot_name = %s").format(
        sql.SQL(_slot_columns(conn))
    )
    row = conn.execute(query, (settings.slot_name,)).fetchone()
    return None if row is None else SlotSeen(*row)


def observe(
    conn: Conn, settings: RelaySettings, identity: SystemIdentity | None = None
) -> Observed:
    """What :func:`cdc.core.checkpoint.assess` needs: the slot, the publication, the server."""
    publication = bool(
        _one(conn, "SELECT count(*) FROM pg_publication WHERE pubname = %s",
             (settings.publication_name,))
    )
    return Observed(
        slot_name=settings.slot_name,
        publication_name=settings.publication_name,
        outbox_table=settings.outbox_table,
        slot=slot_seen(conn, settings),
        publication_exists=publication,
        table_published=publication and table_published(conn, settings),
        system_identifier=identity.system_identifier if identity else None,
        timeline=identity.timeline if identity else None,
    )


#: Wait events of a walsender that waits for WAL or for its client (pg_stat_activity): such
#: a walsender answers a keepalive request at once, so a silent connection to it is dead.
#: Compared in lower case: PostgreSQL 17 renamed WalSenderWaitForWAL to WalSenderWaitForWal.
_WALSENDER_WAITING = frozenset(
    {"walsendermain", "walsenderwaitforwal", "walsenderwritedata", "clientread", "clientwrite"}
)


def busy_with(state: str | None, wait_event: str | None) -> str | None:
    """What a walsender in ``state``/``wait_event`` is busy with, or None if it waits on us.

    A walsender decoding a large transaction that produces no output (changes to tables
    outside the publication) reads its client only every ``wal_sender_timeout / 2``: it is
    alive although it does not answer. It runs (no wait event) or waits on I/O or a lock.
    """
    if state is None or (wait_event or "").lower() in _WALSENDER_WAITING:
        return None
    return wait_event or "running"


def walsender_busy(settings: RelaySettings, pid: int) -> str | None:
    """Look at walsender ``pid`` over a new connection: :func:`busy_with`, None if it is gone.

    Blocking (run it in a thread). A failure to connect counts as "not busy": the path to
    the server is down, which is what the caller suspects.
    """
    dsn = with_keepalives(settings.dsn())
    try:
        with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT state, wait_event FROM pg_stat_activity "
                "WHERE pid = %s AND backend_type = 'walsender'",
                (pid,),
            ).fetchone()
    except psycopg.Error:
        return None
    return busy_with(row[0], row[1]) if row else None


def end_stale_walsender(conn: Conn, settings: RelaySettings, pid: int, wait: float = 10.0) -> bool:
    """Terminate the walsender ``pid`` if it still holds the slot; True if it did.

    Only for a walsender this relay process started itself and then abandoned (a silent
    connection): PostgreSQL keeps it, and the slot, until ``wal_sender_timeout``. While that
    process lives its pid cannot be reused, so an ``active_pid`` equal to it is provably the
    abandoned one. Waits up to ``wait`` seconds for the slot to be released.
    """
    ended = _one(
        conn,
        "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
        "WHERE slot_name = %s AND active AND active_pid = %s",
        (settings.slot_name, pid),
    )
    if not ended:
        return False
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        holder = _one(
            conn,
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
            (settings.slot_name,),
        )
        if holder != pid:
            break
        time.sleep(0.05)
    return True


def prepare(settings: RelaySettings) -> list[str]:
    """`cdc setup` up to the slot: checks, table, publication. Returns what it did."""
    with connect(settings) as conn:
        check_server(conn)
        done = []
        if not table_exists(conn, settings):
            done.append(f"created table {settings.outbox_table}")
        try:
            ensure_table(conn, settings)
            ensure_publication(conn, settings)
        except psycopg.errors.InsufficientPrivilege as exc:
            raise SetupError(
                f"{exc}: grant CREATE on the schema and ownership of the table"
            ) from exc
        done.append(f"publication {settings.publication_name} covers {settings.outbox_table}")
    return done


def has_rows(settings: RelaySettings) -> bool:
    """True if the outbox table holds any row."""
    table = sql.Identifier(settings.table_schema, settings.table_name)
    with connect(settings) as conn:
        return bool(_one(conn, sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(table)))


#: ``health`` in `cdc status`, by verdict: streaming may go on, the slot is lost (exit 5,
#: `cdc recover`), no checkpoint yet (the next start creates or adopts the slot), or
#: `cdc setup` has not run.
_HEALTH = {
    Action.STREAM: "ok",
    Action.LOST: "lost",
    Action.CREATE: "no_checkpoint",
    Action.ADOPT: "no_checkpoint",
    Action.NOT_SET_UP: "not_set_up",
}


@dataclass(frozen=True, slots=True)
class SlotStatus:
    """What `cdc status` reports."""

    slot_name: str
    exists: bool
    plugin: str | None = None
    active: bool = False
    active_pid: int | None = None
    restart_lsn: str | None = None
    confirmed_flush_lsn: str | None = None
    current_wal_lsn: str | None = None
    lag_bytes: int | None = None
    retained_bytes: int | None = None
    wal_status: str | None = None
    safe_wal_size: int | None = None
    invalidation_reason: str | None = None
    health: str = "not_set_up"
    health_reason: str | None = None
    checkpoint: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready mapping with the documented keys."""
        return asdict(self)


def _checkpoint_fields(cp: Checkpoint) -> dict[str, Any]:
    return {
        "state": cp.state,
        "lost_reason": cp.lost_reason,
        "proven_at": cp.proven_at.isoformat() if cp.proven_at else None,
        "confirmed_lsn": format_lsn(cp.confirmed_lsn),
        "system_identifier": cp.system_identifier,
        "timeline": cp.timeline,
        "backfill_mode": cp.backfill_mode,
        "backfill_done": cp.backfill_done,
        "backfill_rows_done": cp.backfill_rows_done,
        "backfill_rows_total": cp.backfill_rows_total,
    }


def _health(conn: Conn, settings: RelaySettings) -> dict[str, Any]:
    """The verdict the relay would reach now, and the checkpoint row it rests on."""
    from cdc.shell import checkpoint_store as store
    from cdc.shell.slot_create import current_identity

    try:
        row = store.read(conn, settings.slot_name)
    except SetupError as exc:
        return {"health": "not_set_up", "health_reason": str(exc)}
    try:
        identity: SystemIdentity | None = current_identity(settings)
    except (SourceError, RefusedError):
        identity = None  # no replication access from here: judge without it
    verdict = assess(row, observe(conn, settings, identity))
    return {
        "health": _HEALTH[verdict.action],
        "health_reason": verdict.reason or None,
        "checkpoint": None if row is None else _checkpoint_fields(row),
    }


def status(conn: Conn, settings: RelaySettings) -> SlotStatus:
    """Read the slot's position, lag and health, and the relay's checkpoint."""
    row = conn.execute(
        "SELECT plugin, active, active_pid, restart_lsn::text, confirmed_flush_lsn::text, "
        "pg_current_wal_lsn()::text, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, "
        "wal_status, safe_wal_size "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (settings.slot_name,),
    ).fetchone()
    seen = slot_seen(conn, settings)
    health = _health(conn, settings)
    if row is None:
        return SlotStatus(settings.slot_name, exists=False, **health)
    names = ("plugin", "active", "active_pid", "restart_lsn", "confirmed_flush_lsn",
             "current_wal_lsn", "lag_bytes", "retained_bytes", "wal_status", "safe_wal_size")
    return SlotStatus(
        settings.slot_name,
        True,
        invalidation_reason=seen.invalidation_reason if seen else None,
        **dict(zip(names, row, strict=True)),
        **health,
    )
