# Developer entry points. `make test` is what CI runs (through .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch (it runs on the CPU too and brings triton); the extension is
# compiled with its CUDA kernels when nvcc is found.
TORCH_SPEC ?= torch==2.14.1
INSTALLED := $(VENV)/.mdarts-installed

.PHONY: install test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy ninja "setuptools>=64" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[engine,test]"
	touch $@

install: $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest -q

bench: $(INSTALLED)
	$(PY) benchmarks/kernels.py

clean:
	rm -rf build *.egg-info mdarts_kernels/_C*.so
