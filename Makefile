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
	@echo "make lock        re-resolve the hashed locks in locks/ (uv), keeping their versions"
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

# The hashed, universal locks (Linux x86_64/aarch64, macOS arm64; Python 3.11 and 3.12), resolved by uv
# (a dev dependency) from pyproject.toml. uv keeps every version already in a lock file unless told otherwise
# (UPGRADE="--upgrade-package NAME" or UPGRADE=--upgrade), so adding a dependency moves nothing else.
#   locks/dev.txt     every extra (train, store, cluster, dev): scripts/bootstrap.sh installs it into .venv
#   locks/worker.txt  the core + train: the worker image (infra/docker/Dockerfile)
#   locks/core.txt    the core alone: featurize and inference
#   locks/worker-gpu.txt  the GPU worker image: worker.txt with tensorflow[and-cuda] (Linux x86_64 only)
# The others are constrained by dev.txt, so all of them agree on every version they share.
# Review the diff of locks/ before committing it.
UV        := $(VENV)/bin/uv
UPGRADE   :=
UV_LOCK   := $(UV) pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes \
             --quiet --custom-compile-command "make lock"
lock: venv
	$(UV_LOCK) $(UPGRADE) --all-extras -o locks/dev.txt
	$(UV_LOCK) --extra train -c locks/dev.txt -o locks/worker.txt
	$(UV_LOCK) -c locks/dev.txt -o locks/core.txt
	@# The GPU worker image (Linux x86_64): tensorflow[and-cuda] of the same release replaces tensorflow-cpu.
	@# Its two inputs are written into .venv, a fixed path, so that the lock's comments do not change.
	@echo "tensorflow[and-cuda]==$$(sed -n 's/^tensorflow-cpu==\([^ ;]*\).*/\1/p' locks/dev.txt)" > $(VENV)/lock-gpu.in
	@echo 'tensorflow-cpu ; sys_platform == "never"' > $(VENV)/lock-no-cpu.txt
	$(UV) pip compile pyproject.toml $(VENV)/lock-gpu.in --extra train --override $(VENV)/lock-no-cpu.txt \
	    -c locks/dev.txt --python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --quiet \
	    --custom-compile-command "make lock" -o locks/worker-gpu.txt
	@for f in locks/*.txt; do echo "$$f: $$(grep -c '^[A-Za-z0-9]' $$f) pins"; done
	@bash scripts/bootstrap.sh

clean:
	rm -rf .audiopipe/ demo-out/ benchmarks/.data/ .pytest_cache/ .ruff_cache/ build/
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
