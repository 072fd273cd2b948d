# policyd — `make run` starts the system, `make test` runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# Where `make run` keeps its demo token and the hub's data (the store and keys follow
# policyd's config, ./var/ by default; POLICYD_* environment variables override them,
# POLICYD_HUB_* the hub's settings: docs/hub.md).
VAR ?= var

.PHONY: run run-envoy run-cluster test test-fast lint format proto docs bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check pip==25.3
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@# xds-protos ships an older copy of opentelemetry's protos in the same folder, and in a
	@# fresh install it may overwrite opentelemetry-proto's (the OTLP exporter then fails to
	@# import): put opentelemetry-proto's files back, at the version pyproject.toml pins.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall \
		"$$(grep -o '"opentelemetry-proto==[^"]*"' pyproject.toml | tr -d '"')"
	@touch $(STAMP)

run: $(STAMP)
	@BIN=$(BIN) VAR=$(VAR) exec bash scripts/run.sh

# policyd, the reference hub and Envoy in front of it (ext_authz; docs/envoy.md).
run-envoy: $(STAMP)
	@BIN=$(BIN) VAR=$(VAR) exec bash scripts/run-envoy.sh

# A private PostgreSQL under $(VAR)/pg, three policyd replicas sharing it, the hub and one
# Envoy balancing its ext_authz checks over the replicas (README.md, "A cluster on one machine").
run-cluster: $(STAMP)
	@BIN=$(BIN) VAR=$(VAR) exec bash scripts/run-cluster.sh

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

proto: $(STAMP)
	$(BIN)/python scripts/gen_proto.py

docs: $(STAMP)
	$(BIN)/python scripts/gen_cli_docs.py

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache .grimp_cache .import_linter_cache
