"""Swap dense_ops blocks into existing models, weights and optimizer references included."""
from __future__ import annotations

import sys
import warnings

import torch
from torch import nn

from . import functional
from .nn import DenseBlock, DenseLayer, Transition
from .nn.unfused import UnfusedDenseBlock, UnfusedTransition


class _Unswappable(ValueError):
    """A block whose layers are not BN-ReLU-conv as our blocks compute them."""


def _timm_types(module_name: str, *class_names: str) -> tuple[type, ...]:
    """Classes of a timm module if timm is imported (a model holding timm blocks imported it); never imports timm."""
    module = sys.modules.get(module_name)
    return tuple(getattr(module, name) for name in class_names) if module is not None else ()


def _timm_block_types() -> tuple[type, ...]:
    return _timm_types("timm.models.densenet", "DenseBlock")


def _swappable_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (UnfusedDenseBlock, *_timm_block_types())
    try:
        from torchvision.models.densenet import _DenseBlock
    except ImportError:  # torchvision is optional
        return types
    return types + (_DenseBlock,)


def _transition_types() -> tuple[type, ...]:
    """torchvision's and our module-by-module transitions: BN-ReLU-conv1x1-avgpool2x2 as named children."""
    try:
        from torchvision.models.densenet import _Transition
    except ImportError:  # torchvision is optional
        return (UnfusedTransition,)
    return UnfusedTransition, _Transition


def _swap_transition(transition: nn.Module) -> Transition:
    """A Transition that owns the old one's modules (the same parameter objects). Modules that are not
    BN-ReLU-conv1x1-avgpool2x2 make it run module by module, so every transition can be swapped."""
    with torch.device("meta"):  # placeholders only: every module is replaced below
        new_transition = Transition(1, 1)
    for name in ("norm", "relu", "conv", "pool"):
        setattr(new_transition, name, getattr(transition, name))
    return new_transition.train(transition.training)


def _is_bottleneck(layer: nn.Module) -> bool:
    return bool(getattr(layer, "bottleneck", hasattr(layer, "norm2")))


def _check_conv(block_name: str, conv: nn.Module, kernel_size: int) -> None:
    padding = kernel_size // 2
    if not (isinstance(conv, nn.Conv2d) and conv.bias is None and conv.kernel_size == (kernel_size, kernel_size)
            and conv.stride == (1, 1) and conv.padding == (padding, padding) and conv.dilation == (1, 1)
            and conv.groups == 1 and conv.padding_mode == "zeros"):
        raise _Unswappable(f"swap_dense_blocks: {block_name} has a layer whose conv is {conv}, expected a "
                         f"{kernel_size}x{kernel_size} Conv2d with stride 1, padding {padding} and no bias")


def _check_norm(block_name: str, layer: nn.Module, norm: nn.Module) -> None:
    """The layer must compute relu(norm(x)) with a plain batch norm: torchvision's layers apply their own
    relu modules after nn.BatchNorm2d, timm's norm modules (BatchNormAct2d) apply the ReLU themselves.
    Our blocks compute batch statistics themselves: any other norm would silently become a plain
    BatchNorm2d. nn.SyncBatchNorm (timm: SyncBatchNormAct) carries over as a synchronized block."""
    if hasattr(layer, "relu1"):
        if type(norm) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
            raise _Unswappable(f"swap_dense_blocks: {block_name} has a layer whose norm is {type(norm).__name__}, "
                               "expected torch.nn.BatchNorm2d or torch.nn.SyncBatchNorm")
        return
    if type(norm) not in _timm_types("timm.layers.norm_act", "BatchNormAct2d", "SyncBatchNormAct"):
        raise _Unswappable(f"swap_dense_blocks: {block_name} has a layer whose norm is {type(norm).__name__}, "
                           "expected timm's BatchNormAct2d (or SyncBatchNormAct) with a ReLU")
    act, drop = getattr(norm, "act", None), getattr(norm, "drop", nn.Identity())
    if type(act) is not nn.ReLU or type(drop) is not nn.Identity:
        raise _Unswappable(f"swap_dense_blocks: {block_name} has a {type(norm).__name__} whose activation is "
                           f"{type(act).__name__} and drop is {type(drop).__name__}, expected ReLU and Identity")


def _sync_settings(block_name: str, layers: list[nn.Module]) -> tuple[bool, object]:
    """(synchronized, process_group) of a block whose norms are all BatchNorm2d or all SyncBatchNorm."""
    norms = [norm for layer in layers for norm in (layer.norm1, getattr(layer, "norm2", None)) if norm is not None]
    synced = [isinstance(norm, nn.SyncBatchNorm) for norm in norms]
    if not any(synced):
        return False, None
    groups = {id(norm.process_group) for norm in norms if isinstance(norm, nn.SyncBatchNorm)}
    if not all(synced) or len(groups) > 1:
        raise _Unswappable(f"swap_dense_blocks: {block_name} mixes BatchNorm2d and SyncBatchNorm or process groups")
    return True, norms[0].process_group


