VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test venv lint bench

$(VENV)/.installed: setup.cfg pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(VENV)/bin/orchestrator demo

test: venv
	$(PY) -m pytest -q -n 2

lint: venv
	$(VENV)/bin/ruff check orchestrator tests bench
	$(VENV)/bin/mypy

bench: venv  ## every benchmark; make bench BENCH_FLAGS=--quick for the short variants
	$(PY) bench/run_all.py $(BENCH_FLAGS)
