# mlcl: make install | train | test | lint | clean
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export WANDB_MODE ?= offline

.PHONY: install train test lint format bench study clean

install:  ## create .venv and install mlcl with its dev extras (pip, editable)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'

train:  ## the main job: train + test on the embedded digits data (CPU, a few minutes)
	$(BIN)/python -m mlcl.train

test:  ## the test suite (pytest exit 5, "no tests collected", fails)
	$(BIN)/python -m pytest

lint:  ## ruff
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format:
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

study:  ## the quick default study: 7 methods x 3 missing rates x 3 seeds, report.md (CPU, <= 60 min)
	$(BIN)/python -m mlcl.study default_quick

bench:  ## loss cost table (CPU)
	$(BIN)/python -m mlcl.bench

clean:  ## remove run outputs and caches (keeps .venv)
	rm -rf outputs multirun .pytest_cache .ruff_cache lightning_logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
