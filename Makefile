# Two commands: `make demo` and `make test`. Each creates .venv when missing and installs the project.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test demo lint format bench-models clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check cellmodel jobs serve tests
	$(PY) -m pytest -q -rs

demo: $(STAMP)
	$(PY) -m jobs.demo

lint: $(STAMP)
	$(PY) -m ruff check cellmodel jobs serve tests
	$(PY) -m ruff format --check cellmodel jobs serve tests

format: $(STAMP)
	$(PY) -m ruff format cellmodel jobs serve tests
	$(PY) -m ruff check --fix cellmodel jobs serve tests

bench-models: $(STAMP)
	$(PY) -m jobs.bench models

clean:
	rm -rf runs out .pytest_cache
