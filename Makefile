PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test clean demo demo-assets

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

# CPU demo: the whole pipeline on procedural images with the committed demo weights; output/demo/
demo: setup
	$(PY) -m demo.run_demo $(DEMO_ARGS)

# rebuilds demo/assets/ (demo tokenizer + backbone) with the repo's own training entry points
demo-assets: setup
	$(PY) -m demo.make_assets $(DEMO_ARGS)

clean:
	rm -rf $(VENV)
