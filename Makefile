# leukoflow: two commands. `make demo` sets up and runs the whole chain; `make test` runs the suite.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
export LEUKOFLOW_HOME ?= $(CURDIR)/.leukoflow
DEMO_CONFIG ?= configs/demo.yaml

.PHONY: install demo test lint up down clean bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/python -m pip install --progress-bar off -e '.[test]'
	touch $@

demo: install
	LEUKOFLOW_CONFIG=$(DEMO_CONFIG) $(BIN)/leukoflow demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: install lint
	$(BIN)/python -m pytest -q --durations=15

up: install
	LEUKOFLOW_CONFIG=$(DEMO_CONFIG) $(BIN)/leukoflow up

down:
	LEUKOFLOW_CONFIG=$(DEMO_CONFIG) $(BIN)/leukoflow down

bench: install
	$(BIN)/python bench/validation_throughput.py

clean:
	rm -rf $(LEUKOFLOW_HOME)
