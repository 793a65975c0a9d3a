#!/usr/bin/env bash
# Make the local PostgreSQL ready for logical replication and check RabbitMQ is up.
# Idempotent: PostgreSQL is restarted only when a setting that needs a restart changed.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGUSER=${PGUSER:-postgres}
export PGHOST PGUSER
psql_() { psql -X -q -At -d postgres "$@"; }

wait_pg() {
  for _ in $(seq 1 60); do psql_ -c 'select 1' >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "PostgreSQL at $PGHOST did not come up" >&2; return 1
}

if ! psql_ -c 'select 1' >/dev/null 2>&1; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start || true
  wait_pg
fi

wal=$(psql_ -c 'show wal_level')
prepared=$(psql_ -c 'show max_prepared_transactions')
if [ "$wal" != logical ] || [ "$prepared" -lt 16 ]; then
  echo "configuring PostgreSQL: wal_level=logical, max_prepared_transactions=64 (restart)"
  psql_ -c "ALTER SYSTEM SET wal_level = logical" -c "ALTER SYSTEM SET max_prepared_transactions = 64"
  if [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main restart
  else
    echo "restart PostgreSQL now so wal_level=logical takes effect" >&2; exit 1
  fi
  wait_pg
fi

amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
if ! amqp_up; then
  echo "starting RabbitMQ"
  rabbitmqctl start_app >/dev/null 2>&1 || rabbitmq-server -detached
  for _ in $(seq 1 60); do amqp_up && break; sleep 1; done
fi
amqp_up || { echo "RabbitMQ is not reachable on 127.0.0.1:5672" >&2; exit 1; }
echo "services ready: PostgreSQL (wal_level=logical) and RabbitMQ"
