"""dense-ops: memory-efficient DenseNet and CondenseNet ops for PyTorch.

Importing this package loads the compiled extension dense_ops._C, which registers the
operators in torch.ops.dense_ops; it fails loudly if the build does not match torch.
"""
import torch


def _load_extension():
    try:
        from . import _C
    except ImportError as error:
        raise ImportError(
            "dense_ops: the compiled extension dense_ops._C could not be loaded "
            f"(torch {torch.__version__}): {error}. Rebuild it against the installed torch with "
            "`pip install --no-build-isolation .`") from error
    built_with = _C.build_info()["torch_version"]
    installed = torch.__version__.split("+")[0]
    if built_with != installed:
        raise ImportError(
            f"dense_ops: the extension was built against torch {built_with} but torch {installed} is installed; "
            "rebuild it with `pip install --no-build-isolation .`")
    return _C


_C = _load_extension()

from . import ops  # noqa: E402  (registers fake kernels and autograd)
from . import functional  # noqa: E402
from .nn import DenseBlock, DenseLayer, Transition  # noqa: E402
from .condense import (CondensedConv, CondensedLinear, LearnedGroupConv, condense, group_lasso_loss,  # noqa: E402
                       update_condensation)
from . import flops  # noqa: E402
from . import models  # noqa: E402
from .convert import convert_sync_batchnorm, swap_dense_blocks  # noqa: E402
from . import reference  # noqa: E402  (last: the naive forms depend on the package, never the reverse)


def build_info() -> dict:
    """What this build was compiled with: torch_version, cuda, cuda_version, cuda_archs,
    parallel_backend (torch's, which the CPU kernels use) and parallel_kernels (whether they run in parallel)."""
    return dict(_C.build_info())


__all__ = ["CondensedConv", "CondensedLinear", "DenseBlock", "DenseLayer", "LearnedGroupConv", "Transition",
           "build_info", "condense", "convert_sync_batchnorm", "flops", "functional", "group_lasso_loss", "models",
           "ops", "reference", "swap_dense_blocks", "update_condensation"]
__version__ = "0.1.0"
