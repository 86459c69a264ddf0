# `make demo`: set up and run the service embedded (SQLite, file broker, sandbox).
# `make test`: set up and run the whole test suite (needs PostgreSQL, RabbitMQ, Redis).
VENV ?= .venv
PY := $(VENV)/bin/python

$(PY): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(PY)

.PHONY: demo test bench
demo: $(PY)
	$(VENV)/bin/kling-worker demo

test: $(PY)
	$(PY) -m pytest -q

bench: $(PY)
	$(PY) bench/run.py
