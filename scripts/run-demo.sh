#!/usr/bin/env bash
# `make run`: the relay as a background process plus the demo source/listener in front.
set -euo pipefail
rate=${1:-5}; count=${2:-0}
.venv/bin/cdc relay &
relay=$!
trap 'kill -TERM $relay 2>/dev/null; wait $relay' EXIT INT TERM
.venv/bin/cdc demo --rate "$rate" --count "$count"
