# One-command setup: `make test` on a fresh machine creates .venv, installs the pinned set,
# builds the demo models and runs the tests. See README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PYTHONPATH := $(CURDIR)
export ORT_DISABLE_TELEMETRY := 1

.PHONY: venv models test lint serve demo bench clean

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

venv: $(STAMP)

models: $(STAMP)
	$(BIN)/python scripts/build_models.py --out models

test: models
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

serve: models
	$(BIN)/model-server --repository models --host 127.0.0.1 --port 8000

demo: models
	$(BIN)/python scripts/demo.py --repository models

bench: models
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/routing.py

clean:
	rm -rf models .pytest_cache .mypy_cache .ruff_cache
