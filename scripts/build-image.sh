#!/usr/bin/env bash
# Build deploy/Dockerfile with podman or docker and print the tag (default
# localhost/outbox-cdc/outbox-cdc:dev). CDC_IMAGE_BASE replaces the pinned base image (the
# local python look-alike where the official one cannot be pulled); the host's CA bundle is
# handed to pip as the `pip-ca` build secret, for TLS-intercepting proxies.
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${1:-localhost/outbox-cdc/outbox-cdc:dev}
engine=$(command -v podman || command -v docker || true)
[ -n "$engine" ] || { echo "build-image: neither podman nor docker is installed" >&2; exit 1; }
args=(build -q -f deploy/Dockerfile -t "$tag")
# podman writes OCI images by default, and the OCI format has no HEALTHCHECK.
[ "$(basename "$engine")" = podman ] && args+=(--format docker)
[ -n "${CDC_IMAGE_BASE:-}" ] && args+=(--build-arg "BASE_IMAGE=$CDC_IMAGE_BASE")
ca=${PIP_CA:-/etc/ssl/certs/ca-certificates.crt}
[ -s "$ca" ] && args+=(--secret "id=pip-ca,src=$ca")
t0=$SECONDS
"$engine" "${args[@]}" . >/dev/null
echo "build-image: built $tag in $((SECONDS - t0)) s" >&2
echo "$tag"
