PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
