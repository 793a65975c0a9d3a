-- The relay's durable checkpoint, one row per slot. It is what lets the relay tell "first
-- start" from "my slot is gone", and what `cdc recover` and `cdc prune` trust to decide
-- which outbox rows are proven published. Transaction ids are full 64-bit (xid8) and
-- snapshots are pg_snapshot values, so the horizon survives xid wraparound.
CREATE SCHEMA IF NOT EXISTS cdc;
CREATE TABLE IF NOT EXISTS cdc.relay_checkpoint (
    slot_name          text PRIMARY KEY,
    outbox_table       text NOT NULL,
    publication_name   text NOT NULL,
    -- IDENTIFY_SYSTEM of the replication connection when the slot was last seen healthy.
    system_identifier  text NOT NULL,
    timeline           integer NOT NULL,
    -- ready | lost | recovering
    state              text NOT NULL DEFAULT 'ready',
    lost_reason        text,
    -- The flush LSN last confirmed to PostgreSQL (every commit up to it is broker-confirmed).
    confirmed_lsn      pg_lsn NOT NULL,
    -- Every transaction whose xid is below pg_snapshot_xmin(proven_snapshot) had finished
    -- when that snapshot was taken, and the relay had confirmed everything committed by then.
    proven_snapshot    pg_snapshot NOT NULL,
    proven_at          timestamptz NOT NULL DEFAULT now(),
    -- Taken at candidate_lsn (pg_current_wal_insert_lsn() read after the snapshot); it becomes
    -- the proven one once the relay's flush LSN reaches candidate_lsn.
    candidate_snapshot pg_snapshot,
    candidate_lsn      pg_lsn,
    -- The snapshot exported when the slot was created: the cutover boundary. Rows visible
    -- in it came before the stream; they count as published only through backfill_mode or
    -- the poller's own status column.
    base_snapshot      pg_snapshot NOT NULL,
    -- none | pending | all | since (rows with created_at >= backfill_since)
    backfill_mode      text NOT NULL DEFAULT 'none',
    backfill_since     timestamptz,
    backfill_done      boolean NOT NULL DEFAULT true,
    backfill_after_id  text,
    backfill_rows_done bigint NOT NULL DEFAULT 0,
    backfill_rows_total bigint NOT NULL DEFAULT 0,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
