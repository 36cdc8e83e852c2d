PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup services demo test lint typecheck unit bench clean fuzz

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

services:
	bash scripts/ensure-services.sh

demo: setup
	$(BIN)/python -m changeover.demo

lint: setup
	$(BIN)/ruff check .

typecheck: setup
	$(BIN)/mypy

# The suite's tests mostly wait on real processes and sockets, so they share the cores: in
# TEST_WORKERS processes (pytest-xdist), then the few timing-sensitive ones (`serial`) alone.
TEST_WORKERS ?= 3

unit: setup services
	$(BIN)/pytest -n $(TEST_WORKERS) -m "not serial"
	$(BIN)/pytest -m serial

test: lint typecheck unit

# Each benchmark prints its table and the command that produced it (see docs/benchmarks.md).
BENCHES := proxy_bench rollback_bench migrations_bench websocket_bench

bench: setup
	bash scripts/ensure-services.sh --bench
	for b in $(BENCHES); do echo "== bench/$$b.py"; $(BIN)/python bench/$$b.py || exit 1; done

# Coverage-guided fuzzing of the proxy's parsers (tests/fuzz/run.py); `make test` runs a short,
# seconds-long hypothesis pass over the same targets and the corpus in tests/fuzz/corpus/.
FUZZ_SECONDS ?= 120
FUZZ_TARGETS := chunks request_head response

fuzz: setup
	$(BIN)/python -c 'import atheris' 2>/dev/null || $(BIN)/pip install -q atheris || \
		echo "atheris did not install: hypothesis inputs instead (not coverage-guided)"
	for t in $(FUZZ_TARGETS); do echo "== fuzz $$t"; \
		$(BIN)/python -m tests.fuzz.run $$t -max_total_time=$(FUZZ_SECONDS) || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
