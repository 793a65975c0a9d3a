"""The legacy ``event_outbox`` exactly as the seed report shows it works unchanged.

The seed's table has no ``headers`` column, a nullable ``aggregate_id`` (its own test INSERT
omits it), ``status``/``retry_count``/``error_message``/``last_error_at``/``published_at``
legacy columns and ``created_at DEFAULT now()``. ``cdc setup`` must leave it exactly as it is,
and the relay must publish its INSERTs per the contract, ignoring the legacy poller's UPDATEs
and DELETEs.
"""

from __future__ import annotations

import pytest
from psycopg import sql

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def _definition(env) -> list[tuple]:
    schema, name = env.table.split(".")
    return env.sql(
        "SELECT column_name, data_type, character_maximum_length, is_nullable, column_default"
        " FROM information_schema.columns WHERE table_schema = %s AND table_name = %s"
        " ORDER BY ordinal_position",
        (schema, name),
    ) + env.sql(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = %s::regclass ORDER BY conname",
        (env.table,),
    )


def test_legacy_table_is_left_unchanged_and_streams(env):
    env.create_legacy_table()
    before = _definition(env)
    assert "headers" not in env.columns()

    env.setup()
    env.setup()  # idempotent on an existing legacy table as well
    assert _definition(env) == before, "cdc setup altered the existing outbox table"
    assert env.sql(
        "SELECT 1 FROM pg_publication_tables WHERE pubname = %s AND schemaname || '.' ||"
        " tablename = %s",
        (env.publication, env.table),
    ), "the legacy table is not in the publication"

    relay = env.relay()
    relay.wait_streaming()

    t = env.table_ident()
    # 1. the seed report's own INSERT, verbatim shape: no aggregate_id, explicit status
    seed_id = env.sql(
        sql.SQL(
            "INSERT INTO {} (id, aggregate_type, event_type, payload, status) VALUES"
            " (gen_random_uuid(), 'device', 'device.retry.test',"
            " '{{\"test\": \"EventOutbox retry mechanism\"}}'::jsonb, 'pending') RETURNING id::text"
        ).format(t)
    )[0][0]
    # 2. how the services write today: every column the legacy writers fill
    legacy_ids = [
        r[0]
        for r in env.sql(
            sql.SQL(
                "INSERT INTO {} (aggregate_type, aggregate_id, event_type, payload)"
                " SELECT 'device', 'dev-' || g, 'device.started',"
                " jsonb_build_object('deviceId', 'dev-' || g, 'userId', 'u-' || (g % 7),"
                " 'startedAt', now()) FROM generate_series(1, 200) g RETURNING id::text"
            ).format(t)
        )
    ]
    inserted = env.fetch_rows()  # ground truth before the poller touches the rows
    # 3. the legacy poller keeps updating and deleting rows: none of that is an event
    env.sql(
        sql.SQL(
            "UPDATE {} SET status = 'published', published_at = now()"
            " WHERE aggregate_id LIKE 'dev-1%'"
        ).format(t)
    )
    env.sql(
        sql.SQL(
            "UPDATE {} SET retry_count = retry_count + 1, error_message = 'Failed to publish',"
            " last_error_at = now() WHERE id = %s"
        ).format(t),
        (seed_id,),
    )
    env.sql(sql.SQL("DELETE FROM {} WHERE aggregate_id LIKE 'dev-2%'").format(t))
    # and a few more inserts after the updates/deletes
    late = env.insert(
        [
            {
                "aggregate_type": "user",
                "aggregate_id": "u-1",
                "event_type": "user.updated",
                "payload": {"userId": "u-1", "n": i},
                "id": f"00000000-0000-4000-8000-{i:012d}",
            }
            for i in range(5)
        ]
    )

    expected = 1 + len(legacy_ids) + len(late)
    msgs = env.drain(expected, quiet=1.5, timeout=60)
    rows = {**inserted, **env.fetch_rows()}
    assert len(rows) == expected
    assert {seed_id, *legacy_ids, *(r["id"] for r in late)} == set(rows)
    # every INSERT exactly once (deleted rows included: they were events); UPDATEs/DELETEs none
    env.check_exactly_once(msgs, rows)
    assert len(msgs) == expected

    seed_msg = next(m for m in msgs if m.message_id == seed_id)
    assert seed_msg.json == {"test": "EventOutbox retry mechanism"}
    assert seed_msg.type == "device.retry.test"
    assert seed_msg.headers.get("aggregate_id") in (None, "")
    # nothing was parked: the legacy rows are all well-formed
    assert (env.broker.queue_count(env.parking_queue) or 0) == 0
    assert relay.alive()
    assert _definition(env) == before, "the relay altered the outbox table"
