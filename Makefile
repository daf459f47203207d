# normkit: `make demo` runs the main job, `make test` runs the tests.
# Both build .venv from nothing. Torch: when none is importable in the venv, TORCH_SPEC is installed
# (the CPU build by default); set TORCH_SPEC to choose another, or VENV_ARGS=--system-site-packages
# to reuse a torch that is already installed on the machine.

PYTHON     ?= python3
VENV       ?= .venv
VENV_ARGS  ?=
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?= -n 2

BIN := $(VENV)/bin
PY  := $(BIN)/python

.PHONY: demo test lint bench env clean-venv

demo: $(VENV)/.installed-lab
	$(BIN)/normkit demo

test: $(VENV)/.installed-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks

bench: $(VENV)/.installed-dev
	$(PY) benchmarks/bench_layers.py

env: $(VENV)/.installed-lab
	$(BIN)/normkit env

$(PY):
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)

$(VENV)/.torch: | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch found: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else \
		echo "no torch importable: installing $(TORCH_SPEC)"; \
		$(PY) -m pip install --quiet "$(TORCH_SPEC)"; \
	fi
	@touch $@

$(VENV)/.installed-%: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install --quiet -e ".[$*]"
	@touch $@

clean-venv:
	rm -rf $(VENV)
