#!/usr/bin/env bash
# `make run`: the relay and the billing and notifications workers as background processes,
# the demo source/listener in front. Ctrl-C (or the demo ending) stops all of them.
set -euo pipefail
rate=${1:-5}; count=${2:-0}
mkdir -p .run
# Demo pricing: balances small enough that billing.balance_low shows up within a minute.
export CDC_BILLING_INITIAL_BALANCE=${CDC_BILLING_INITIAL_BALANCE:-10}
export CDC_BILLING_LOW_BALANCE_THRESHOLD=${CDC_BILLING_LOW_BALANCE_THRESHOLD:-5}
export CDC_BILLING_DEFAULT_RATE=${CDC_BILLING_DEFAULT_RATE:-360}
pids=()
stop_all() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT INT TERM
.venv/bin/cdc relay &
pids+=($!)
CDC_WORKER_METRICS_PORT=${BILLING_METRICS_PORT:-9191} \
  .venv/bin/python -m consumers billing >.run/billing.log 2>&1 &
pids+=($!)
CDC_WORKER_METRICS_PORT=${NOTIFICATIONS_METRICS_PORT:-9192} \
  .venv/bin/python -m consumers notifications >.run/notifications.log 2>&1 &
pids+=($!)
echo "relay, billing (log .run/billing.log) and notifications (log .run/notifications.log) started"
.venv/bin/cdc demo --rate "$rate" --count "$count"
sleep 2  # let the workers take the last events before they drain and stop
