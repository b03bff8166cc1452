# Two-command quick start: `make demo` and `make test`. Both create (or reuse) .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo needs the package alone; the test tools (pytest, hypothesis, ruff, mypy, tensorboard) come
# with `make test`, which satisfies the demo's stamp too.
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: demo demo-quick test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test,dev,tensorboard,serve]"
	touch $(STAMP) $(DEMO_STAMP)

# --no-compile: byte-compiling every installed module (torch's thousands) took 23 of the 73 s of this
# install here; the demo then compiles the few it imports on first use (4 s).
$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e .
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/mama demo

demo-quick: $(DEMO_STAMP)
	$(BIN)/mama demo --quick

# The architecture (import-linter layers), lint, format and types first: they take seconds.
test: $(STAMP)
	$(BIN)/lint-imports --no-logo --no-cache
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs data/synthvl data/synthvl_quick data/synthvl_pretrain data/synthvl_pretrain_quick
