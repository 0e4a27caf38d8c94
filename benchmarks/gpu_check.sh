#!/usr/bin/env bash
# make gpu-check OUT=<dir> [DEVICE=cpu]: builds dense_ops in place for the visible GPU (FORCE_CUDA=1),
# runs every test there, then the GPU benchmark (benchmarks/gpu.py); logs and results go to OUT.
# DEVICE=cpu is the dry run on a machine without a GPU: a CPU build, the dense-block tests and the
# benchmark at tiny sizes, writing the same files. Usage: gpu_check.sh OUT DEVICE PYTHON
set -uo pipefail
out=$1 device=$2 py=$3
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if [ "$device" = cuda ]; then
  export FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  tests=(tests)
else
  tests=(tests/test_dense_block.py tests/test_parallel.py)
fi
echo "gpu-check: building ($device) with $($py -c 'import torch; print("torch", torch.__version__)')"
if ! "$py" setup.py build_ext --inplace >"$out/build.log" 2>&1; then
  tail -n 40 "$out/build.log"
  exit 1
fi
"$py" -c 'import dense_ops; print("dense_ops build:", dense_ops.build_info())' | tee -a "$out/build.log"
status=0
"$py" -m pytest -q -p no:cacheprovider -m "not slow" "${tests[@]}" 2>&1 | tee "$out/tests.log" || status=1
"$py" -m benchmarks.gpu --device "$device" --out "$out" 2>&1 | tee "$out/benchmark.log" || status=1
exit $status
