#!/usr/bin/env bash
# Put promtool (from Debian's `prometheus` package, unpacked, not installed: no service is
# started) into the venv, so `make test` can check the alert and recording rules with it.
# Best effort: without apt or a network the rules test skips and says why.
set -uo pipefail
dest=${1:-.venv/bin}
[ -x "$dest/promtool" ] && exit 0
command -v apt-get >/dev/null || { echo "no apt-get: promtool not fetched"; exit 0; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
( cd "$work" && apt-get download prometheus >/dev/null 2>&1 ) \
  || { apt-get update -qq >/dev/null 2>&1 && ( cd "$work" && apt-get download prometheus >/dev/null 2>&1 ); } \
  || { echo "could not download Debian's prometheus package: promtool not fetched"; exit 0; }
dpkg-deb -x "$work"/prometheus_*.deb "$work/x" && cp "$work/x/usr/bin/promtool" "$dest/promtool" \
  && echo "promtool: $("$dest/promtool" --version 2>&1 | head -1)"
