#!/usr/bin/env bash
# `make test`'s test run (after lint and types). Through containers unless
# CDC_TEST_SERVICES=local, or no container engine can be had (then it says so):
#
#   1. the whole suite against the postgres:15 and rabbitmq:3-management images;
#   2. the relay's integration and fault tests (RELAY_TESTS) again against postgres:18;
#   3. `tests/containers`: the built image, the compose stack, and the check that the host's
#      PostgreSQL was not reconfigured or restarted by any of it.
#
# scripts/container-engine.sh provides the engine (here: podman and local look-alike images);
# with Docker and DOCKER_HOST already set up, set CDC_TEST_SERVICES=containers and the
# official images are used. `scripts/test.sh containers` runs step 3 alone (make
# test-containers). Every container is removed at the end, also after a failure, and the
# engine's API service is stopped if this run started it.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=(.venv/bin/python -m pytest -q -p no:cacheprovider)
only=${1:-all}
log() { echo "== $*"; }

mode=${CDC_TEST_SERVICES:-}
# Labels this run's containers: the cleanup at the end removes these and no other run's.
export CDC_TEST_RUN_ID=${CDC_TEST_RUN_ID:-run$(date +%s)$$}
if [ "$mode" != local ] && [ -z "${DOCKER_HOST:-}" ] && [ ! -S /var/run/docker.sock ]; then
  if engine_env=$(bash scripts/container-engine.sh up); then
    eval "$engine_env"
    trap 'bash scripts/container-engine.sh down' EXIT
    mode=containers
  elif [ "$mode" = containers ]; then
    echo "CDC_TEST_SERVICES=containers but no container engine could be set up" >&2; exit 1
  else
    log "no container engine could be set up: testing against the local services"
    mode=local
  fi
fi
mode=${mode:-containers}
export CDC_TEST_SERVICES=$mode

if [ "$mode" = local ]; then
  [ "$only" = containers ] && { echo "the container tests need a container engine" >&2; exit 1; }
  bash scripts/ensure-services.sh || exit 1
  exec "${PYTEST[@]}" tests --ignore=tests/containers
fi

# What the host's PostgreSQL (if any) looks like now; tests/containers checks it at the end.
CDC_TEST_HOST_PG_BEFORE=$(psql -h 127.0.0.1 -U postgres -d postgres -X -At -c \
  "SELECT json_build_object('wal_level', current_setting('wal_level'),
     'max_prepared_transactions', current_setting('max_prepared_transactions'),
     'started', pg_postmaster_start_time())" 2>/dev/null || true)
export CDC_TEST_HOST_PG_BEFORE

status=0
timings=()
step() {  # NAME ARGS...: run pytest, remember its time and the first failure
  local name=$1 t0=$SECONDS; shift
  log "$name"
  "${PYTEST[@]}" "$@" || status=$?
  timings+=("$name: $((SECONDS - t0)) s")
}
# The relay's own integration and fault tests (not the workers', the broker-only or the
# monitoring ones): what depends on the server version (pgoutput, slots, LSNs, setup).
RELAY_TESTS=(tests/integration/test_{round_trip,payloads,row_headers,schema_change,idle_outbox}.py
  tests/integration/test_{parking,concurrent_writers,cli,seed_table,slot_create,slot_loss}.py
  tests/integration/test_{checkpoint,recovery}.py
  tests/fault/test_{crash,standby,broker_outage,snapshot_interrupted}.py)
if [ "$only" = all ]; then
  step "suite, ${CDC_TEST_PG_IMAGE:-postgres:15}" tests --ignore=tests/containers
  pg18=${CDC_TEST_PG18_IMAGE:-postgres:18}
  existing=(); for f in "${RELAY_TESTS[@]}"; do [ -f "$f" ] && existing+=("$f"); done
  CDC_TEST_PG_IMAGE=$pg18 step "relay, $pg18" "${existing[@]}"
fi
step "image, compose, host untouched" tests/containers
log "timings"; printf '   %s\n' "${timings[@]}"
exit $status
