# Every target that runs something first makes sure .venv exists and holds what it needs,
# so `make demo` and `make test` each work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-faults soak lint typecheck check bench bench-quick bench-deps clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/relay demo

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

test-faults: $(STAMP)
	$(BIN)/pytest tests/faults $(PYTEST_ARGS)

# The long chaos soak (5,000 submissions, a few minutes; `make test` runs a short one).
# Its report goes to tests/artifacts/chaos-soak.json; RELAY_SOAK_SEED=N replays a run.
soak: $(STAMP)
	RELAY_SOAK=1 $(BIN)/pytest tests/faults/test_chaos.py $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check relay tests bench
	$(BIN)/ruff format --check relay tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

check: lint typecheck test

# The reference MTA and the load generator come from Debian's packages (the bench runs as root).
bench-deps:
	@command -v wrk >/dev/null && command -v postfix >/dev/null && command -v opendkim >/dev/null \
	  || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	       --no-install-recommends wrk postfix opendkim opendkim-tools; }

bench: $(STAMP) bench-deps
	$(BIN)/python bench/run

bench-quick: $(STAMP) bench-deps
	$(BIN)/python bench/run --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache tests/artifacts
