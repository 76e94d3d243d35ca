# `make test` and `make demo` each set up .venv by themselves (torch pinned), build the
# extensions, and run. Re-running only rebuilds what changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.cumo-deps
EXT_STAMP := $(VENV)/.cumo-ext
CSRC := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh' 2>/dev/null)
PYTEST_ARGS ?=
# torch finds nvcc on PATH (/usr/local/bin here) but needs the toolkit root for headers and libs.
ifneq ($(wildcard /usr/local/cuda/include/cuda.h),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: test test-slow demo bench report ext clean gpu-check

$(STAMP): requirements-dev.txt setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -r requirements-dev.txt
	CUMO_SKIP_EXT=1 $(PY) -m pip install --quiet --no-build-isolation --no-deps -e .
	touch $@

$(EXT_STAMP): $(STAMP) $(CSRC) setup.py
	MAX_JOBS=2 $(PY) setup.py --quiet build_ext --inplace
	touch $@

ext: $(EXT_STAMP)

test: $(EXT_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: $(EXT_STAMP)
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)

demo: $(EXT_STAMP)
	$(PY) -m cumo_layers.demo

bench: $(EXT_STAMP)
	$(PY) -m pytest benchmarks --benchmark-only -q

report: $(EXT_STAMP)
	$(PY) -m benchmarks.report

# On a GPU machine, with its own python3 and torch (no venv, no internet): build the CUDA extension for
# the local GPU, run the GPU tests, validate, time; writes gpu_check.{log,json} ($OUT or benchmarks/out).
# GPU_CHECK_ARGS: e.g. --quick, or --tune-s 150 (tune the tile tables first and measure with them).
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf build moe_kernels/*.so $(STAMP) $(EXT_STAMP)
