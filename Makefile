# The two commands of the README: `make run` and `make test`. Both work on a fresh machine:
# they build the venv, install the project, and start the servers they need (containers, or
# `make run`'s own PostgreSQL cluster); neither reconfigures nor restarts a server it did not
# start.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
RUN_PG_PORT ?= 55432
export RUN_PG_PORT
export CDC_DATABASE_URL ?= postgresql://postgres@127.0.0.1:$(RUN_PG_PORT)/postgres
export CDC_AMQP_URL     ?= amqp://guest:guest@127.0.0.1:5672/
DEMO_RATE  ?= 5
DEMO_COUNT ?= 0

.PHONY: run run-clean run-down test test-containers lint typecheck services install clean bench

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

# Checks (never changes) the local PostgreSQL and RabbitMQ that CDC_TEST_SERVICES=local uses.
services:
	bash scripts/ensure-services.sh

lint: install
	$(BIN)/ruff check cdc consumers tests bench

typecheck: install
	$(BIN)/mypy --strict cdc consumers

# The suite through containers (scripts/test.sh: PostgreSQL 15 and 18, RabbitMQ, the built
# image, the compose stack); CDC_TEST_SERVICES=local tests against the local servers instead.
test: install lint typecheck
	bash scripts/test.sh

# The image build, the image smoke tests and the compose test alone.
test-containers: install
	bash scripts/test.sh containers

# Relay in the background, the demo event source in the foreground; Ctrl-C stops both.
# PostgreSQL is make run's own (scripts/run-services.sh), on 127.0.0.1:$(RUN_PG_PORT).
run: install
	eval "$$(bash scripts/run-services.sh up)" && $(BIN)/cdc setup \
	  && bash scripts/run-demo.sh $(DEMO_RATE) $(DEMO_COUNT)

# Stop make run's servers and delete their data (slot included).
run-down:
	bash scripts/run-services.sh down

# `make run` leaves its slot for the next run; an unread slot pins WAL, so drop it when done.
# The checkpoint row goes with the slot: kept alone, it makes the next start take the
# missing slot for a lost one (exit 5).
run-clean:
	psql "$(CDC_DATABASE_URL)" -X -q -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'cdc_outbox' AND NOT active" \
	  -c "DO \$$\$$ BEGIN IF to_regclass('cdc.relay_checkpoint') IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = 'cdc_outbox') THEN DELETE FROM cdc.relay_checkpoint WHERE slot_name = 'cdc_outbox'; END IF; END \$$\$$"

# Benchmarks (docs/benchmarks.md): not part of `make test`. Installs the bench extra and the
# locked npm packages of bench/, then runs every scenario; BENCH_ARGS='--quick' for small sizes.
# PostgreSQL is the run's own throwaway server (wal_level=logical) unless BENCH_PG_URL is set;
# RabbitMQ is the local one on 127.0.0.1:5672.
BENCH_ARGS ?=
$(BIN)/.bench-installed: $(BIN)/.installed pyproject.toml bench/package-lock.json
	$(BIN)/pip install -q -e '.[test,bench]'
	cd bench && npm ci --no-audit --no-fund
	touch $@

bench: $(BIN)/.bench-installed
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache bench/node_modules
