# The two commands (README): `make demo` starts the gateway on the embedded demo,
# `make test` runs the tests. Both create ./.venv on first use.
#
# TORCH: the torch wheel to install first. The default is the CPU build this project's CI uses;
# on a CUDA 13 host use e.g. `make demo TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu130'`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint results bench-load bench-clean clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[train,eval,dev]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m gateway serve --demo

test: $(VENV)/.installed
	$(BIN)/python -m pytest

lint: $(VENV)/.installed
	$(BIN)/ruff check gateway defense_models tests bench
	$(BIN)/mypy

# Rebuild every plan under bench/plans/ into reports/ (not in git) and copy the tables and plots the
# docs show into docs/results/. Hours on two cores.
results: $(VENV)/.installed
	$(BIN)/python bench/results.py

bench-load: $(VENV)/.installed
	$(BIN)/python bench/load.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
