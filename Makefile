# ctxseg: two commands on a fresh machine.
#   make run   - set up .venv (if missing) and run the whole study: dvc repro
#   make test  - set up .venv (if missing) and run the test suite
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup run test test-fast bench mlflow-ui clean-outputs

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

run: setup
	dvc repro

test: setup
	python -m pytest -q

test-fast: setup
	python -m pytest -q -m "not slow"

bench: setup
	python -m bench

mlflow-ui: setup
	mlflow ui --backend-store-uri "$$(python -m pipeline.mlflow_store)" --port 5000
