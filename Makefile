# Two entry points for a fresh clone: `make demo` and `make test`. Each creates .venv if missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cxrfair-installed

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/cxrfair demo --out demo-out

# One pytest worker per logical core (at most 4): the suite is CPU-bound (XLA compiles, torch steps).
PARALLEL := -n logical --maxprocesses 4 --dist worksteal

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PARALLEL)

test-all: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PARALLEL) -m ''

clean:
	rm -rf demo-out build *.egg-info
