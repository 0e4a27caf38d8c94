"""CondenseNet (Huang et al., CVPR 2018): learned group convolutions and their condensed inference form.

Training: ``LearnedGroupConv`` is BN -> ReLU -> (dropout) -> a 1x1 conv whose weight is multiplied
by a mask; output channel ``o`` belongs to group ``o % groups``. ``update_condensation(model,
progress)`` prunes each group's input channels in C-1 stages during the first half of training
(C = condense_factor); ``group_lasso_loss(model)`` is the paper's structured-sparsity penalty.

Inference: ``condense(model)`` turns every LearnedGroupConv into a ``CondensedConv`` (one fused
op: gather the kept channels, BN + ReLU, grouped 1x1 GEMM, channel shuffle folded into the output
addresses, optionally the next BN + ReLU on the way out) and optionally prunes the classifier into
a ``CondensedLinear``.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from ._common import DerivedTensorCache, check_positive, needs_grad_through


def condensation_stage(progress: float, condense_factor: int) -> int:
    """The stage at a training progress in [0, 1]: the first i < C-1 with 2*progress < (i+1)/(C-1), else C-1."""
    for stage in range(condense_factor - 1):
        if 2 * progress < (stage + 1) / (condense_factor - 1):
            return stage
    return condense_factor - 1


class LearnedGroupConv(nn.Module):
    """BN -> ReLU -> optional dropout -> masked 1x1 conv with a learned group structure.

    Buffers: ``mask`` (same shape as ``conv.weight``; 0 = connection dropped) and ``stage`` (the
    condensation stage reached, 0..C-1). Both are updated in place, so they save, load, copy and
    are broadcast by DataParallel/DDP like any buffer. The ``stage`` buffer is the truth; the host
    keeps a copy of it so the schedule does not sync with the device every iteration, and rereads
    the buffer whenever the scheduled stage changes (see ``advance_to``).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, condense_factor: int,
                 dropout_rate: float = 0.0):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups),
                            ("condense_factor", condense_factor)):
            check_positive(name, value)
        if in_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if in_channels % condense_factor:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by condense_factor ({condense_factor})")
        if out_channels % groups:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.condense_factor = groups, condense_factor
        self.dropout_rate = float(dropout_rate)
        self.norm = nn.BatchNorm2d(in_channels)
        self.relu = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(dropout_rate) if dropout_rate > 0 else None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.register_buffer("mask", torch.ones_like(self.conv.weight))
        self.register_buffer("stage", torch.zeros((), dtype=torch.long))
        self._host_stage = 0  # int(self.stage) as last read or written here
        self._scheduled = None  # the stage last asked for by advance_to

    @property
    def drop_per_stage(self) -> int:
        return self.in_channels // self.condense_factor

    @property
    def kept_per_group(self) -> int:
        return self.in_channels - self._host_stage * self.drop_per_stage

    @property
    def fully_condensed(self) -> bool:
        return self._host_stage >= self.condense_factor - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.norm(x))
        if self.drop is not None:
            x = self.drop(x)
        return F.conv2d(x, self.conv.weight * self.mask)

    def group_view(self, t: torch.Tensor) -> torch.Tensor:
        """[O, I, 1, 1] -> [O/G, G, I]: entry [j, g, i] is output j*G + g (of group g) and input i."""
        return t.view(self.out_channels // self.groups, self.groups, self.in_channels)

    def kept_inputs(self) -> torch.Tensor:
        """[G, I] bool: which input channels each group still reads."""
        return self.group_view(self.mask)[0] != 0

    def advance_to(self, stage: int) -> None:
        """Enters `stage`, dropping in_channels // C more inputs per group for every stage entered
        (a stage at or below the one reached changes nothing: dropped inputs are never revived)."""
        if stage != self._scheduled:
            # The schedule moved (once per stage in a run, or training restarted elsewhere).
            # The buffers may have been overwritten in place since we last looked (DDP's buffer
            # broadcast, an EMA/SWA copy, copy_), so read the stage back: one sync per change.
            self._resync()
            self._scheduled = stage
        if self._host_stage >= stage:
            return
        with torch.no_grad():
            while self._host_stage < stage:
                self._drop_least_important()
                self._host_stage += 1
            self.stage.fill_(self._host_stage)

    def _resync(self) -> None:
        stage = int(self.stage)
        if not 0 <= stage < self.condense_factor:
            raise RuntimeError(f"LearnedGroupConv: the stage buffer holds {stage}, expected 0 to "
                               f"{self.condense_factor - 1} (condense_factor={self.condense_factor})")
        self._host_stage = stage

    def _drop_least_important(self) -> None:
        # Entering a stage is rare, so it can afford this sync: a mask that already keeps too few
        # inputs (stage and mask buffers that disagree) must not be pruned silently down to zero.
        fewest = int(self.kept_inputs().sum(1).min())
        if fewest - self.drop_per_stage < self.drop_per_stage:
            raise RuntimeError(
                f"LearnedGroupConv: entering stage {self._host_stage + 1} would leave a group with "
                f"{fewest - self.drop_per_stage} inputs, fewer than in_channels // condense_factor = "
                f"{self.drop_per_stage}: the mask buffer is more condensed than the stage buffer "
                f"({self._host_stage}) says; copy or load mask and stage together")
        # Importance of input i for group g: sum of |weight| over the group's outputs. Dropped
        # inputs get +inf so they are never picked again.
        importance = self.group_view((self.conv.weight * self.mask).abs()).sum(0)
        importance = importance.masked_fill(~self.kept_inputs(), math.inf)
        dropped = importance.topk(self.drop_per_stage, dim=1, largest=False).indices  # [G, delta]
        per_group = self.out_channels // self.groups
        self.group_view(self.mask).scatter_(2, dropped.unsqueeze(0).expand(per_group, -1, -1), 0.0)

    def group_lasso(self) -> torch.Tensor:
        """Sum over groups and input channels of the L2 norm of the group's (masked) weights on that input."""
        squares = self.group_view((self.conv.weight * self.mask) ** 2).sum(0)
        nonzero = squares > 0
        # where() keeps sqrt's gradient finite at dropped (all-zero) connections.
        return (torch.where(nonzero, squares, torch.ones_like(squares)).sqrt() * nonzero).sum()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._resync()  # one sync per load, not per forward

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, groups={self.groups}, "
                f"condense_factor={self.condense_factor}, stage={self._host_stage}")


