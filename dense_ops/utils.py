"""Deprecated name of dense_ops.flops (FLOP counting), kept so that existing imports work."""
import warnings

from .flops import count_flops_params

warnings.warn("dense_ops.utils is deprecated: import count_flops_params from dense_ops.flops", DeprecationWarning,
              stacklevel=2)

__all__ = ["count_flops_params"]
