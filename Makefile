# The two commands of the README, and the gates CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck bench faults clean

$(BIN)/herder: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(BIN)/herder

demo: $(BIN)/herder
	$(BIN)/python examples/demo.py

lint: $(BIN)/herder
	$(BIN)/ruff check src tests bench examples
	$(BIN)/ruff format --check src tests bench examples

typecheck: $(BIN)/herder
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/python ../shared/tools/check_layers.py src || test ! -f ../shared/tools/check_layers.py
	$(BIN)/pytest -q -rfEs -p no:cacheprovider tests

bench: $(BIN)/herder
	$(BIN)/python bench/core.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
