"""Loading checkpoints of the official CondenseNet code (github.com/ShichenLiu/CondenseNet).

Its module names are ours; what differs is inside the layers it condenses:

- training form (models/condensenet.py, densenet_LGC.py): a LearnedGroupConv keeps its mask in
  ``_mask``, its stage in ``_stage`` (float, shape [1]) and the inputs dropped per group in
  ``_count``; ours keeps ``mask`` and ``stage`` (long, shape []), the count follows from the stage.
- converted form (what utils.convert_model writes; models/condensenet_converted.py loads it):
  a CondenseConv holds its grouped conv weight in ``conv.weight``; a CondensedConv holds it in
  ``weight``. CondenseLinear and CondensedLinear have the same keys.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from ..condense import CondensedConv, CondensedLinear, LearnedGroupConv

DATA_PARALLEL_PREFIX = "module."


def load_official_condensenet(model: nn.Module, checkpoint) -> nn.Module:
    """Loads an official CondenseNet checkpoint into `model`, strictly, and returns `model`.

    `model`: a training-form ``condensenet_cifar`` / ``condensenet74`` / ``densenet_lgc`` (for a
    checkpoint of the official training code, masks and condensation stage included), or the model
    ``dense_ops.condense`` returns (for a checkpoint of the official ``convert_model``), built with
    the checkpoint's configuration. `checkpoint`: a path, a ``{'state_dict': ...}`` dict as the
    official main.py saves it (DataParallel's ``module.`` prefixes accepted), or a bare state dict.
    BN ``num_batches_tracked`` may be absent (checkpoints of PyTorch < 0.4.1): it is then 0.

    Raises ValueError naming the first key or shape that does not match `model` (a checkpoint of
    another architecture or configuration), or the key of a mask, stage or index that is invalid.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    renames = _renames(model)
    renamed, official_names, counts = _rename(_read_state_dict(checkpoint), renames)
    _check_keys_and_shapes(model, renamed, official_names, renames)
    for prefix, layer in _prefixed_modules(model):
        if isinstance(layer, LearnedGroupConv):
            _check_learned_state(layer, renamed, prefix, official_names, counts.get(prefix + "_count"))
        elif isinstance(layer, (CondensedConv, CondensedLinear)):
            _check_index(layer, renamed, prefix)
    model.load_state_dict(renamed, strict=True)
    return model


def _read_state_dict(checkpoint) -> dict[str, torch.Tensor]:
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError("checkpoint must be a path, a {'state_dict': ...} dict or a state dict, "
                        f"got {type(checkpoint).__name__}")
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint['state_dict'] must be a state dict, got {type(state).__name__}")
    bad = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None or not state:
        raise ValueError("checkpoint holds no state dict of tensors" +
                         (f" (entry {bad!r} is a {type(state[bad]).__name__})" if bad is not None else ""))
    if all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
        state = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state.items()}
    return dict(state)


def _prefixed_modules(model: nn.Module):
    """(name + ".", module) for every module; "" for `model` itself."""
    for name, module in model.named_modules():
        yield (f"{name}." if name else ""), module


def _renames(model: nn.Module) -> dict[str, str | None]:
    """Official key -> our key, for the keys whose names differ (None: `_count`, which we do not keep)."""
    renames = {}
    for prefix, layer in _prefixed_modules(model):
        if isinstance(layer, LearnedGroupConv):
            renames[prefix + "_count"] = None
            renames[prefix + "_mask"] = prefix + "mask"
            renames[prefix + "_stage"] = prefix + "stage"
        elif isinstance(layer, CondensedConv):
            renames[prefix + "conv.weight"] = prefix + "weight"
    return renames


def _rename(official: dict, renames: dict) -> tuple[dict, dict, dict]:
    """(our state dict from the official one, our key -> official key, the learned group convs' `_count`s by
    official key). The official stage ([1], float) takes our stage's shape."""
    renamed, official_names, counts = {}, {}, {}
    for key, value in official.items():
        ours = renames.get(key, key)
        if ours is None:
            counts[key] = value
            continue
        if ours != key and key.endswith("_stage") and value.numel() == 1:
            value = value.reshape(())
        renamed[ours], official_names[ours] = value, key
    return renamed, official_names, counts


