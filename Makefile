# The two commands of the README, and the gates CI runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint typecheck bench faults coordinators clean

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
	$(BIN)/pytest -q -rfEs -p no:cacheprovider -n 2 --dist loadfile --durations=15 tests

# herder side by side with Dask, Ray, Celery and a process pool (installs them into
# bench/.venv-peers); BENCH_ARGS=--quick while developing. herder's own modules are
# compiled to bytecode first, as pip does for the peers' (an editable install is not,
# and with PYTHONDONTWRITEBYTECODE every herder process compiled its modules anew:
# 0.4 s of the coordinator's imports alone, 1.35 -> 0.91 s).
bench: $(BIN)/herder
	$(BIN)/python -m compileall -q src
	$(BIN)/python bench/compare.py $(BENCH_ARGS)

# The fault suite at the issue's full size (tests/faults); then FAULTS.md from its rows.
# HERDER_FAULT_SEED=N replays one run's fault schedules.
FAULTS_RESULTS := build/faults
faults: $(BIN)/herder
	rm -rf $(FAULTS_RESULTS)
	HERDER_FAULTS_FULL=1 HERDER_FAULTS_RESULTS=$(FAULTS_RESULTS) \
		$(BIN)/pytest -q -rfEs -p no:cacheprovider --timeout 3600 tests/faults; \
		status=$$?; \
		$(BIN)/python tests/faults/render_faults.py $(FAULTS_RESULTS) FAULTS.md && exit $$status

# Several coordinators on one PostgreSQL at full size: 50,000 tasks on 6 agents with the
# leader killed, two coordinators racing for 60 s (tests/integration/test_coordinators.py).
coordinators: $(BIN)/herder
	HERDER_FAULT_SCALE=10 $(BIN)/pytest -q -rfEs -p no:cacheprovider -s --timeout 3600 \
		tests/integration/test_coordinators.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache
