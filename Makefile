# make run    serve the API on the built-in sandbox provider (local Redis, no accounts)
# make test   run the whole test suite
# make bench  run the benchmarks and write docs/benchmarks.md
# make lint   ruff and mypy
# Each target installs what is missing first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test bench lint format system-deps clean

$(STAMP): pyproject.toml
	@scripts/system-deps.sh run
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	@scripts/run-local.sh

test: $(STAMP)
	@scripts/system-deps.sh test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	@scripts/system-deps.sh bench
	$(BIN)/python -m bench $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy app services routers models bench tests/fakes

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
