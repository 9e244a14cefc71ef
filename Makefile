# Set-up is part of each target: a fresh clone needs only Python 3.11+ and make.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

lint: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict grpc_leastconn

test: lint
	$(BIN)/python -m pytest

bench: $(VENV)/.installed
	$(BIN)/python bench/overhead.py
	$(BIN)/python bench/pick_scaling.py
	$(BIN)/python bench/balance.py
	$(BIN)/python bench/aio_overhead.py
	$(BIN)/python bench/aio_balance.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/fail_fast.py
	$(BIN)/python bench/weighted.py
	$(BIN)/python bench/metrics_overhead.py
	$(BIN)/python bench/health_reaction.py
	$(BIN)/python bench/scale.py
	$(BIN)/python bench/many_clients.py
