"""FLOP and parameter counting of models, with the CondenseNet paper's convention."""
from __future__ import annotations

import torch
from torch import nn

from .condense import CondensedConv, CondensedLinear, LearnedGroupConv


def _conv_flops(conv: nn.Conv2d, out: torch.Tensor) -> int:
    kernel = conv.kernel_size[0] * conv.kernel_size[1]
    return conv.in_channels * conv.out_channels * kernel * out.shape[2] * out.shape[3] // conv.groups


def _linear_flops(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def _flops(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> int:
    """Multiply-adds of one image through `module` (a leaf in the paper's accounting)."""
    if isinstance(module, CondensedConv):  # gather + BN + ReLU (counted) + grouped 1x1 conv
        pixels = x.shape[2] * x.shape[3]
        gathered = module.groups * module.kept_per_group
        return gathered * pixels + module.kept_per_group * module.out_channels * pixels
    if isinstance(module, LearnedGroupConv):  # BN + ReLU (counted) + the 1x1 conv at its condensed cost
        pixels = x.shape[2] * x.shape[3]
        return module.in_channels * pixels + module.in_channels * module.out_channels * pixels // module.condense_factor
    if isinstance(module, CondensedLinear):
        return _linear_flops(module.linear)
    if isinstance(module, nn.Conv2d):
        return _conv_flops(module, out)
    if isinstance(module, nn.Linear):
        return _linear_flops(module)
    if isinstance(module, (nn.ReLU, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.MaxPool2d)):
        # ReLU: one op per element; pooling: one per element of every window.
        if isinstance(module, nn.ReLU):
            return x[0].numel()
        if isinstance(module, nn.AdaptiveAvgPool2d):
            return x[0].numel()
        kernel = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        return out[0].numel() * kernel * kernel
    return 0


def _params(module: nn.Module) -> int:
    """Parameters of a counted module; a LearnedGroupConv's conv at its condensed size (1/C of it)."""
    if isinstance(module, LearnedGroupConv):
        return sum(p.numel() for p in module.norm.parameters()) + module.conv.weight.numel() // module.condense_factor
    return sum(p.numel() for p in module.parameters())


_UNITS = (CondensedConv, CondensedLinear, LearnedGroupConv)


def _counted_modules(model: nn.Module) -> list[nn.Module]:
    """Leaves of the module tree; LearnedGroupConv, CondensedConv and CondensedLinear count as leaves."""
    counted, inside_unit = [], set()
    for module in model.modules():
        if id(module) in inside_unit:
            continue
        if isinstance(module, _UNITS):
            inside_unit.update(id(m) for m in module.modules())
            counted.append(module)
        elif not any(True for _ in module.children()):
            counted.append(module)
    return counted


def count_flops_params(model: nn.Module, input_size) -> tuple[int, int]:
    """(FLOPs, parameters) of `model` for one input of shape `input_size` (C, H, W), as the
    CondenseNet paper counts them: multiply-adds of convolutions and linear layers plus one op per
    ReLU and pooled element (batch norm free); parameters of every layer the forward pass runs.

    A training-form LearnedGroupConv counts at its condensed cost, as the official code's
    ``measure_model`` counts it: 1/condense_factor of its 1x1 conv's multiply-adds and weights
    (whatever its stage), so with C = G a model counts the same before and after
    ``condense(model, prune_classifier=False)``."""
    modules = _counted_modules(model)
    totals = {"flops": 0}
    ran = set()

    def hook(module, inputs, output):
        totals["flops"] += _flops(module, inputs[0], output)
        ran.add(module)

    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    parameter = next(model.parameters(), None)
    x = torch.zeros((1, *input_size), device=parameter.device if parameter is not None else None,
                    dtype=parameter.dtype if parameter is not None else None)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    params = sum(_params(m) for m in ran)
    return int(totals["flops"]), int(params)
