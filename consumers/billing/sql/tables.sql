-- Billing's tables, in the worker's schema. Idempotent: the runtime runs this at every start,
-- under its schema lock.

CREATE TABLE IF NOT EXISTS {s}.device_events (
    message_id text PRIMARY KEY,
    device_id  text NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('start', 'stop', 'delete', 'update')),
    at         timestamptz NOT NULL,
    user_id    text,
    plan       text,
    rate       numeric
);

-- By device and event time: the windowed recompute reads a device's events from a time on;
-- the partial ones find the window's edge (the last stop/delete before the new events), the
-- rate in force before it and an earlier delete without a scan of history.
CREATE INDEX IF NOT EXISTS device_events_device_at_idx ON {s}.device_events (device_id, at);

CREATE INDEX IF NOT EXISTS device_events_close_idx ON {s}.device_events (device_id, at)
    WHERE kind IN ('stop', 'delete');

CREATE INDEX IF NOT EXISTS device_events_delete_idx ON {s}.device_events (device_id, at)
    WHERE kind = 'delete';

CREATE INDEX IF NOT EXISTS device_events_rate_idx
    ON {s}.device_events (device_id, at, message_id COLLATE "C")
    WHERE kind IN ('start', 'update') AND (rate IS NOT NULL OR plan IS NOT NULL);

CREATE INDEX IF NOT EXISTS device_events_user_idx ON {s}.device_events (user_id)
    WHERE kind = 'start';

CREATE TABLE IF NOT EXISTS {s}.user_plans (
    message_id text PRIMARY KEY,
    user_id    text NOT NULL,
    at         timestamptz NOT NULL,
    plan       text NOT NULL
);

CREATE INDEX IF NOT EXISTS user_plans_user_idx ON {s}.user_plans (user_id);

CREATE TABLE IF NOT EXISTS {s}.usage_records (
    record_id        text PRIMARY KEY,
    device_id        text NOT NULL,
    user_id          text NOT NULL,
    started_at       timestamptz NOT NULL,
    stopped_at       timestamptz NOT NULL,
    duration_seconds numeric(20, 6) NOT NULL,
    rate             numeric NOT NULL,
    cost             numeric(20, 6) NOT NULL,
    closed_by        text NOT NULL
);

CREATE INDEX IF NOT EXISTS usage_records_device_start_idx
    ON {s}.usage_records (device_id, started_at);

CREATE INDEX IF NOT EXISTS usage_records_user_idx ON {s}.usage_records (user_id);

CREATE TABLE IF NOT EXISTS {s}.balances (
    user_id text PRIMARY KEY,
    balance numeric(20, 6) NOT NULL,
    spent   numeric(20, 6) NOT NULL
);

CREATE TABLE IF NOT EXISTS {s}.balance_alerts (
    user_id   text NOT NULL,
    threshold numeric NOT NULL,
    event_id  uuid NOT NULL,
    balance   numeric(20, 6) NOT NULL,
    PRIMARY KEY (user_id, threshold)
);
