# make test / make bench: create the virtual environment if missing, install torch and the
# test/bench dependencies, build and install dense-ops (editable), then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
DEPS := ninja setuptools wheel pytest hypothesis expecttest numpy matplotlib tqdm scikit-learn timm onnx onnxruntime onnxscript
export MAX_JOBS ?= 2

.PHONY: test bench install deps clean test-cuda-sim cuda-sim-mutants gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(PY)
	$(PY) -m pip install $(TORCH) $(DEPS)
	touch $@

deps: $(VENV)/.deps

install: deps
	$(PY) -m pip install --no-build-isolation -v -e .
	$(PY) -c "import dense_ops; print('dense_ops build:', dense_ops.build_info())"

test: install
	$(PY) -m pytest -q tests

bench: install
	$(PY) -m benchmarks --quick

clean:
	rm -rf build dist *.egg-info dense_ops/*.so

# make test-cuda-sim: the kernels of csrc/cuda, and the whole dense block through the CUDA strategy,
# executed on the CPU by cudasim/ (see cudasim/README.md) against the CPU kernels and torchvision.
# No GPU needed; its own build (g++ of the rewritten .cu sources) goes to CUDASIM_OUT.
CUDASIM_OUT ?= build/cudasim
CUDASIM = $(MAKE) -C cudasim PY=$(abspath $(PY)) DENSE_OPS_ROOT=$(CURDIR) CUDASIM_OUT=$(abspath $(CUDASIM_OUT))
test-cuda-sim: deps
	$(CUDASIM) test-cuda-sim

# make cuda-sim-mutants: plants one bug at a time in the kernels (a removed __syncthreads, an offset
# threadIdx.x, ...) and checks that test-cuda-sim fails on each; rebuilds per mutant (minutes).
cuda-sim-mutants: deps
	$(CUDASIM) mutants

# make gpu-check OUT=<dir> [DEVICE=cpu]: on a GPU machine (nvcc and a preinstalled CUDA torch, no
# network; its python3 by default) builds for the visible GPU, runs every test on CUDA and the GPU
# benchmark; DEVICE=cpu is the dry run here, in $(VENV). See benchmarks/gpu_check.sh.
DEVICE ?= cuda
GPU_PY ?= $(if $(filter cpu,$(DEVICE)),$(abspath $(PY)),python3)
gpu-check: $(if $(filter cpu,$(DEVICE)),deps)
	@test -n "$(OUT)" || { echo "make gpu-check: set OUT=<dir>"; exit 2; }
	benchmarks/gpu_check.sh $(OUT) $(DEVICE) $(GPU_PY)

# make sanitize: builds a copy of the extension with AddressSanitizer + UBSan (in build/sanitize, so the
# normal build is untouched) and runs the CPU tests of the C++ kernels against it. Not part of `make test`.
# The sanitizer runtimes are preloaded (ASan must be loaded before everything else); leak detection is
# off because the python interpreter leaks by design at exit.
SANITIZE_DIR := build/sanitize
SANITIZE_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -g
SANITIZE_TESTS ?= tests/test_dense_block.py tests/test_ops.py tests/test_reliability.py tests/test_properties.py
SANITIZE_RUNTIME = $$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)

.PHONY: sanitize
sanitize: deps
	rm -rf $(SANITIZE_DIR) && mkdir -p $(SANITIZE_DIR)
	cp -r setup.py pyproject.toml csrc dense_ops tests $(SANITIZE_DIR)/
	rm -f $(SANITIZE_DIR)/dense_ops/*.so
	cd $(SANITIZE_DIR) && CFLAGS="$(SANITIZE_FLAGS)" LDFLAGS="$(SANITIZE_FLAGS)" \
		$(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(SANITIZE_DIR) && LD_PRELOAD="$(SANITIZE_RUNTIME)" \
		ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0:abort_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(abspath $(PY)) -m pytest -q -x -p no:cacheprovider $(SANITIZE_TESTS)
