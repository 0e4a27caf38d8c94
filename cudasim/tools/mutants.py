"""Plants one bug at a time in the rewritten CUDA sources and checks that the simulated tests fail."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BARRIER_IN_TREE = "merge(threadIdx.x, threadIdx.x + stride * T::kChannelLanes);\n    __syncthreads();"
MUTANTS = {
    "no barrier inside the reduction tree": (
        ["bn_kernels.cu.cc", BARRIER_IN_TREE, BARRIER_IN_TREE.replace("\n    __syncthreads();", "")],
        "channel_moments or bn_relu_backward"),
    "no barrier before the reduction tree": (
        ["bn_kernels.cu.cc", "using T = Tile<kChannelsLast>;\n  __syncthreads();", "using T = Tile<kChannelsLast>;"],
        "channel_moments or bn_relu_backward"),
    "barrier only in the reducing threads (divergent __syncthreads)": (
        ["bn_kernels.cu.cc", BARRIER_IN_TREE,
         "{ merge(threadIdx.x, threadIdx.x + stride * T::kChannelLanes);\n    __syncthreads(); }"],
        "channel_moments or bn_relu_backward"),
    "pixel lanes offset by one thread (threadIdx.x + 1)": (
        ["bn_kernels.cu.cc", "return threadIdx.x / kChannelLanes;", "return (threadIdx.x + 1) / kChannelLanes;"],
        "bn_relu_forward or block_matches"),
    # ((threadIdx.x + 1) % kChannelLanes would only permute the lanes of a tile: still correct.)
    "channel lanes shifted by one (threadIdx.x % lanes + 1)": (
        ["bn_kernels.cu.cc", "threadIdx.x % kChannelLanes : 0;", "threadIdx.x % kChannelLanes + 1 : 0;"],
        "bn_input_grad or block_matches"),
    "tree starts at a quarter of the pixel lanes": (
        ["bn_kernels.cu.cc", "int stride = T::kPixelLanes / 2;", "int stride = T::kPixelLanes / 4;"],
        "bn_relu_backward"),
    "chunk merge skips the last chunk": (
        ["bn_kernels.cu.cc", "for (int64_t chunk = 1; chunk < chunks; ++chunk)",
         "for (int64_t chunk = 1; chunk + 1 < chunks; ++chunk)"],
        "channel_moments"),
    "gather start index misses the blockDim factor": (
        ["condensed_conv.cu.cc", "int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {\n    int64_t group, k, m;",
         "int64_t(blockIdx.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {\n    int64_t group, k, m;"],
        "test_condensed_conv and not assert"),
}

failed_to_catch = []
only = sys.argv[1:]  # substrings of mutant names: run only those
selected = {name: m for name, m in MUTANTS.items() if not only or any(o in name for o in only)}
for name, (mutation, selection) in selected.items():
    env = dict(os.environ, CUDASIM_MUTATE=json.dumps([mutation]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", selection,
                        os.path.join(HERE, "tests")], env=env, capture_output=True, text=True)
    lines = [l for l in r.stdout.splitlines() if l.startswith("E ") or "passed" in l or "failed" in l]
    caught = r.returncode == 1
    print(f"{'CAUGHT' if caught else 'MISSED'}  {name} (pytest exit {r.returncode})\n    " + "\n    ".join(lines[:3] + lines[-1:]))
    if not caught:
        failed_to_catch.append(name)
print(f"{len(selected) - len(failed_to_catch)} passed, {len(failed_to_catch)} failed")
sys.exit(1 if failed_to_catch else 0)
