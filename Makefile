# headrace: `make up` runs the local stack, `make test` runs every check CI runs.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.headrace-installed

.PHONY: up test install lint typecheck unit schemas bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --progress-bar on --upgrade pip

# Reinstalls when pyproject.toml changes.
$(STAMP): pyproject.toml | $(BIN)/python
	@echo "installing headrace and its dev tools into $(VENV) ..."
	$(BIN)/pip install --progress-bar on -e '.[dev]'
	touch $@

install: $(STAMP)

up: install
	$(BIN)/headrace up

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install
	HF_HUB_OFFLINE=1 $(BIN)/pytest

test: lint typecheck unit

# Regenerate schemas/json/ after changing the contract (a test fails while they are stale).
schemas: install
	$(BIN)/python -m schemas.jsonschema

bench: install
	$(BIN)/headrace bench

clean:
	rm -rf .headrace bench-results .pytest_cache .mypy_cache .ruff_cache
