# make test / make bench: create the virtual environment if missing, install torch and the
# test/bench dependencies, build and install dense-ops (editable), then run.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# TORCH (a version) is compat-check's argument; the default environment's pins are these.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
DEPS := ninja "setuptools>=77" wheel pytest hypothesis expecttest numpy matplotlib tqdm scikit-learn timm onnx onnxruntime onnxscript
export MAX_JOBS ?= 2

.PHONY: test test-fast bench install deps clean test-cuda-sim cuda-sim-mutants gpu-check

# What a copy of the source tree needs to build and run the tests (make sanitize, make compat-check).
SOURCE_TREE := setup.py pyproject.toml MANIFEST.in README.md LICENSE csrc dense_ops tests benchmarks

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: $(PY)
	$(PY) -m pip install $(TORCH_PINS) $(DEPS)
	touch $@

deps: $(VENV)/.deps

install: deps
	$(PY) -m pip install --no-build-isolation -v -e .
	$(PY) -c "import dense_ops; print('dense_ops build:', dense_ops.build_info())"

# make test runs every test, the `slow` ones too (CI runs it); make test-fast leaves those out.
test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

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

# make dist-check: the packages as a user gets them. Builds the sdist, builds the wheel from it in a new
# environment and installs that wheel there: the two steps of `pip install --no-build-isolation <sdist>`,
# with the wheel kept so its metadata can be checked. tests/dist_check.py then runs isolated (python -I),
# outside the source tree: sdist contents, both packages' torch requirement, a dense block (forward and
# backward) and a condensed CondenseNet. The new environment has no packages of its own but sees
# $(VENV)'s (torch, setuptools, ninja, pip) through a .pth file naming $(VENV)'s site-packages, so torch
# (several GB) is not installed again; dense-ops goes into the new environment's own site-packages,
# ahead of $(VENV)'s on sys.path (the .pth files there, such as an editable install's, are not read).
# pip installs it with --ignore-installed (it would skip a wheel whose version it sees in $(VENV), e.g. the
# editable install of make test) and --no-deps (dist_check.py checks the wheel requires this very torch).
DIST_DIR := build/dist-check
DIST_PY := $(DIST_DIR)/venv/bin/python
SITE_PACKAGES := -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"

.PHONY: dist-check
dist-check: deps
	rm -rf $(DIST_DIR)
	$(PY) -m pip install -q build
	$(PY) -m build --sdist --no-isolation --outdir $(DIST_DIR) .
	$(PY) -m venv --without-pip $(DIST_DIR)/venv
	$(PY) $(SITE_PACKAGES) > "$$($(DIST_PY) $(SITE_PACKAGES))/base-environment.pth"
	$(DIST_PY) -m pip wheel --no-build-isolation --no-deps --wheel-dir $(DIST_DIR) $(DIST_DIR)/dense_ops-*.tar.gz
	$(DIST_PY) -m pip install --no-index --no-deps --ignore-installed $(DIST_DIR)/dense_ops-*.whl
	cd $(DIST_DIR) && venv/bin/python -I $(CURDIR)/tests/dist_check.py --source $(CURDIR) dense_ops-*.tar.gz dense_ops-*.whl

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
	cp -r $(SOURCE_TREE) $(SANITIZE_DIR)/
	rm -f $(SANITIZE_DIR)/dense_ops/*.so
	cd $(SANITIZE_DIR) && CFLAGS="$(SANITIZE_FLAGS)" LDFLAGS="$(SANITIZE_FLAGS)" \
		$(abspath $(PY)) setup.py -q build_ext --inplace
	cd $(SANITIZE_DIR) && LD_PRELOAD="$(SANITIZE_RUNTIME)" \
		ASAN_OPTIONS=detect_leaks=0:detect_odr_violation=0:abort_on_error=1 \
		UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
		$(abspath $(PY)) -m pytest -q -x -p no:cacheprovider $(SANITIZE_TESTS)

# make compat-check TORCH=2.11.0: builds the extension and runs the test suite against another torch
# release, in its own environment under build/compat-<version>/ (created once, then reused), on a copy of
# the source tree so the normal build is untouched. pip picks the newest torchvision whose requirements
# accept that torch (or TORCHVISION=<version>). This machine's pip configuration caps torch at the
# release it keeps on disk: PIP_CONFIG_FILE=/dev/null ignores that configuration for these installs only.
# DENSE_OPS_ANY_TORCH=1: setup.py refuses a torch outside the supported range, which this target tries.
COMPAT_DIR = build/compat-$(TORCH)
COMPAT_PY = $(COMPAT_DIR)/venv/bin/python
COMPAT_PYTEST_ARGS ?= -x -q -p no:cacheprovider

.PHONY: compat-check compat-deps
compat-deps:
	@test -n "$(TORCH)" || { echo "usage: make compat-check TORCH=<torch release, e.g. 2.11.0>" >&2; exit 2; }
	test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_DIR)/venv
	test -f $(COMPAT_DIR)/.deps || { PIP_CONFIG_FILE=/dev/null $(COMPAT_PY) -m pip install \
		"torch==$(TORCH)" "torchvision$(if $(TORCHVISION),==$(TORCHVISION))" $(DEPS) && touch $(COMPAT_DIR)/.deps; }
	$(COMPAT_PY) -c "import torch, torchvision; print('compat-check: torch', torch.__version__, \
		'torchvision', torchvision.__version__)"

compat-check: compat-deps
	rm -rf $(COMPAT_DIR)/src && mkdir -p $(COMPAT_DIR)/src
	cp -r $(SOURCE_TREE) $(COMPAT_DIR)/src/
	cd $(COMPAT_DIR)/src && DENSE_OPS_ANY_TORCH=1 $(abspath $(COMPAT_PY)) setup.py -q build_ext --inplace
	cd $(COMPAT_DIR)/src && $(abspath $(COMPAT_PY)) -m pytest $(COMPAT_PYTEST_ARGS) tests
