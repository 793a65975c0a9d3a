#!/usr/bin/env bash
# The servers of `make run`, never the machine's own PostgreSQL:
#
#   scripts/run-services.sh up     start (or reuse) them; prints the environment to eval
#   scripts/run-services.sh down   stop them and delete their data
#
# PostgreSQL (wal_level=logical) is `make run`'s own, on 127.0.0.1:$RUN_PG_PORT (55432):
# a container (Docker if it answers, else podman with the local images that
# scripts/container-engine.sh builds) with a named volume, so the slot survives between
# runs; without any engine, a throwaway cluster of the local PostgreSQL binaries in
# $RUN_PG_DIR, run as the `postgres` user. RabbitMQ is the machine's on 127.0.0.1:5672 when
# one answers, else a container on that port.
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${RUN_PG_PORT:-55432}
PGDIR=${RUN_PG_DIR:-/tmp/outbox-cdc-run-pg}
PG_NAME=outbox-cdc-run-postgres
MQ_NAME=outbox-cdc-run-rabbitmq
FLAGS=(-c wal_level=logical -c max_replication_slots=10 -c max_wal_senders=10)
log() { echo "run-services: $*" >&2; }

ENGINE=none
find_engine() {  # sets ENGINE; with podman, the local images' names too
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker; return; fi
  if command -v podman >/dev/null || command -v apt-get >/dev/null; then
    local env_lines
    if env_lines=$(bash scripts/container-engine.sh images); then
      eval "$env_lines"; ENGINE=podman
    fi
  fi
}

pg_up() { psql "postgresql://postgres@127.0.0.1:$PORT/postgres" -X -At -c 'select 1' >/dev/null 2>&1; }
amqp_up() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }
wait_until() {  # WHAT COMMAND...
  local what=$1; shift
  for _ in $(seq 1 120); do "$@" && return 0; sleep 0.5; done
  log "$what did not come up"; return 1
}

container_up() {  # ENGINE NAME IMAGE RUN-ARGS... -- COMMAND-ARGS...
  local e=$1 name=$2 image=$3; shift 3
  if [ "$($e inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" = true ]; then return 0; fi
  if $e inspect "$name" >/dev/null 2>&1; then $e start "$name" >/dev/null; return 0; fi
  log "starting $name ($image)"
  local args=() ; while [ "$1" != -- ]; do args+=("$1"); shift; done; shift
  $e run -d --name "$name" "${args[@]}" "$image" "$@" >/dev/null
}

local_cluster_up() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  [ -x "$bin/pg_ctl" ] || { log "no container engine and no PostgreSQL binaries"; return 1; }
  local as=(); [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
  if [ ! -s "$PGDIR/PG_VERSION" ]; then
    log "initialising a throwaway cluster in $PGDIR"
    mkdir -p "$PGDIR"; [ "$(id -u)" = 0 ] && chown postgres: "$PGDIR"
    "${as[@]}" "$bin/initdb" -D "$PGDIR" -U postgres --auth=trust >/dev/null
  fi
  "${as[@]}" "$bin/pg_ctl" -D "$PGDIR" -l "$PGDIR/server.log" -w \
    -o "-p $PORT -k $PGDIR -c listen_addresses=127.0.0.1 ${FLAGS[*]}" start >/dev/null
}

up() {
  find_engine
  local e=$ENGINE
  if ! pg_up; then
    if [ "$e" = none ]; then
      local_cluster_up
    else
      container_up "$e" "$PG_NAME" "${POSTGRES_IMAGE:-postgres:15}" -p "127.0.0.1:$PORT:5432" \
        -e POSTGRES_PASSWORD=postgres -e POSTGRES_HOST_AUTH_METHOD=trust \
        -v outbox-cdc-run-pgdata:/var/lib/postgresql/data -- "${FLAGS[@]}"
    fi
    wait_until "PostgreSQL on 127.0.0.1:$PORT" pg_up
  fi
  if ! amqp_up; then
    [ "$e" != none ] || { log "RabbitMQ is not reachable on 127.0.0.1:5672"; return 1; }
    container_up "$e" "$MQ_NAME" "${RABBITMQ_IMAGE:-rabbitmq:3-management}" \
      -p 127.0.0.1:5672:5672 -p 127.0.0.1:15672:15672 -- 
    wait_until "RabbitMQ on 127.0.0.1:5672" amqp_up
  fi
  log "PostgreSQL (wal_level=logical) on 127.0.0.1:$PORT, RabbitMQ on 127.0.0.1:5672"
  echo "export CDC_DATABASE_URL=postgresql://postgres@127.0.0.1:$PORT/postgres"
  echo "export CDC_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/"
}

down() {
  local e
  for e in docker podman; do
    command -v $e >/dev/null || continue
    $e rm -f -v "$PG_NAME" "$MQ_NAME" >/dev/null 2>&1 || true
    $e volume rm -f outbox-cdc-run-pgdata >/dev/null 2>&1 || true
  done
  if [ -s "$PGDIR/PG_VERSION" ]; then
    local bin as=(); bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
    [ "$(id -u)" = 0 ] && as=(runuser -u postgres --)
    "${as[@]}" "$bin/pg_ctl" -D "$PGDIR" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PGDIR"
  fi
  log "stopped; data deleted"
}

case ${1:-up} in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 [up|down]" >&2; exit 2 ;;
esac
