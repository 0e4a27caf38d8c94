"""Builds dense_ops._C from csrc/.

CPU sources always; CUDA sources too when a GPU is visible or FORCE_CUDA=1 (a
compile-only build on a GPU-less machine; it needs nvcc). TORCH_CUDA_ARCH_LIST is
honoured; unset, torch builds for the visible GPUs, or we default to DEFAULT_ARCHS
when there are none.

Package metadata lives in pyproject.toml; this file computes what must be code: the extension and
the torch requirement (a range in the source package, the exact torch a binary was built against).
"""
import glob
import os
import re
import shutil
import sys


def _locate_cuda_home():
    """CUDA_HOME as torch.utils.cpp_extension expects it: a folder with bin/nvcc and include/."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for folder in candidates:
        if folder and os.path.exists(os.path.join(folder, "include", "cuda_runtime.h")):
            return folder
    return None


_cuda_home = _locate_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home  # must be set before cpp_extension is imported

import torch  # noqa: E402
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere and Hopper, plus Hopper PTX that newer GPUs JIT-compile.
DEFAULT_ARCHS = "8.0;9.0+PTX"


def _want_cuda():
    if os.environ.get("FORCE_CUDA", "0") == "1":
        if _cuda_home is None:
            raise RuntimeError("FORCE_CUDA=1 but no CUDA toolkit (nvcc, include/cuda_runtime.h) was found")
        if torch.version.cuda is None:
            raise RuntimeError("FORCE_CUDA=1 needs a CUDA build of torch; this torch is CPU-only")
        return True
    return torch.cuda.is_available() and _cuda_home is not None


def _wheel_cuda_headers():
    """Include folders of the nvidia-* wheels, where the toolkit lacks the cuBLAS/cuSPARSE
    headers that ATen's CUDA headers include (a compile-only toolkit beside a pip-installed CUDA
    torch); empty when the toolkit has them (a full or conda CUDA) or no such wheel is installed."""
    if os.path.exists(os.path.join(_cuda_home, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    return sorted(d for root in nvidia.__path__ for d in glob.glob(os.path.join(root, "*", "include")))


def _openmp_flags():
    """-fopenmp when torch's parallel backend is OpenMP. ATen's at::parallel_for is an inline
    template that is parallel only where the including file is compiled with OpenMP; torch
    says which backend it was built with in parallel_info()."""
    backend = re.search(r"ATen parallel backend: (\w+)", torch.__config__.parallel_info())
    return ["-fopenmp"] if backend and backend.group(1) == "OpenMP" else []


def _extension():
    with_cuda = _want_cuda()
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    defines = [f'-DDENSE_OPS_TORCH_VERSION="{torch.__version__.split("+")[0]}"']
    openmp = _openmp_flags()
    # -fno-trapping-math: our kernels run in the default floating-point environment, where no
    # operation traps, so GCC may compute both arms of a ReLU mask and vectorize the loop (without
    # it a dz computed in the loop keeps the mask a branch). It changes no result.
    cxx_flags = ["-O3", "-fno-trapping-math"] + openmp + defines
    if not with_cuda:
        print(f"dense_ops: building the CPU extension ({len(cpp_sources)} C++ sources; "
              f"OpenMP {'on' if openmp else 'off'})")
        return CppExtension("dense_ops._C", cpp_sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)

    # With TORCH_CUDA_ARCH_LIST unset, torch builds for the archs of the visible GPUs (plus PTX
    # of the newest); with no GPU visible it has nothing to detect, so we set a default.
    gpus = torch.cuda.device_count()
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and gpus == 0:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    visible_archs = sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(gpus)})
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or ";".join(visible_archs) + "+PTX"
    cuda_defines = ["-DDENSE_OPS_WITH_CUDA", f'-DDENSE_OPS_CUDA_ARCHS="{arch_list}"']
    wheel_headers = _wheel_cuda_headers()
    print(f"dense_ops: building the CPU+CUDA extension ({len(cpp_sources)} C++, "
          f"{len(cuda_sources)} CUDA sources; CUDA_HOME={_cuda_home}, archs {arch_list}; "
          f"OpenMP {'on' if openmp else 'off'}; nvidia wheel headers: {wheel_headers or 'not needed'})")
    # After the toolkit's own folder, so a wheel of another CUDA minor version cannot shadow it:
    # g++ has -idirafter; nvcc has no such flag, and its -isystem comes after every -I folder.
    cxx_flags += cuda_defines + [f for d in wheel_headers for f in ("-idirafter", d)]
    nvcc_flags = ["-O3", "--expt-relaxed-constexpr"] + cuda_defines + defines + \
        [f for d in wheel_headers for f in ("-isystem", d)]
    return CUDAExtension("dense_ops._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
                         extra_link_args=openmp)


def _supported_torch():
    """pyproject.toml's [tool.dense-ops] torch-min and torch-below: the one place the range is written."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11: the build requirement tomli
        import tomli as tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as file:
        config = tomllib.load(file)["tool"]["dense-ops"]
    return config["torch-min"], config["torch-below"]


def _torch_requirement():
    """What the package needs at run time, as pip will read it.

    The source package (setuptools writes its metadata under the sdist command) accepts the supported
    range. Every other command (bdist_wheel, dist_info, editable installs) describes a build compiled
    against this torch, and the import check in dense_ops/__init__.py refuses any other torch, so it
    requires exactly this torch.
    """
    oldest, first_unsupported = _supported_torch()
    if "sdist" in sys.argv[1:]:
        return f"torch>={oldest},<{first_unsupported}"
    built = torch.__version__.split("+")[0]
    supported = torch.__version__ >= oldest and torch.__version__ < first_unsupported  # TorchVersion compares as versions
    if not supported and os.environ.get("DENSE_OPS_ANY_TORCH") != "1":
        raise RuntimeError(
            f"dense-ops supports torch >={oldest},<{first_unsupported}, but this build would be compiled against "
            f"torch {torch.__version__}. Install a supported torch and build with `pip install --no-build-isolation`, "
            "or set DENSE_OPS_ANY_TORCH=1 to try this one (make compat-check TORCH=<version> runs the tests).")
    return f"torch=={built}"


setup(
    # name, version, description and the rest: pyproject.toml's [project] table.
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[_torch_requirement()],
)
