# `make demo`: set up and run the service embedded (SQLite, file broker, sandbox).
# `make test`: set up and run the whole test suite (needs PostgreSQL, RabbitMQ, Redis), in
#   PYTEST_WORKERS parallel processes (pytest-xdist; `make test PYTEST_WORKERS=0` runs it in one).
# `make lint`: ruff (lint and format check) and mypy (strict on worker/ and models/).
# `make mutation`: mutmut over worker/ and models/ with the fast tests (no servers);
#   prints the score, writes mutants/survivors.txt. See .ci/mutation.
VENV ?= .venv
PY := $(VENV)/bin/python
# Most tests wait on servers and worker processes rather than compute: 4 processes keep a 2-core
# machine busy. --dist loadgroup keeps each xdist_group's tests on one process, one after another.
# The few tests that measure a rate or a silent window (marked `timing`) run afterwards, alone.
PYTEST_WORKERS ?= 4

$(PY): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(PY)

$(VENV)/bin/mutmut: $(PY)
	$(PY) -m pip install -q -e '.[test,mutation]'
	touch $(VENV)/bin/mutmut

.PHONY: demo test lint bench mutation
demo: $(PY)
	$(VENV)/bin/kling-worker demo

test: $(PY)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadgroup -m "not timing"
	$(PY) -m pytest -q -p no:xdist -m timing

lint: $(PY)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Every figure of the README's Benchmarks section, one after the other (about 45 minutes).
bench: $(PY)
	$(PY) bench/run.py
	$(PY) bench/run.py --polling
	$(PY) bench/run.py --deliveries
	$(PY) bench/scale.py
	$(PY) bench/fairness.py

mutation: $(VENV)/bin/mutmut
	VENV=$(VENV) bash .ci/mutation
