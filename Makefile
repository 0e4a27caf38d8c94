# make test / make bench: create the virtual environment if missing, install torch and the
# test/bench dependencies, build and install dense-ops (editable), then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.14.1 torchvision==0.29.1
DEPS := ninja setuptools wheel pytest hypothesis expecttest numpy matplotlib tqdm scikit-learn
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
