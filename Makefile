# normkit: `make demo` runs the main job, `make test` runs the tests.
# Both build .venv from nothing. Torch: when none is importable in the venv, TORCH_SPEC is installed
# (the version CI tests, and pyproject.toml's floor) from pip's configured index, or from TORCH_INDEX
# when set: TORCH_INDEX=https://download.pytorch.org/whl/cpu gets the CPU-only build (PyPI's Linux
# wheel pulls gigabytes of CUDA libraries). VENV_ARGS=--system-site-packages reuses a torch that is
# already installed on the machine.

PYTHON     ?= python3
VENV       ?= .venv
VENV_ARGS  ?=
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PYTEST_ARGS ?= -n 2

BIN := $(VENV)/bin
PY  := $(BIN)/python

.PHONY: demo test lint bench env clean-venv fashion-mnist lab-extra

# The quick reproduction of Ioffe & Szegedy (2015), Fig. 1; prints where its report is and ends with
# one line: how many of its checks held and what a failure means. Torch threads: the free cores
# (NORMKIT_THREADS=N or DEMO_ARGS='--threads N' to choose).
DEMO_ARGS ?=
demo: $(VENV)/.installed-lab lab-extra fashion-mnist
	$(BIN)/normkit lab run ioffe2015-mnist --quick --out runs/demo --overwrite $(DEMO_ARGS)

# The lab extra, checked before any work: one line naming what is missing and how to install it.
lab-extra:
	@$(PY) -m normkit.cli.extras "make demo"

test: $(VENV)/.installed-dev fashion-mnist
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_layers.py
	$(PY) benchmarks/bench_family.py

env: $(VENV)/.installed-lab
	$(BIN)/normkit env

$(PY):
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)

$(VENV)/.torch: | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch found: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "no torch importable: installing $(TORCH_SPEC) $(if $(TORCH_INDEX),from $(TORCH_INDEX))"; \
		$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"; \
	fi
	@touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[$*]"
	@touch $@

# The dev install adds timm (the tools' tests run timm's models, built with random weights) without
# letting anything change the installed torch: torchvision pins an exact torch, so it is installed
# with --no-deps at the release made for the installed torch (minor + 15: torch 2.13 -> 0.28,
# 2.14 -> 0.29), and timm with --no-deps plus its own dependencies. Override TORCHVISION_SPEC (e.g.
# torchvision==0.28.0) or TIMM_SPEC; TIMM_SPEC= (empty) installs neither, and timm's tests skip.
TIMM_SPEC        ?= timm>=1.0,<2
TIMM_DEPS        ?= huggingface_hub pyyaml safetensors
TORCHVISION_SPEC ?=

$(VENV)/.installed-dev: pyproject.toml Makefile $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[dev]"
	@if [ -n "$(TIMM_SPEC)" ]; then \
		torch_before="$$($(PY) -c 'import torch; print(torch.__version__)')"; \
		vision="$(TORCHVISION_SPEC)"; \
		if [ -z "$$vision" ]; then \
			vision="torchvision==0.$$($(PY) -c 'import torch; print(int(torch.__version__.split(".")[1]) + 15)').*"; \
		fi; \
		echo "timm for the tests: $(TIMM_SPEC), $$vision (no dependencies; torch stays $$torch_before)"; \
		$(PY) -m pip install --quiet --no-deps "$$vision" "$(TIMM_SPEC)" \
			&& $(PY) -m pip install --quiet $(TIMM_DEPS) \
			|| { echo "could not install timm; TIMM_SPEC= skips it (its tests then skip)"; exit 1; }; \
		torch_after="$$($(PY) -c 'import torch; print(torch.__version__)')"; \
		if [ "$$torch_before" != "$$torch_after" ]; then \
			echo "torch changed from $$torch_before to $$torch_after while installing timm"; exit 1; \
		fi; \
	fi
	@touch $@

# Fashion-MNIST for the lab, from Debian's package where apt-get is available to root. Never fails:
# without it the experiments fall back to scikit-learn's digits and say so.
FASHION_MNIST_DIR ?= /usr/share/datasets/fashion-mnist
fashion-mnist:
	@if [ -f $(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte.gz ]; then \
		echo "Fashion-MNIST: $(FASHION_MNIST_DIR)"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist (30 MB) for the lab"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
		|| { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; } \
		|| echo "could not install dataset-fashion-mnist: the lab falls back to scikit-learn's digits"; \
	else \
		echo "Fashion-MNIST not installed (apt-get as root installs dataset-fashion-mnist):" \
			"the lab falls back to scikit-learn's digits"; \
	fi

clean-venv:
	rm -rf $(VENV)
