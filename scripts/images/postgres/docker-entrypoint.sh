#!/bin/sh
# The official postgres image's start-up contract, reduced to what the tests and the compose
# stack use: initialise PGDATA once from POSTGRES_USER/POSTGRES_PASSWORD/POSTGRES_DB, accept
# connections from anywhere (password, or POSTGRES_HOST_AUTH_METHOD), then run the server
# with the command's flags (`-c wal_level=logical ...`).
set -eu
if [ "${1#-}" != "$1" ]; then set -- postgres "$@"; fi
if [ "$1" != postgres ]; then exec "$@"; fi
shift
user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -n "${POSTGRES_PASSWORD:-}" ]; then
    auth=${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}
  elif [ -n "${POSTGRES_HOST_AUTH_METHOD:-}" ]; then
    auth=$POSTGRES_HOST_AUTH_METHOD
  else
    echo "Error: database is uninitialized and superuser password is not specified." >&2
    echo "  Set POSTGRES_PASSWORD, or POSTGRES_HOST_AUTH_METHOD=trust to allow all connections." >&2
    exit 1
  fi
  pwfile=$(mktemp)
  printf '%s\n' "${POSTGRES_PASSWORD:-}" >"$pwfile"
  initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --auth-local=trust --auth-host="$auth" \
    --encoding=UTF8 --locale=C.UTF-8 >/dev/null
  rm -f "$pwfile"
  echo "listen_addresses = '*'" >>"$PGDATA/postgresql.conf"
  echo "host all all all $auth" >>"$PGDATA/pg_hba.conf"
  if [ "$db" != postgres ]; then
    pg_ctl -D "$PGDATA" -w -o "-c listen_addresses=''" start >/dev/null
    psql -X -q -v ON_ERROR_STOP=1 -U "$user" -d postgres -c "CREATE DATABASE \"$db\"" >/dev/null
    pg_ctl -D "$PGDATA" -w -m fast stop >/dev/null
  fi
  echo "PostgreSQL init process complete; ready for start up."
fi
exec postgres -D "$PGDATA" "$@"
