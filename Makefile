# Two entry points (README): `make demo` and `make test`. Both create or reuse .venv.
# `make install-check` (run by CI after `make test`): a wheel built with build isolation,
# installed into a fresh venv, used from outside the checkout (tests/install_check.sh).
# GPU users who already have a CUDA torch: `make install TORCH_SPEC=` keeps it
# (an empty TORCH_SPEC installs no torch; the CPU wheel pin is only the default).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.7.1
# Extras of the editable install; `make test` adds eval (lm-evaluation-harness, for the
# `stackfast eval --tasks` test) and float8 (torchao, for tests/test_float8.py), which
# `make demo` does not need.
EXTRAS ?= test,hf,bench
BIN := $(VENV)/bin

.PHONY: install demo test install-check bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) $(TRITON_SPEC) numpy pybind11 ninja
	# --no-build-isolation: the extension builds against the torch installed above
	# (an isolated `pip install .` works too, without it: see README).
	$(BIN)/python -m pip install --quiet --no-build-isolation -e ".[$(EXTRAS)]"

demo: install
	$(BIN)/stackfast demo

test: EXTRAS = test,hf,bench,eval,float8
test: install
	# The C++ replication kernel's own test (CTest), built with CMake against the same torch.
	cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$$($(BIN)/python -c 'import torch; print(torch.utils.cmake_prefix_path)')" > build-cmake.log 2>&1
	cmake --build build/cmake -j 2 >> build-cmake.log 2>&1
	ctest --test-dir build/cmake --output-on-failure
	# Two workers, one test file each at a time (module fixtures stay shared), one thread
	# each: on 2 cores two processes of 2 OpenMP threads would slow each other many times over.
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile tests

install-check:
	PYTHON=$(PYTHON) TORCH_SPEC="$(TORCH_SPEC)" TRITON_SPEC="$(TRITON_SPEC)" bash tests/install_check.sh

bench: install
	$(BIN)/stackfast bench

clean:
	rm -rf build build-cmake.log *.egg-info stackfast/*.so
