# Two-command quick start: `make demo` and `make test`. Both create (or reuse) .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo demo-quick test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,dev,tensorboard]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mama demo

demo-quick: $(STAMP)
	$(BIN)/mama demo --quick

# The architecture (import-linter layers), lint, format and types first: they take seconds.
test: $(STAMP)
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs data/synthvl
