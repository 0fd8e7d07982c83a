PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test clean demo demo-assets ablation

# the demo's data: fashion_mnist (real photographs, the default) or synthetic (procedural images)
DATA ?= fashion_mnist
# a folder with the four Fashion-MNIST idx files (optional; see demo/fashion_mnist.py for where they are looked for)
FASHION_MNIST ?=
DEMO_FLAGS = --dataset $(DATA) $(if $(FASHION_MNIST),--fashion-mnist $(FASHION_MNIST))

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests

# CPU demo: KA-MIG vs a head-only control vs the frozen backbone on Fashion-MNIST (held-out NLL with confidence
# intervals, FID) with the committed demo weights; output/demo/ (DATA=synthetic: procedural images, output/demo_synthetic/)
demo: setup
	$(PY) -m demo.run_demo $(DEMO_FLAGS) $(DEMO_ARGS)

# rebuilds demo/assets/<dataset>/ (tokenizer, backbone, its held-out curve, FID reference features) with the
# repo's own training entry points
demo-assets: setup
	$(PY) -m demo.make_assets $(DEMO_FLAGS) $(DEMO_ARGS)

# the graph ablation on the demo: every subset of {G_co, G_s, G_p}, GAT, shuffled graphs, control, backbone;
# benchmarks/ABLATION.md and benchmarks/ablation.csv
ablation: setup
	$(PY) -m demo.ablation $(DEMO_FLAGS) $(DEMO_ARGS)

clean:
	rm -rf $(VENV)
