"""Builds the cudasim test extension: the CUDA sources of the project rewritten by tools/cu2sim.py,
compiled with g++ against shim/ (cudasim runtime + ATen/c10 CUDA header stand-ins), next to the
project's CPU kernels. Import: from build import load; ext = load()."""
import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# The project checkout whose csrc/ is simulated, and where generated sources and the build go.
PROJECT = os.environ.get("DENSE_OPS_ROOT") or sys.exit("set DENSE_OPS_ROOT to the project checkout")
OUT = os.environ.get("CUDASIM_OUT", os.path.join(os.path.expanduser("~"), ".cache", "cudasim"))


# The device-generic host code, compiled as it is: it drives either set of kernels.
GENERIC_SOURCES = ("dense_block.cpp", "block_checks.cpp", "stat_sync.cpp", "bottleneck_conv.cpp", "condensed_conv.cpp",
                   "transition.cpp")


def generate():
    gen = os.path.join(OUT, "gen")
    os.makedirs(os.path.join(gen, "cuda"), exist_ok=True)
    rewrite = [sys.executable, os.path.join(HERE, "tools", "cu2sim.py")]
    for src in glob.glob(os.path.join(PROJECT, "csrc", "cuda", "*.cu")):
        subprocess.check_call(rewrite + [src, os.path.join(gen, os.path.basename(src) + ".cc")])
    # CUDASIM_MUTATE='[["bn_kernels.cu.cc", "old text", "new text"], ...]': a deliberate bug, to
    # check that the simulation catches it (tools/mutants.py)
    for name, old, new in json.loads(os.environ.get("CUDASIM_MUTATE", "[]")):
        path = os.path.join(gen, name)
        text = open(path).read()
        assert old in text, f"mutation target not found in {name}: {old!r}"
        open(path, "w").write(text.replace(old, new, 1))
    for src in glob.glob(os.path.join(PROJECT, "csrc", "cuda", "*.h")):
        subprocess.check_call(rewrite + [src, os.path.join(gen, "cuda", os.path.basename(src))])
    for src in glob.glob(os.path.join(HERE, "harness", "sim_*.cpp")):  # harness TUs may launch too
        subprocess.check_call(rewrite + [src, os.path.join(gen, os.path.basename(src))])
    return gen


def load(verbose=False):
    from torch.utils.cpp_extension import load as torch_load
    gen = generate()
    harness = os.path.join(HERE, "harness")
    sources = sorted(glob.glob(os.path.join(gen, "sim_*.cpp"))) + [
        os.path.join(harness, f) for f in ("cpu_bn.cpp", "cpu_condense.cpp", "bindings.cpp")] + [
        os.path.join(PROJECT, "csrc", f) for f in GENERIC_SOURCES]
    includes = [os.path.join(HERE, "shim"), gen, harness, os.path.join(PROJECT, "csrc")]
    flags = ["-O1", "-g", "-Wno-sign-compare", "-DDENSE_OPS_TORCH_VERSION=\"sim\""] + \
        os.environ.get("CUDASIM_CXXFLAGS", "").split()
    return torch_load(name="cudasim_dense_ops", sources=sources, extra_include_paths=includes,
                      extra_cflags=flags, build_directory=build_dir(), verbose=verbose)


def build_dir():
    path = os.path.join(OUT, "build")
    os.makedirs(path, exist_ok=True)
    return path


if __name__ == "__main__":
    ext = load(verbose=True)
    print("built", ext.__file__)
