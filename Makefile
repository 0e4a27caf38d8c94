# make test / make bench: create the virtual environment if missing, install torch and the
# test/bench dependencies, build and install dense-ops (editable), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
DEPS := ninja setuptools wheel pytest hypothesis expecttest numpy matplotlib tqdm scikit-learn timm onnx onnxruntime onnxscript
export MAX_JOBS ?= 2

.PHONY: test bench install deps clean

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
