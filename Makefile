# The two quickstart commands: `make demo` (the main job) and `make test` (checks and tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint unit integration test-sqlite test-postgresql bench services

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/conclave demo

services:
	@bash .ci/services || true

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .
	$(BIN)/lint-imports

test-sqlite: $(STAMP)
	CONCLAVE_TEST_DB=sqlite $(BIN)/pytest -q

test-postgresql: $(STAMP)
	CONCLAVE_TEST_DB=postgresql $(BIN)/pytest -q tests/integration tests/chaos

test: services lint test-sqlite test-postgresql

bench: $(STAMP)
	$(BIN)/python -m benchmarks.intake
	$(BIN)/python -m benchmarks.council --queries 2000 --latency-ms 0
	$(BIN)/python -m benchmarks.council --queries 5000 --latency-ms 2000 --threads 256
	$(BIN)/python -m benchmarks.priority
	$(BIN)/python -m benchmarks.fairness

# ---- Browser tests (issue 16) --------------------------------------------------------------------
# The dashboard in headless Debian Chromium (installed by .ci/services, see `services`) through
# Playwright for Python (in .[dev]; no `playwright install`). `make test` runs them with the rest;
# this runs only them. Screenshots land in test-artifacts/browser/ (ignored by git).
.PHONY: test-browser
test-browser: $(STAMP) services
	$(BIN)/pytest -q tests/browser

# 200 event streams on one batch: the API's CPU and change-to-event latency (benchmarks/events.py).
.PHONY: bench-events
bench-events: $(STAMP)
	$(BIN)/python -m benchmarks.events --streams 200 --seconds 20
# ---- end of the browser block ---------------------------------------------------------------------
