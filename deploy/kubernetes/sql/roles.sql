-- The application database and the two least-privilege roles, created if absent (safe to
-- run again: it only re-applies the role attributes and passwords). Run as a superuser,
-- connected to the `postgres` database, before `cdc setup`:
--
--   CDC_RELAY_PASSWORD=... CDC_WORKER_PASSWORD=... psql -X -v ON_ERROR_STOP=1 \
--     -v db=cloudphone -v relay_role=cdc_relay -v worker_role=cdc_worker -f roles.sql
--
-- With CDC_MONITOR_PASSWORD set (and -v monitor_role=...), also a login-only role for
-- postgres_exporter (monitoring.yaml): it reads pg_replication_slots, which every role may.
--
-- The passwords come from the environment (\getenv) so they appear in no command line, and
-- statement logging is off for this session so they reach no server log either.
\getenv relay_password CDC_RELAY_PASSWORD
\getenv worker_password CDC_WORKER_PASSWORD
\getenv monitor_password CDC_MONITOR_PASSWORD
SET log_statement = 'none';
SET log_min_duration_statement = -1;

SELECT format('CREATE DATABASE %I', :'db')
 WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec

SELECT format('CREATE ROLE %I', r)
  FROM unnest(ARRAY[:'relay_role', :'worker_role']) AS r
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = r) \gexec

-- The relay streams the slot: REPLICATION, and nothing it could use to change data.
SELECT format('ALTER ROLE %I LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              :'relay_role', :'relay_password') \gexec
-- The workers write their own tables and the outbox; they never replicate.
SELECT format('ALTER ROLE %I LOGIN NOREPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              :'worker_role', :'worker_password') \gexec

\if :{?monitor_password}
SELECT format('CREATE ROLE %I', :'monitor_role')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'monitor_role') \gexec
SELECT format('ALTER ROLE %I LOGIN NOREPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L',
              :'monitor_role', :'monitor_password') \gexec
\endif
