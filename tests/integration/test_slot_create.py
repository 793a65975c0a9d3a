"""The one slot-creation function (``cdc/shell/slot_create.py``) against the real server.

- the slot is a pgoutput slot starting at the returned consistent LSN, and the system
  identifier and timeline are the server's own;
- the connection handed out inside the exported snapshot sees exactly the rows committed
  before the slot's start, and the base snapshot text agrees with it in SQL;
- streaming from that slot delivers exactly the rows the snapshot does not see: the two
  halves meet with no gap and no overlap;
- creating it a second time fails and leaves the first slot alone.
"""

from __future__ import annotations

import pytest
from psycopg import sql

from cdc.errors import SourceError
from cdc.shell import schema
from cdc.shell import slot as slots
from cdc.shell.slot_create import create_slot, current_identity, exported_slot

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _prepare_table(env) -> None:
    settings = env.settings()
    with slots.connect(settings) as conn:
        schema.ensure_table(conn, settings)
        schema.ensure_publication(conn, settings)


def _xid_of(env, row_id: str) -> int:
    query = sql.SQL("SELECT xmin::text::bigint FROM {} WHERE id::text = %s").format(
        env.table_ident()
    )
    return int(env.sql(query, (row_id,))[0][0])


def test_exported_slot_splits_table_and_stream_exactly(env):
    _prepare_table(env)
    before = env.insert([env.event("slot.before") for _ in range(3)])
    after_ids: list[str] = []
    with exported_slot(env.settings()) as (created, reader):
        info = env.slot_info()
        assert info is not None and info["plugin"] == "pgoutput"
        assert env.parse_lsn(info["confirmed_flush_lsn"]) == created.consistent_lsn
        assert created.slot_name == env.slot
        assert created.snapshot_name
        if int(env.sql("SHOW server_version_num")[0][0]) >= 170000:
            # a failover slot, so standbys that synchronize slots keep a copy
            assert env.sql(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = %s", (env.slot,)
            ) == [(True,)]
        (sysid, timeline), = env.sql(
            "SELECT (SELECT system_identifier::text FROM pg_control_system()),"
            " (SELECT timeline_id FROM pg_control_checkpoint())"
        )
        assert (created.system_identifier, created.timeline) == (sysid, timeline)

        after = env.insert([env.event("slot.after") for _ in range(2)])
        after_ids = [r["id"] for r in after]
        seen = {
            r[0]
            for r in reader.execute(
                sql.SQL("SELECT id::text FROM {}").format(env.table_ident())
            ).fetchall()
        }
        assert seen == {r["id"] for r in before}

    # The base snapshot outlives the exported one and says the same in SQL.
    for row_id, visible in [(before[0]["id"], True), (after_ids[0], False)]:
        xid = _xid_of(env, row_id)
        got = env.sql(
            "SELECT pg_visible_in_snapshot(%s::text::xid8, %s::pg_snapshot)",
            (str(xid), created.base_snapshot),
        )[0][0]
        assert got is visible, (row_id, xid, created.base_snapshot)

    # The stream starts where the snapshot ends: only the rows it did not see arrive.
    relay = env.relay()
    relay.wait_streaming()
    msgs = env.drain(2, quiet=1.0)
    assert sorted(m.message_id for m in msgs) == sorted(after_ids)


def test_creating_an_existing_slot_fails_and_keeps_it(env):
    _prepare_table(env)
    first = create_slot(env.settings())
    with pytest.raises(SourceError, match="already exists"):
        create_slot(env.settings())
    info = env.slot_info()
    assert info is not None
    assert env.parse_lsn(info["confirmed_flush_lsn"]) == first.consistent_lsn
    assert current_identity(env.settings()).system_identifier == first.system_identifier
