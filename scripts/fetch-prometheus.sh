#!/usr/bin/env bash
# Put Debian's Prometheus tools into the venv, unpacked from their packages (not installed:
# no service is started, nothing outside the venv changes):
#   promtool                      checks the alert/recording rules and runs their scenarios;
#   prometheus                    the live monitoring test runs it on a free port;
#   prometheus-postgres-exporter  reads the slots from PostgreSQL for that test.
# Idempotent; best effort: without apt or a network the tests that need a tool skip and say why.
set -uo pipefail
dest=${1:-.venv/bin}
want=()
[ -x "$dest/promtool" ] && [ -x "$dest/prometheus" ] || want+=(prometheus)
[ -x "$dest/prometheus-postgres-exporter" ] || want+=(prometheus-postgres-exporter)
[ ${#want[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null || { echo "no apt-get: ${want[*]} not fetched"; exit 0; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
( cd "$work" && apt-get download "${want[@]}" >/dev/null 2>&1 ) \
  || { apt-get update -qq >/dev/null 2>&1 && ( cd "$work" && apt-get download "${want[@]}" >/dev/null 2>&1 ); } \
  || { echo "could not download Debian's ${want[*]}: not fetched"; exit 0; }
for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/x"; done
for tool in promtool prometheus prometheus-postgres-exporter; do
  [ -x "$work/x/usr/bin/$tool" ] && cp "$work/x/usr/bin/$tool" "$dest/$tool" \
    && echo "$tool: $("$dest/$tool" --version 2>&1 | head -1)"
done
exit 0
