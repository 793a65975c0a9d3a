#!/usr/bin/env bash
# Check (never change) the local services that `make test` uses with CDC_TEST_SERVICES=local
# (`make bench` starts its own PostgreSQL): PostgreSQL on $PGHOST (127.0.0.1) with logical
# replication and prepared transactions, and RabbitMQ on 127.0.0.1:5672. A server that is
# not ready is reported with what to change; this script never reconfigures or restarts it.
set -euo pipefail

PGHOST=${PGHOST:-127.0.0.1}
PGUSER=${PGUSER:-postgres}
export PGHOST PGUSER
psql_() { psql -X -q -At -d postgres "$@"; }

psql_ -c 'select 1' >/dev/null 2>&1 \
  || { echo "PostgreSQL is not reachable at $PGHOST:5432 as $PGUSER" >&2; exit 1; }
wal=$(psql_ -c 'show wal_level')
prepared=$(psql_ -c 'show max_prepared_transactions')
if [ "$wal" != logical ] || [ "$prepared" -lt 16 ]; then
  echo "PostgreSQL at $PGHOST has wal_level=$wal, max_prepared_transactions=$prepared;" \
    "the tests need wal_level=logical and max_prepared_transactions >= 16 (set them in" \
    "postgresql.conf and restart it), or run them through containers (unset" \
    "CDC_TEST_SERVICES)" >&2
  exit 1
fi

amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
amqp_up || { echo "RabbitMQ is not reachable on 127.0.0.1:5672" >&2; exit 1; }
echo "local services ready: PostgreSQL (wal_level=logical) and RabbitMQ"
