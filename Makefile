# Set-up and checks for gate-agent. `make test` and `make demo` do all set-up on a fresh Debian
# machine: Debian packages (installed when run as root, named when not), the venv, the project.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# Debian packages the venv, the tests and the demo need (libzbar0: QR decoding via pyzbar).
# mosquitto, mosquitto-clients: cloud-sync tests and the demo run a local broker.
SYSTEM_PACKAGES := python3 python3-venv libzbar0 mosquitto mosquitto-clients

VENV := .venv
PYTHON := $(VENV)/bin/python
# Written after a successful install; older than pyproject.toml means reinstall.
INSTALLED := $(VENV)/.installed
PYTEST_ARGS ?=
FUZZ_SECONDS ?= 60

.PHONY: help system-deps venv lint test demo bench soak fuzz clean

help:
	@echo "make test         set up, then ruff, mypy and the whole test suite"
	@echo "make demo         set up, then run the simulated gate scenario"
	@echo "make bench        set up, then run the benchmarks"
	@echo "make soak         set up, then SIGKILL the daemon 500 times during passages, 200 while syncing"
	@echo "make fuzz         set up atheris, then fuzz scanner, token and SAM inputs (FUZZ_SECONDS=60 each)"
	@echo "make lint         set up, then ruff and mypy only"
	@echo "make venv         Debian packages, $(VENV) and the project with its dev extras"
	@echo "make system-deps  Debian packages only: $(SYSTEM_PACKAGES)"
	@echo "make clean        remove $(VENV), caches and build output"

# Installs only what is missing, and skips apt altogether when nothing is. Not root: names the
# missing packages and fails only if python3 cannot build the venv without them.
system-deps:
	@if ! command -v dpkg-query >/dev/null; then \
		echo "system-deps: not a Debian system; make sure these are installed: $(SYSTEM_PACKAGES)"; \
		exit 0; \
	fi; \
	missing=""; \
	for pkg in $(SYSTEM_PACKAGES); do \
		status="$$(dpkg-query -W -f='$${db:Status-Status}' "$$pkg" 2>/dev/null || true)"; \
		if [ "$$status" != installed ]; then missing="$$missing $$pkg"; fi; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" -eq 0 ]; then \
		echo "system-deps: installing$$missing"; \
		apt-get update; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $$missing; \
	else \
		echo "system-deps: missing Debian packages:$$missing"; \
		echo "system-deps: install them with: sudo apt-get install -y --no-install-recommends$$missing"; \
		if [ ! -x $(PYTHON) ] && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
			echo "system-deps: python3 cannot create $(VENV) without them; stopping." >&2; \
			exit 1; \
		fi; \
	fi

$(PYTHON): | system-deps
	python3 -m venv $(VENV)

$(INSTALLED): pyproject.toml | $(PYTHON)
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

venv: system-deps $(INSTALLED)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

demo: venv
	$(PYTHON) -m agent.demo

bench: venv
	$(PYTHON) -m tests.bench
	$(PYTHON) -m tests.bench_cache
	$(PYTHON) -m tests.bench_qr
	$(PYTHON) -m tests.bench_lanes
	$(PYTHON) -m tests.bench_cloud

# Longer crash soaks than `make test` runs: 500 SIGKILLs of the daemon during passages, and
# 200 during traffic with cloud sync (nothing may be lost on the way to the cloud).
soak: venv
	GATE_CRASH_KILLS=500 $(PYTHON) -m pytest -q -s tests/test_crash.py
	GATE_SYNC_KILLS=200 $(PYTHON) -m pytest -q -s tests/test_cloud_faults.py -k killed

# Longer than the hypothesis runs in `make test`: coverage-guided fuzzing (atheris) of every
# input the lanes take from outside, one target after another. A finding stops the run and
# prints its input in hex; tests/fuzz/atheris_main.py says how to reproduce it.
fuzz: venv
	$(VENV)/bin/pip install -e '.[dev,fuzz]'
	targets="$$($(PYTHON) -m tests.fuzz.atheris_main --list)"; \
	for target in $$targets; do \
		echo "fuzz: $$target for $(FUZZ_SECONDS) s"; \
		$(PYTHON) -m tests.fuzz.atheris_main "$$target" -max_total_time=$(FUZZ_SECONDS); \
	done

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name '__pycache__' -type d -prune -exec rm -rf {} +
	find . -maxdepth 1 -name '*.egg-info' -type d -prune -exec rm -rf {} +