def _form_hint(model: nn.Module, official_names: dict) -> str:
    """Why keys differ when the checkpoint is of the other form than the model."""
    has_learned = any(isinstance(m, LearnedGroupConv) for m in model.modules())
    has_condensed = any(isinstance(m, CondensedConv) for m in model.modules())
    if has_condensed and any(k.endswith("._mask") for k in official_names.values()):
        return (" (a training-form checkpoint, with LearnedGroupConv masks: load it into the training-form "
                "model, then dense_ops.condense that)")
    if has_learned and any(k.endswith(".index") for k in official_names.values()):
        return " (a converted checkpoint: load it into the model dense_ops.condense returns)"
    return ""


def _check_keys_and_shapes(model: nn.Module, renamed: dict, official_names: dict, renames: dict) -> None:
    """Every key of `model` in the checkpoint with its shape, in the model's order, and no key left over
    (errors name keys as the official code does). Fills in a missing BN num_batches_tracked with 0."""
    official_name = {ours: key for key, ours in renames.items() if ours is not None}
    expected = model.state_dict()
    for key, value in expected.items():
        if key not in renamed:
            if key.endswith(".num_batches_tracked"):  # not saved before PyTorch 0.4.1
                renamed[key] = torch.zeros_like(value)
                continue
            raise ValueError(f"checkpoint does not match the model: it has no {official_name.get(key, key)!r}"
                             f"{_form_hint(model, official_names)}")
        if renamed[key].shape != value.shape:
            raise ValueError(f"checkpoint does not match the model: {official_names[key]!r} has shape "
                             f"{list(renamed[key].shape)}, the model's {key!r} has {list(value.shape)}"
                             f"{_form_hint(model, official_names)}")
    extra = [key for key in renamed if key not in expected]
    if extra:
        raise ValueError(f"checkpoint does not match the model: {official_names[extra[0]]!r} is not in the "
                         f"model{_form_hint(model, official_names)}")


def _check_learned_state(layer: LearnedGroupConv, state: dict, prefix: str, official_names: dict,
                         count: torch.Tensor | None) -> None:
    """The mask keeps the same inputs for every output of a group, as many in every group as the stage
    says; replaces the official stage and count by our stage. Our pruning relies on all three agreeing."""
    mask, stage = state[prefix + "mask"], state[prefix + "stage"]
    stage_name = official_names[prefix + "stage"]
    if stage != stage.round() or not 0 <= int(stage) < layer.condense_factor:
        raise ValueError(f"{stage_name!r} holds {stage.item()}, expected an integer stage in 0.."
                         f"{layer.condense_factor - 1} (condense_factor={layer.condense_factor})")
    stage = int(stage)
    dropped = stage * layer.drop_per_stage
    if count is None:
        raise ValueError(f"checkpoint does not match the model: it has no {prefix + '_count'!r}")
    if count.numel() != 1 or float(count) != dropped:
        raise ValueError(f"'{prefix}_count' holds {count.flatten().tolist()}, expected [{dropped}] (stage {stage} "
                         f"drops in_channels // condense_factor = {layer.drop_per_stage} inputs per stage)")
    groups = layer.group_view(mask)  # [outputs per group, G, inputs]
    mask_name = official_names[prefix + "mask"]
    if not ((mask == 0) | (mask == 1)).all() or not (groups == groups[:1]).all():
        raise ValueError(f"{mask_name!r} is not a learned group mask: it must hold 0 and 1 only, the same "
                         f"inputs for every output of a group (output o in group o % {layer.groups})")
    kept = groups[0].sum(1)
    if not (kept == layer.in_channels - dropped).all():
        raise ValueError(f"{mask_name!r} keeps {kept.long().tolist()} inputs per group, but stage {stage} keeps "
                         f"{layer.in_channels - dropped}")
    state[prefix + "stage"] = torch.tensor(stage)


def _check_index(layer: CondensedConv | CondensedLinear, state: dict, prefix: str) -> None:
    """Gather indices must address the layer's input (the fused op trusts them)."""
    size = layer.in_channels if isinstance(layer, CondensedConv) else layer.in_features
    index = state[prefix + "index"]
    if index.is_floating_point() or index.numel() and not (0 <= int(index.min()) and int(index.max()) < size):
        raise ValueError(f"{prefix}index must hold integer indices in [0, {size}), got values from "
                         f"{index.min().item()} to {index.max().item()}")
