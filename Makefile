# treasure_engine — `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTEST_ARGS ?=
RUST_SOURCES := $(shell find rust -name '*.rs' -not -path '*/fuzz/*' -not -path '*/target/*') Cargo.toml Cargo.lock rust/core/Cargo.toml rust/py/Cargo.toml

.PHONY: help demo test lint check-rust check-python loom pytest bench chaos fuzz build emulators clean lock fmt

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

$(VENV)/.installed: requirements/dev.txt
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements/dev.txt
	touch $@

$(VENV)/.built: $(VENV)/.installed $(RUST_SOURCES) pyproject.toml
	$(VENV)/bin/maturin develop --release --quiet
	touch $@

build: $(VENV)/.built ## build the Rust extension into .venv (release)

tests/emulators/node_modules/.installed: tests/emulators/package.json tests/emulators/package-lock.json
	npm ci --prefix tests/emulators --no-audit --no-fund --loglevel=error
	touch $@

emulators: tests/emulators/node_modules/.installed ## install kinesalite from the lock file

demo: build ## run the main job on the embedded Kinesis endpoint
	$(VENV)/bin/treasure-engine demo

check-rust: ## cargo test, clippy -D warnings, fmt --check
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cargo test --workspace --locked

# The ring's loom models (rust/core/tests/ring_loom.rs) build every crate with `--cfg loom`, so in their own target
# dir (the normal build cache stays valid) and with the `loom` profile (no fat LTO). Each model bounds its
# preemptions; LOOM_MAX_PREEMPTIONS=n overrides them all (3 takes minutes).
loom: ## loom models of the ring: claim/commit/read, parking, panicking writer
	RUSTFLAGS="$${RUSTFLAGS:-} --cfg loom" CARGO_TARGET_DIR=target/loom \
		cargo test -p treasure_core --test ring_loom --profile loom --locked

check-python: build ## ruff, mypy --strict, stubtest
	$(VENV)/bin/ruff check python tests bench examples
	$(VENV)/bin/ruff format --check python tests bench examples
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m mypy.stubtest treasure_engine._core --allowlist python/stubtest-allowlist.txt

lint: check-rust check-python ## everything CI runs besides the tests

pytest: build emulators ## the Python test suite (short chaos cases)
	$(PY) -m pytest -m "not bench" $(PYTEST_ARGS)

test: build emulators lint loom pytest ## the whole suite: Rust checks, lint, types, loom, pytest

# cargo-fuzz on the nightly toolchain (`rustup toolchain install nightly`, `cargo install cargo-fuzz --locked`);
# rust/core/fuzz is a workspace of its own, so clippy and `cargo test --workspace` never build it.
# FUZZ_SECONDS (default 60) bounds each target; FUZZ_RUNS=n also stops each after n executions (FUZZ_SECONDS=0
# lifts the time bound: `make fuzz FUZZ_RUNS=10000000 FUZZ_SECONDS=0` is the run docs/reliability.md records).
fuzz: ## every cargo-fuzz target for a bounded time each (FUZZ_SECONDS, FUZZ_RUNS)
	rust/core/fuzz/run.sh

chaos: build emulators fuzz ## fuzz targets, then the slow chaos and soak cases in full
	TREASURE_CHAOS=full $(PY) -m pytest -m slow $(PYTEST_ARGS)

bench: build emulators ## run the benchmarks and regenerate bench/RESULTS.md
	$(PY) bench/run.py

fmt: ## format Rust and Python sources
	cargo fmt --all
	$(VENV)/bin/ruff format python tests bench examples
	$(VENV)/bin/ruff check --fix python tests bench examples

lock: ## re-pin requirements/dev.txt from the current .venv
	$(PIP) freeze --exclude-editable | grep -vi '^treasure' > requirements/dev.txt

clean: ## remove build outputs (keeps .venv)
	cargo clean
	rm -f $(VENV)/.built
