-- The outbox table, as the platform's services already write it (legacy columns kept so
-- existing writers work unchanged), plus an optional `headers` jsonb for AMQP headers.
-- Applied only when the table is absent; an existing table is never altered.
CREATE TABLE IF NOT EXISTS {table} (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type varchar(100) NOT NULL,
    aggregate_id   varchar(255) NOT NULL,
    event_type     varchar(255) NOT NULL,
    payload        jsonb NOT NULL,
    headers        jsonb,
    status         varchar(20) NOT NULL DEFAULT 'pending',
    retry_count    integer NOT NULL DEFAULT 0,
    error_message  text,
    last_error_at  timestamptz,
    published_at   timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
