# ctxseg: two commands on a fresh machine.
#   make run   - set up .venv (if missing) and run the whole study: dvc repro
#   make test  - set up .venv (if missing) and run the test suite
# (make docs builds the documentation site, docs/ + mkdocs.yml, strictly into site/;
#  make local-cloud starts a bucket, PostgreSQL and an MLflow server on loopback, docs/cluster.md)
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export NO_MKDOCS_2_WARNING := 1

.PHONY: setup run test test-fast bench mlflow-ui local-cloud docs clean-outputs

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

PORT ?= 5000
mlflow-ui: setup
	python -m pipeline.mlflow_tracking.mlflow_ui --port $(PORT)

# An S3 endpoint, PostgreSQL and an MLflow tracking server on loopback, to try the cloud recipe of
# docs/cluster.md by hand (needs Debian's postgresql package); Ctrl-C stops them all.
local-cloud: setup
	python -m pipeline.local_cloud

docs: setup
	mkdocs build --strict --site-dir site
