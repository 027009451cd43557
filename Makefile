# The README's two commands: `make serve` and `make test`.
# Each creates .venv at the repo root when missing and installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: serve test lint format bench clean-venv loadtest fuzz soak

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	@# torch first, pinned, so nothing else pulls a different (CUDA) build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[test]"
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

serve: $(STAMP)
	$(BIN)/loraplex serve $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not gpu" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

# Locust against URL, or against `loraplex serve` (demo model, 127.0.0.1) started and stopped
# around the run; CSVs in results/loadtest_*.csv. LOCUST_ARGS: e.g. "--trace t.jsonl".
loadtest: $(STAMP)
	$(BIN)/python -m loraplex.loadtests.locust_run --users $(or $(USERS),8) \
		--spawn-rate $(or $(RATE),8) --duration $(or $(DURATION),30s) \
		$(if $(URL),--url $(URL)) $(LOCUST_ARGS)

# The fuzz tests (tests/test_fuzz_*.py) with many examples: FUZZ_EXAMPLES per route and mode
# (make test runs them with a few).
fuzz: $(STAMP)
	LORAPLEX_FUZZ_EXAMPLES=$(or $(FUZZ_EXAMPLES),2000) $(BIN)/python -m pytest -q \
		tests/test_fuzz_schema.py tests/test_fuzz_bodies.py $(PYTEST_ARGS)

# The soak (#18): DURATION (default 10m) of streamed traffic from three tenants over 2x
# oversubscribed adapters on the demo model, with adapter load/unload loops, fine-tuning jobs,
# integrity and RSS checks, then the fairness phase; exit 1 if a pass criterion fails.
# Results in results/soak (results.json, results.md, server.log). SOAK_ARGS: e.g. "--rpm 60".
soak: $(STAMP)
	$(BIN)/python -m loraplex.loadtests.soak --duration $(or $(DURATION),10m) \
		--results $(or $(RESULTS),results/soak) $(SOAK_ARGS)

clean-venv:
	rm -rf $(VENV)
