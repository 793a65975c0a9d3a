-- What the two roles of roles.sql may do in the application database, granted after
-- `cdc setup` has created the outbox table, the publication, the slot and the relay's
-- checkpoint schema. Safe to run again. Run as the owner (or a superuser), connected to the
-- application database:
--
--   psql -X -v ON_ERROR_STOP=1 -v db=cloudphone -v relay_role=cdc_relay \
--     -v worker_role=cdc_worker -v outbox_table=public.event_outbox -f grants.sql
GRANT CONNECT ON DATABASE :"db" TO :"relay_role", :"worker_role";

-- Workers create their schema and tables at start (CREATE SCHEMA/TABLE IF NOT EXISTS, the
-- inbox too) and own them from then on.
GRANT CREATE ON DATABASE :"db" TO :"worker_role";
GRANT USAGE, CREATE ON SCHEMA public TO :"worker_role";
-- Billing inserts its balance alerts into the outbox, in the same transaction as the debit.
SELECT format('GRANT INSERT ON TABLE %s TO %I', :'outbox_table'::regclass, :'worker_role') \gexec

-- The relay reads the outbox through the slot only (REPLICATION is enough for that) and
-- keeps its checkpoint in the `cdc` schema.
SELECT format('GRANT USAGE ON SCHEMA cdc TO %I', :'relay_role'),
       format('GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA cdc TO %I', :'relay_role')
 WHERE EXISTS (SELECT FROM pg_namespace WHERE nspname = 'cdc') \gexec
