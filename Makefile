# One target per habit. Every target sets up the virtualenv it needs first.
# The interpreter .venv is made from: the system's own python3 when it is 3.11 or newer,
# else the first python3 on PATH. A distribution's python3 (Debian's, the one the container
# image runs) is built with profile-guided optimisation and without a shared libpython; a
# python built by pyenv without --enable-optimizations ran the receiver's request path 30%
# slower here (make bench). `make PYTHON=...` picks another.
SYSTEM_PYTHON := /usr/bin/python3
PYTHON ?= $(shell $(SYSTEM_PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
                && echo $(SYSTEM_PYTHON) || echo python3)
VENV   ?= .venv
BIN    := $(VENV)/bin

# `make run` is the local, embedded setup: HTTPS on 8443 with a local CA made on first run,
# log + file sinks, no external service, and the shared-secret scheme with a development
# secret so that `dcon-receiver send` can sign.
run: export DCON_VERIFY_MODE ?= secret
run: export DCON_SIGNATURE_SECRETS ?= dev-secret

.PHONY: python-version run test test-faults lint fmt bench bench-instructions bench-quick bench-profile certs docs tls-check container-check clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

python-version:
	@echo "$(PYTHON): $$($(PYTHON) --version)"

run: $(BIN)/.installed
	$(BIN)/dcon-receiver serve

certs: $(BIN)/.installed
	$(BIN)/dcon-receiver certs --dir certs

# Every test, the fault suite of tests/faults included (its reports close the output).
test: $(BIN)/.installed
	$(BIN)/pytest --cov --cov-report=term-missing:skip-covered

# The fault suite alone: kill -9, broker outage, full disk and SIGTERM under load.
test-faults: $(BIN)/.installed
	$(BIN)/pytest -m faults tests/faults

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(BIN)/.installed
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Benchmarks print ratios against baselines measured in the same run (see bench/README.md).
# The HTTP one pins servers to CPU 0 and wrk to CPU 1, and installs wrk if it is missing.
BENCH_FLAGS ?=
bench: $(BIN)/.installed
	$(BIN)/python bench/signature.py
	$(BIN)/python bench/file_sink.py
	$(BIN)/python bench/http_bench.py $(BENCH_FLAGS)
	$(BIN)/python bench/workers.py
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/instructions.py

# Instructions per request under callgrind: steady where requests/s swing with the load.
bench-instructions: $(BIN)/.installed
	$(BIN)/python bench/instructions.py

bench-quick: $(BIN)/.installed
	$(BIN)/python bench/http_bench.py --quick

bench-profile: $(BIN)/.installed
	taskset -c 0 $(BIN)/python bench/profile_ingest.py

tls-check: $(BIN)/.installed
	BIN=$(BIN) tls-check/run

# Build the Dockerfile and run the image end to end (root; installs buildah and debootstrap).
container-check: $(BIN)/.installed
	container/check

docs: $(BIN)/.installed
	$(BIN)/python docs/settings_table.py

clean:
	rm -rf $(VENV) bench/.venv-baseline .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