def _learned_group_convs(model: nn.Module) -> list[LearnedGroupConv]:
    return [m for m in model.modules() if isinstance(m, LearnedGroupConv)]


def update_condensation(model: nn.Module, progress: float) -> None:
    """Advances every LearnedGroupConv of `model` to the condensation stage of `progress`
    (the fraction of training done, in [0, 1]); call it every iteration. Host-side bookkeeping:
    the stage buffers are read back (one device sync per layer) only when the scheduled stage
    changes, and the masks change (in place) only when a stage is entered."""
    if isinstance(progress, bool) or not isinstance(progress, (int, float)) or not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be a number in [0, 1], got {progress!r}")
    for layer in _learned_group_convs(model):
        layer.advance_to(condensation_stage(float(progress), layer.condense_factor))


def group_lasso_loss(model: nn.Module) -> torch.Tensor:
    """The group-lasso penalty of the paper summed over the learned group convs that are still
    condensing (zero once every layer is fully condensed). Scale it by your lambda."""
    terms = [layer.group_lasso() for layer in _learned_group_convs(model) if not layer.fully_condensed]
    if not terms:
        parameter = next(model.parameters(), None)
        return torch.zeros((), device=parameter.device if parameter is not None else None)
    return torch.stack(terms).sum()


def fold_batch_norm(norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """An eval-mode BN with running statistics as one affine map per channel: norm(x) = x * scale + shift."""
    return ops.fold_batch_norm(norm.weight, norm.bias, norm.running_mean, norm.running_var, norm.eps)


def cached_fold(cache: DerivedTensorCache, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """fold_batch_norm(norm), kept in `cache` until one of the BN's tensors changes."""
    tensors = [t for t in (norm.weight, norm.bias, norm.running_mean, norm.running_var) if t is not None]
    return cache.get(tensors, lambda: fold_batch_norm(norm), norm.eps)


def unfused_condensed_conv(input: torch.Tensor, index: torch.Tensor, norm: nn.BatchNorm2d, weight: torch.Tensor,
                           groups: int) -> torch.Tensor:
    """CondenseNet's inference layer step by step, as the official code runs it: index_select -> BN ->
    ReLU -> grouped 1x1 conv -> channel shuffle. Differentiable, and BN in its own mode (batch
    statistics in training)."""
    x = F.relu(norm(torch.index_select(input, 1, index)))
    return ops.channel_shuffle(F.conv2d(x, weight.view(weight.shape[0], -1, 1, 1), groups=groups), groups)


class CondensedConv(nn.Module):
    """The inference form of a LearnedGroupConv: gather input channels `index` (K per group),
    BN + ReLU, grouped 1x1 conv, channel shuffle; one fused op (dense_ops.ops.condensed_conv).

    Training mode, or inputs/parameters that need gradients, run the equivalent differentiable
    step-by-step path (unfused_condensed_conv).
    """

    def __init__(self, in_channels: int, out_channels: int, groups: int, kept_per_group: int):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups),
                            ("kept_per_group", kept_per_group)):
            check_positive(name, value)
        if out_channels % groups:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.groups, self.kept_per_group = groups, kept_per_group
        self.norm = nn.BatchNorm2d(groups * kept_per_group)
        self.weight = nn.Parameter(torch.empty(out_channels, kept_per_group, 1, 1))
        nn.init.kaiming_normal_(self.weight)
        self.register_buffer("index", torch.arange(groups * kept_per_group) % in_channels)
        self._folded = DerivedTensorCache()  # of self.norm
        self._next_folded = DerivedTensorCache()  # of forward_bn_relu's norm

    @classmethod
    def from_learned(cls, layer: LearnedGroupConv) -> "CondensedConv":
        """The exact inference equivalent of `layer` (in eval mode) at its current stage."""
        kept = layer.kept_inputs()  # [G, I]
        index = torch.stack([row.nonzero().flatten() for row in kept])  # [G, K], ascending per group
        groups, kept_per_group = index.shape
        new = cls(layer.in_channels, layer.out_channels, groups, kept_per_group).to(layer.conv.weight.device)
        with torch.no_grad():
            weight = layer.group_view(layer.conv.weight)  # [D, G, I]: output j*G + g
            gathered = torch.gather(weight, 2, index.unsqueeze(0).expand(weight.shape[0], -1, -1))  # [D, G, K]
            # Grouped-conv order: conv channel g*D + j; the shuffle maps it back to j*G + g.
            new.weight.copy_(gathered.transpose(0, 1).reshape(layer.out_channels, kept_per_group, 1, 1))
            flat = index.flatten()
            new.index.copy_(flat)
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(new.norm, name).copy_(getattr(layer.norm, name)[flat])
            new.norm.num_batches_tracked.copy_(layer.norm.num_batches_tracked)
        new.norm.eps, new.norm.momentum = layer.norm.eps, layer.norm.momentum
        return new.to(layer.conv.weight.dtype)

    def folded_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode BN as one affine map per gathered channel: (scale, shift), cached until a BN
        tensor changes (DerivedTensorCache)."""
        return cached_fold(self._folded, self.norm)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A bad index would read outside the input: the CPU op raises, but on CUDA the kernel's
        # device assert kills the process's CUDA context, so it is rejected here, on the host.
        index = state_dict.get(prefix + "index")
        if index is not None:
            problem = self._index_problem(index)
            if problem:
                error_msgs.append(f"{prefix}index: {problem}")
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _index_problem(self, index: torch.Tensor) -> str | None:
        expected = self.groups * self.kept_per_group
        if index.dim() != 1 or index.numel() != expected or index.dtype != torch.int64:
            return f"expected {expected} int64 input-channel indices, got {index.dtype} of shape {tuple(index.shape)}"
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < self.in_channels):
            return f"indices must be in [0, {self.in_channels}), got [{int(index.min())}, {int(index.max())}]"
        return None

    def _needs_unfused(self, x: torch.Tensor, *modules: nn.Module) -> bool:
        modules = (self, *modules)
        return any(m.training for m in modules) or needs_grad_through(x, *modules)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"CondensedConv: expected input [N, {self.in_channels}, H, W], got {tuple(x.shape)}")

    def forward_bn_relu(self, x: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
        """relu(norm(self(x))) for the BatchNorm2d that follows this layer: in eval mode, when no
        gradient is needed, the norm's affine and the ReLU are applied by the op as it writes its output."""
        self._check_input(x)
        if self._needs_unfused(x, norm) or norm.running_mean is None:  # no running stats: nothing to fold
            return F.relu(norm(self(x)))
        scale, shift = self.folded_norm()
        out_scale, out_shift = cached_fold(self._next_folded, norm)
        return ops.condensed_conv(x, self.index, scale, shift, self.weight, self.groups, out_scale, out_shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The fused op's output, or the step-by-step path's when gradients or training mode need it."""
        self._check_input(x)
        if self._needs_unfused(x):
            return unfused_condensed_conv(x, self.index, self.norm, self.weight, self.groups)
        scale, shift = self.folded_norm()
        return ops.condensed_conv(x, self.index, scale, shift, self.weight, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, groups={self.groups}, "
                f"kept_per_group={self.kept_per_group}")


class CondensedLinear(nn.Module):
    """A classifier that reads only the input features `index`: linear(x[:, index])."""

    def __init__(self, in_features: int, out_features: int, kept_features: int, bias: bool = True):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("kept_features", kept_features)):
            check_positive(name, value)
        if kept_features > in_features:
            raise ValueError(f"kept_features ({kept_features}) must not exceed in_features ({in_features})")
        self.in_features = in_features
        self.linear = nn.Linear(kept_features, out_features, bias=bias)
        self.register_buffer("index", torch.arange(kept_features))

    @classmethod
    def from_linear(cls, linear: nn.Linear, keep_fraction: float = 0.5) -> "CondensedLinear":
        """Keeps the input features with the largest L1 column norm, as the official CondenseNet does."""
        kept = int(linear.in_features * keep_fraction)
        if kept <= 0:
            raise ValueError(f"keeping {keep_fraction} of {linear.in_features} features keeps none")
        new = cls(linear.in_features, linear.out_features, kept, bias=linear.bias is not None)
        new = new.to(linear.weight.device, linear.weight.dtype)
        with torch.no_grad():
            index = linear.weight.abs().sum(0).topk(kept).indices.sort().values
            new.index.copy_(index)
            new.linear.weight.copy_(linear.weight[:, index])
            if linear.bias is not None:
                new.linear.bias.copy_(linear.bias)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.index_select(x, 1, self.index))


def _replace(model: nn.Module, name: str, module: nn.Module) -> nn.Module:
    if not name:
        return module
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)
    return model


def condense(model: nn.Module, prune_classifier: bool = True) -> nn.Module:
    """A new inference model (eval mode; `model` is untouched): every LearnedGroupConv becomes a
    CondensedConv and, with `prune_classifier`, the last nn.Linear becomes a CondensedLinear keeping
    half of its inputs. Without classifier pruning the outputs equal `model`'s in eval mode.

    Its parameters do not require grad (``requires_grad_(False)``), so calling it takes the fused
    path with or without ``torch.no_grad()``; an input that requires grad, or parameters set back
    to ``requires_grad_(True)`` (fine-tuning), run the differentiable step-by-step path instead."""
    new = copy.deepcopy(model)
    for name, module in list(new.named_modules()):
        if isinstance(module, LearnedGroupConv):
            new = _replace(new, name, CondensedConv.from_learned(module))
    if prune_classifier:
        linears = [name for name, m in new.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("condense(prune_classifier=True): the model has no nn.Linear classifier")
        new = _replace(new, linears[-1], CondensedLinear.from_linear(new.get_submodule(linears[-1])))
    return new.eval().requires_grad_(False)
