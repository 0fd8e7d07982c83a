PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test clean demo demo-assets ablation app app-setup test-app

# the demo's data: fashion_mnist (real photographs, the default) or synthetic (procedural images)
DATA ?= fashion_mnist
# a folder with the four Fashion-MNIST idx files (optional; see demo/fashion_mnist.py for where they are looked for)
FASHION_MNIST ?=
# the demo's frozen backbone: autonat (the default) or maskgit (Fashion-MNIST only)
BACKBONE ?= autonat
DEMO_FLAGS = --dataset $(DATA) --backbone $(BACKBONE) $(if $(FASHION_MNIST),--fashion-mnist $(FASHION_MNIST))

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

test: setup
	$(PY) -m pytest -q tests --ignore=tests/app

# the interactive page (app.py) and its browser test: gradio and playwright (requirements-app.txt) go into
# .venv/app, a venv that sees .venv's packages through a .pth file (gradio pins an older Pillow than .venv's)
APP_VENV := $(VENV)/app
APP_PY := $(APP_VENV)/bin/python
PURELIB = -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"
SUDO = $(shell [ "$$(id -u)" = 0 ] || echo sudo)

app-setup: $(APP_VENV)/.installed

$(APP_VENV)/.installed: requirements-app.txt $(VENV)/.installed
	$(PY) -m venv $(APP_VENV)
	$(PY) $(PURELIB) > "$$($(APP_PY) $(PURELIB))/ka_mig_core.pth"
	$(APP_PY) -m pip install -q -r requirements-app.txt
	touch $@

# serves the page on http://127.0.0.1:7860 (APP_ARGS: app.py's flags, e.g. "--weights demo --port 8000")
app: app-setup
	$(APP_PY) app.py $(APP_ARGS)

# the page in headless Chromium (Debian's package, installed with apt-get when /usr/bin/chromium is missing)
test-app: app-setup
	test -x /usr/bin/chromium || ( $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null )
	$(APP_PY) -m pytest -q tests/app

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
