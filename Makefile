# Fresh-machine entry points: each target sets up .venv on first use.
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTHON ?= python3

.PHONY: reproduce test lint install clean

$(STAMP): pyproject.toml setup.py src/exactflow/_native.c src/exactflow/_native_kernels.h
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

reproduce: $(STAMP)
	$(BIN)/exactflow reproduce

lint: $(STAMP)
	$(BIN)/ruff check setup.py src tests benchmarks
	$(BIN)/ruff format --check setup.py src tests benchmarks

test: lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) runs build src/*.egg-info