def _block_geometry(block_name: str, layers: list[nn.Module]) -> tuple[int, int | None, int, float]:
    """(num_input_features, bn_size, growth_rate, drop_rate) of a torchvision or naive block."""
    bottleneck = _is_bottleneck(layers[0])
    last_conv = layers[0].conv2 if bottleneck else layers[0].conv1
    growth_rate = last_conv.out_channels
    bn_size = layers[0].conv1.out_channels // growth_rate if bottleneck else None
    drop_rate = float(layers[0].drop_rate)
    for layer in layers:
        if _is_bottleneck(layer) != bottleneck or float(layer.drop_rate) != drop_rate:
            raise _Unswappable(f"swap_dense_blocks: the layers of {block_name} differ in bottleneck or drop_rate")
        _check_norm(block_name, layer, layer.norm1)
        _check_conv(block_name, layer.conv1, 1 if bottleneck else 3)
        if bottleneck:
            _check_norm(block_name, layer, layer.norm2)
            _check_conv(block_name, layer.conv2, 3)
    return layers[0].norm1.num_features, bn_size, growth_rate, drop_rate


def _swap_block(block_name: str, block: nn.Module, recompute: str) -> DenseBlock:
    """A DenseBlock that owns the old block's norm and conv modules (the same parameter objects)."""
    layers = list(block.values())
    if not layers:
        raise ValueError(f"swap_dense_blocks: {block_name} has no layers")
    num_input_features, bn_size, growth_rate, drop_rate = _block_geometry(block_name, layers)
    memory_efficient = bool(getattr(layers[0], "memory_efficient", True))
    with torch.device("meta"):  # placeholders only: every tensor is replaced below
        new_block = DenseBlock(len(layers), num_input_features, bn_size, growth_rate, drop_rate, memory_efficient,
                               recompute=recompute)
    owned = ("norm1", "conv1", "norm2", "conv2") if bn_size else ("norm1", "conv1")
    for new_layer, old_layer in zip(new_block.values(), layers):
        for name in owned:
            setattr(new_layer, name, getattr(old_layer, name))
    new_block.sync_batchnorm, new_block.process_group = _sync_settings(block_name, layers)
    return new_block.train(block.training)


def _swap_or_warn(block_name: str, block: nn.Module, recompute: str) -> nn.Module:
    """The swapped block; a timm block that is not BN-ReLU-conv stays as it is, with a warning
    (timm builds such blocks from its options: other activations or norms)."""
    try:
        return _swap_block(block_name, block, recompute)
    except _Unswappable as reason:
        if type(block) not in _timm_block_types():
            raise
        warnings.warn(f"{reason}; this timm block is left unchanged", stacklevel=3)
        return block


def swap_dense_blocks(model: nn.Module, *, recompute: str = "bn_relu") -> nn.Module:
    """Replaces, in place, every torchvision _DenseBlock, timm DenseBlock and dense_ops.reference.DenseBlock
    in `model` with a dense_ops.DenseBlock, and every torchvision _Transition and
    dense_ops.reference.Transition with a dense_ops.Transition, and returns the model.

    The new blocks take over the old blocks' BatchNorm and Conv modules, so parameter names,
    parameters and buffers are the same objects (state dicts load both ways, optimizers keep
    working), on the same device and dtype; train/eval mode and drop_rate carry over; blocks
    whose norms are nn.SyncBatchNorm (timm: SyncBatchNormAct) become synchronized blocks over the
    same process group (see convert_sync_batchnorm). timm blocks whose norms are not BatchNormAct2d
    with a ReLU (other act_layer or norm_layer options) are left as they are, with a warning naming
    the block; other blocks that cannot be swapped raise ValueError. Only these exact classes are
    swapped: subclasses may change forward and are left alone. If `model` itself is such a block,
    the new block is returned. `recompute` is passed to every new DenseBlock. Transitions take over
    the old modules the same way (timm's transitions, with their own norm-act and pool layers, stay).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"swap_dense_blocks: model must be a torch.nn.Module, got {type(model).__name__}")
    functional.check_recompute(recompute)
    swappable, transitions = _swappable_types(), _transition_types()
    if type(model) in swappable:
        return _swap_or_warn(type(model).__name__, model, recompute)
    if type(model) in transitions:
        return _swap_transition(model)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            qualified = f"{name}.{child_name}" if name else child_name
            if type(child) in swappable:
                setattr(module, child_name, _swap_or_warn(qualified, child, recompute))
            elif type(child) in transitions:
                setattr(module, child_name, _swap_transition(child))
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Makes every batch norm inside the dense_ops blocks of `model` (DenseBlock, DenseLayer)
    take its training statistics over `process_group` (default: the whole world), in place;
    returns the model. Like nn.SyncBatchNorm.convert_sync_batchnorm, but it runs on CPU (gloo)
    as well as GPU, and each channel's statistics are all-reduced once, when the channel is
    written, so a block of L layers costs O(L) all-reduces, not O(L^2).

    Batch norms outside the blocks (stem, transitions) are left alone: on GPU, convert them
    with nn.SyncBatchNorm.convert_sync_batchnorm. Call swap_dense_blocks first on models
    built from torchvision's classes.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_sync_batchnorm: model must be a torch.nn.Module, got {type(model).__name__}")
    blocks = [m for m in model.modules() if isinstance(m, (DenseBlock, DenseLayer))]
    if not blocks:
        raise ValueError("convert_sync_batchnorm: model has no dense_ops DenseBlock or DenseLayer "
                         "(call dense_ops.swap_dense_blocks first on torchvision models)")
    for block in blocks:
        block.sync_batchnorm, block.process_group = True, process_group
    return model
