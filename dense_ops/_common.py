"""Rules shared by the modules: argument checks, whether autograd records a call, whether hooks run."""
from __future__ import annotations

import numbers

import torch
from torch import nn


def check_positive(name: str, value) -> None:
    """`value` must be a positive integer (a Python or NumPy integer, not a bool)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on `tensors`: grad mode is on and one of them requires grad.
    The fused inference-only paths run whenever it does not."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def needs_grad_through(x: torch.Tensor, *modules: nn.Module) -> bool:
    """needs_grad(x, every parameter of `modules`); with grad mode off it does not walk the modules
    (a CondenseNet asks this once per layer and block in every forward)."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for m in modules
                                                              for p in m.parameters()))


def has_hooks(*modules: nn.Module) -> bool:
    """Whether calling the modules one by one would run hooks (global or their own, forward or
    backward), which a fused op would skip."""
    from torch.nn.modules import module as torch_module
    global_hooks = (torch_module._global_forward_hooks, torch_module._global_forward_pre_hooks,
                    torch_module._global_backward_hooks, torch_module._global_backward_pre_hooks)
    return any(global_hooks) or any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                                    or m._backward_pre_hooks for m in modules)


class DerivedTensorCache:
    """A value computed from some tensors (a folded BN, a dense copy of a weight), kept until one of
    them changes: its storage (replaced, moved, cast) or, in place, its version counter. Inference
    tensors have no version counter, and compiled graphs compute the value once themselves: those
    compute it on every call."""

    def __init__(self):
        self._key, self._value = None, None

    def get(self, tensors, compute, *key_extra):
        if torch.compiler.is_compiling() or any(t.is_inference() for t in tensors):
            return compute()
        key = tuple((t.data_ptr(), t._version, t.dtype) for t in tensors) + key_extra
        if self._key != key:
            with torch.no_grad():
                self._value = compute()
            self._key = key
        return self._value
