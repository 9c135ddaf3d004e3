# One place for every command a user or CI runs. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -Eeuo pipefail -c
.DEFAULT_GOAL := help

UV_VERSION ?= 0.13.9
PYTHON ?= python3
UV ?= uv
# Never download a Python build: the system's Python 3.11+ (Debian 12's on the VM) is the interpreter.
export UV_PYTHON_DOWNLOADS := never
RUN := $(UV) run --frozen

.PHONY: help setup sys-deps demo demo-clean test test-fast lint format clean
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: .venv/.synced ## install uv (pinned) and the locked environment (.venv)

# Synced again only when the lock or the project changed. Byte-compiled here, once: where .pyc files are
# never written (PYTHONDONTWRITEBYTECODE, a read-only tree), every start of the processor would compile
# torch and timm again (10 of its 16 s). Not in pyproject: there every `uv run` would compile it all again.
.venv/.synced: pyproject.toml uv.lock
	@if ! $(UV) --version 2>/dev/null | grep -q "uv $(UV_VERSION)"; then \
		$(PYTHON) -m pip install --quiet --disable-pip-version-check "uv==$(UV_VERSION)"; fi
	$(UV) sync --frozen --compile-bytecode
	@touch $@

sys-deps: ## Debian packages the tests and the dry run use (aria2, curl, chromium, debootstrap, systemd-nspawn; git, e2fsprogs, util-linux are standard)
	@missing=""; for pair in aria2c:aria2 curl:curl git:git mkfs.ext4:e2fsprogs losetup:util-linux chromium:chromium \
		debootstrap:debootstrap systemd-nspawn:systemd-container; do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
		sudo_cmd=""; [ "$$(id -u)" = 0 ] || sudo_cmd=sudo; \
		echo "installing Debian packages:$$missing"; \
		$$sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo_cmd apt-get install -y -qq $$missing >/dev/null; fi

demo: setup sys-deps dry-run ## sample archives -> download -> extract -> preprocess (CPU, tiny model) -> status

demo-clean: dry-run-clean ## forget the demo's output and sample archives so that `make demo` starts from nothing
	rm -rf $(DRY_RUN_ARCHIVES)

test: setup sys-deps ## the whole test suite (~30 min on 2 cores; the slowest 30 tests are listed at the end)
	$(RUN) pytest -q --durations=30

test-fast: setup ## the suite without the slow end-to-end drills
	$(RUN) pytest -q -m "not slow"

lint: setup ## ruff (lint and format check) and shellcheck on every script
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	git ls-files -z -- '*.sh' .ci/run | xargs -0 -r $(RUN) shellcheck -x

format: setup ## apply ruff's formatting and safe fixes
	$(RUN) ruff check --fix .
	$(RUN) ruff format .

.PHONY: pristine-root gpu-stack-check
pristine-root: sys-deps ## build (once) the pristine Debian 12 root the slow tests copy (~3 min; build/pristine/)
	$(PYTHON) tests/pristine/root.py

gpu-stack-check: pristine-root ## system.sh's NVIDIA stack, DKMS build included, in a pristine root (~25 min on 2 busy cores; docs/gpu_stack_check.json)
	$(PYTHON) tests/pristine/gpu_stack_check.py

.PHONY: bench bench-quick bench-record bench-gpu-small
bench: setup sys-deps ## every benchmark (~20 min on 2 cores); figures in build/bench/results/ (tracked files untouched)
	$(RUN) python benchmarks/run_all.py

bench-quick: setup sys-deps ## every benchmark at small sizes (proves each runs); build/bench/quick/results/
	$(RUN) python benchmarks/run_all.py --quick

bench-record: ## copy the last `make bench` (build/bench/results/) into benchmarks/results/ (tracked)
	@test -f build/bench/results/README.md || { echo "no finished run in build/bench/results: make bench"; exit 1; }
	@if grep -q '"quick": true' build/bench/results/*.json; then echo "build/bench/results holds quick figures"; exit 1; fi
	rm -f benchmarks/results/*.json
	cp build/bench/results/*.json build/bench/results/README.md benchmarks/results/

bench-gpu-small: setup ## the prepared GPU benchmark at tiny sizes on the CPU (proves it runs without a GPU)
	$(RUN) python benchmarks/gpu.py --small

clean: ## remove build outputs (sample archives, demo, benchmark scratch); keeps .venv
	rm -rf build

include gcp/gcp.mk
include gcp/provision.mk
