# One place for every command a user or CI runs. `make help` lists them.
SHELL := /bin/bash
.SHELLFLAGS := -Eeuo pipefail -c
.DEFAULT_GOAL := help

UV_VERSION ?= 0.13.9
PYTHON ?= python3
UV ?= uv
# Keep uv's downloads and cache inside the machine's normal cache; never fetch a Python build.
export UV_PYTHON_DOWNLOADS := never
RUN := $(UV) run --frozen

DEMO_DIR ?= build/demo

.PHONY: help setup sys-deps demo test lint bench clean
help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

setup: ## install uv (pinned) and the locked environment
	@command -v $(UV) >/dev/null 2>&1 && $(UV) --version | grep -q "$(UV_VERSION)" || $(PYTHON) -m pip install --quiet "uv==$(UV_VERSION)"
	$(UV) sync --frozen

sys-deps: ## Debian packages the tests and the dry run use (aria2)
	@command -v aria2c >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq aria2 >/dev/null; }

lint: setup ## ruff and shellcheck
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	git ls-files -z '*.sh' '.ci/run' | xargs -0 -r $(RUN) shellcheck -x

test: setup sys-deps ## the whole test suite
	$(RUN) pytest -q

include gcp/gcp.mk
