# The two commands in the README: `make demo` and `make test`. Both set up .venv from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint unit bench bench-full docs zoo clean

setup: $(STAMP)

# Torch first, CPU build where there is no GPU: on these machines `torch==2.13.0` resolves to the
# CPU wheel on disk; elsewhere without a GPU the PyTorch CPU index is used, never the multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@if $(PY) -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; \
	elif ls /opt/wheels/torch-2.13.0+cpu-* >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; \
	else $(PY) -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu; fi
	$(PY) -m pip install -q -e ".[dev,docs,sweep,tracr]"
	touch $(STAMP)

demo: setup
	$(PY) -m analyses.induction

lint: setup
	$(VENV)/bin/ruff check circuits viz analyses tests bench

unit: setup
	$(PY) -m pytest -q -p no:cacheprovider --durations=20 --jaxtyping-packages=circuits,beartype.beartype tests

bench: setup
	$(PY) -m pytest -q -p no:cacheprovider bench --benchmark-enable --benchmark-min-rounds=1 \
		--benchmark-max-time=0.05 --benchmark-warmup=off --benchmark-disable-gc

bench-full: setup
	$(PY) -m bench.table --out bench/latest.json --readme README.md --readme docs/performance.md

docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# The docs are built (strict, tutorials executed) and opened in headless Chromium by tests/test_docs_site.py.
test: lint unit bench

zoo: setup
	$(PY) -m circuits.models.zoo --all

clean:
	rm -rf $(VENV) out site .pytest_cache .benchmarks
