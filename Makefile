# Two commands on a fresh machine (Python 3.11 + pip): `make demo` and `make test`.
# Both create .venv and install the pinned requirements when missing.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.txt pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test test-slow test-all bench bench-short bench-gpu bench-gpu-tiny clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e . || $(BIN)/python -m pip install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python scripts/demo.py

test: install
	$(BIN)/python -m pytest

test-slow: install
	$(BIN)/python -m pytest -m slow

test-all: install
	$(BIN)/python -m pytest -m "slow or not slow"

bench: install
	$(BIN)/python bench/bench.py

bench-short: install
	$(BIN)/python bench/bench.py --short --out bench/out_short

bench-gpu: install
	$(BIN)/python bench/gpu.py

bench-gpu-tiny: install
	$(BIN)/python bench/gpu.py --tiny --out bench/out_gpu_tiny

clean-venv:
	rm -rf $(VENV)
