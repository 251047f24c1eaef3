# The README's commands. Each target sets up its own environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU := torch==2.13.0
SEEDS ?= 0
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-all demo bench lint format clean mutate

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the default torch build"; $(PIP) install -q "torch>=2.4"; \
	else \
		echo "No CUDA: installing the CPU torch wheel $(TORCH_CPU)"; $(PIP) install -q $(TORCH_CPU); \
	fi
	$(PIP) install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PY) -m pytest -m "not slow and not gpu"

test-all: setup
	$(PY) -m pytest

demo: setup  ## one seed in ~5 min; the README table: make demo SEEDS="0 1 2"
	$(PY) -m rlt_pl.demo --out runs/demo --seeds $(SEEDS)

bench: setup
	$(PIP) install -q -e ".[dev,bench]"
	$(PY) -m benchmarks.run --out benchmarks

lint: setup
	$(PY) -m ruff check rlt_pl tests benchmarks
	$(PY) -m ruff format --check rlt_pl tests benchmarks

format: setup
	$(PY) -m ruff check --fix rlt_pl tests benchmarks
	$(PY) -m ruff format rlt_pl tests benchmarks

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache

mutate:  ## mutation run (outside the default suite): every planted bug must turn its tests red
	$(PY) -m benchmarks.mutate --json benchmarks/mutate_results.json
