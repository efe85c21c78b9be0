# audiopipe — developer entry points.
#
#   make demo    set up .venv (system packages included) and run the demo
#   make test    set up .venv and run the test suite (not the e2e tests)
#
# Every target that runs Python depends on `venv`, which runs scripts/bootstrap.sh;
# that is idempotent and takes about a second when nothing changed.

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PYTHON := $(VENV)/bin/python
PIP    := $(PYTHON) -m pip

export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: help venv demo test test-e2e bench store-up store-down serve lock clean

help:
	@echo "make demo        set up .venv and run scripts/demo.py"
	@echo "make test        set up .venv and run the tests (pytest, e2e excluded)"
	@echo "make test-e2e    the deployments end to end: Prefect server + worker, Dask CLI cluster, SeaweedFS"
	@echo "make bench       run benchmarks/featurize.py"
	@echo "make store-up    start the local SeaweedFS S3 store"
	@echo "make store-down  stop it"
	@echo "make serve       run store, Prefect server + UI, deployments and a worker (Ctrl-C stops)"
	@echo "make lock        regenerate constraints.txt from .venv"
	@echo "make clean       remove scratch folders (keeps .venv)"

venv:
	@bash scripts/bootstrap.sh

demo: venv
	$(PYTHON) scripts/demo.py

test: venv
	$(PYTHON) -m pytest -q

# tests/e2e: a Prefect server, a process worker, `dask scheduler` + two `dask worker`s and SeaweedFS, started
# as docs/deploy.md says; deploys infra/prefect.yaml and runs deployments through the API (~6 min on 2 cores).
test-e2e: venv
	$(PYTHON) -m pytest -q -m e2e tests/e2e

bench: venv
	$(PYTHON) benchmarks/featurize.py

bench-inference: venv
	$(PYTHON) benchmarks/inference.py

store-up: venv
	$(VENV)/bin/audiopipe store up

store-down: venv
	$(VENV)/bin/audiopipe store down

serve: venv
	$(VENV)/bin/audiopipe serve

# Re-resolve against pyproject.toml (without the old pins), then freeze what is installed.
# Review the diff of constraints.txt before committing it.
lock: venv
	$(PIP) install -q -e ".[train,dev]"
	@{ \
	  echo "# Pinned versions of every dependency of audiopipe[train,dev] (Python 3.11, linux x86_64)."; \
	  echo "# Used by scripts/bootstrap.sh:  pip install -c constraints.txt -e \".[train,dev]\""; \
	  echo "# Regenerate with:  make lock   (pip freeze --exclude-editable of .venv, less audiopipe/pip/setuptools/wheel)"; \
	  $(PIP) freeze --exclude-editable | grep -viE '^(audiopipe|pip|setuptools|wheel)([=@ ]|$$)'; \
	} > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt
	@# .venv now matches the new lock exactly: refresh the stamp so bootstrap skips pip.
	@cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1 > $(VENV)/.audiopipe-stamp
	@echo "constraints.txt: $$(grep -vc '^#' constraints.txt) pins"

clean:
	rm -rf .audiopipe/ demo-out/ benchmarks/.data/ .pytest_cache/ .ruff_cache/ build/
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
