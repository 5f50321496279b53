# Developer entry points. `make lint` and `make test` are what CI runs (through .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch (it runs on the CPU too and brings triton); the extension is
# compiled with its CUDA kernels when nvcc is found.
TORCH_SPEC ?= torch==2.14.1
INSTALLED := $(VENV)/.mdarts-installed

# Multi30k: $(MDARTS_DATA), else the project's shared copy, else the download cache
DATA_DIR ?= $(or $(MDARTS_DATA),$(wildcard ../shared/data/multi30k))
SEARCH_ARGS ?=

.PHONY: install test lint format search bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(INSTALLED): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/*.cu)
	$(PY) -m pip install --quiet "$(TORCH_SPEC)" numpy ninja "setuptools>=64" wheel
	$(PY) -m pip install --quiet --no-build-isolation -e ".[engine,test,lint]"
	touch $@

install: $(INSTALLED)

test: $(INSTALLED)
	$(PY) -m pytest -q

# ruff (pyproject.toml): lint rules and the formatting, checked; `make format` applies both
lint: $(INSTALLED)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(INSTALLED)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

search: $(INSTALLED)
	@run=runs/search-tiny-en-de-$$(date +%Y%m%d-%H%M%S); \
	$(VENV)/bin/mdarts search --preset tiny --pair en-de $(if $(DATA_DIR),--data-dir $(DATA_DIR)) --out $$run $(SEARCH_ARGS) && \
	echo "genotype (mdarts derive $$run):" && $(VENV)/bin/mdarts derive $$run

bench: $(INSTALLED)
	$(PY) -m benchmarks.kernels

clean:
	rm -rf build *.egg-info mdarts_kernels/_C*.so
