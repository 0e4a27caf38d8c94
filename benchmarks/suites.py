"""The benchmark suites: each turns the command-line options into a list of configurations."""
from __future__ import annotations

from itertools import product

from .workloads import IMPLEMENTATIONS, MEMORY_FORMATS

# --full uses issue 2's sizes: a dense block with L=24, C0=32, k=12, bn_size=4 at N=32, 32x32,
# and DenseNet-BC-100 (k=12) at N=64, 32x32. --quick keeps the layers and maps but runs a
# quarter of the batch: memory and time both scale with N, so the ratios to naive hold,
# and the whole quick set stays within about 5 minutes on 2 CPU cores.
BLOCK_LAYERS = {"num_layers": 24, "c0": 32, "growth": 12, "bn_size": 4, "size": 32}
BLOCK_BATCH = {"quick": 8, "full": 32}
CIFAR_BATCH = {"quick": 16, "full": 64}
IMAGENET_INPUT = {"quick": {"batch": 8, "size": 64}, "full": {"batch": 16, "size": 128}}  # densenet121
# depth sweep: blocks at the 8x8 resolution of a CIFAR DenseNet's last block, C0 = 2k
SWEEP_BATCH, SWEEP_SIZE = 8, 8
SWEEP_DEPTHS = {"quick": {12: (16, 32, 64, 128), 32: (16, 32, 64)},
                "full": {12: (16, 32, 64, 128, 192, 256), 32: (16, 32, 64, 128, 192, 256)}}
INFERENCE_IMPLEMENTATIONS = ("naive", "dense_ops/bn_relu")  # recompute levels only differ in training


def _configs(suite: str, workload: str, shapes, impls, formats, mode: str, options) -> list[dict]:
    return [{"suite": suite, "workload": workload, "shape": shape, "impl": impl, "memory_format": memory_format,
             "mode": mode, "device": options.device, "threads": options.threads, "warmup": options.warmup,
             "repeats": options.repeats, "check": True}
            for shape, memory_format, impl in product(shapes, formats, impls)]


def _set(options) -> str:
    return "quick" if options.quick else "full"


def _block_shape(options) -> dict:
    return dict(BLOCK_LAYERS, batch=BLOCK_BATCH[_set(options)])


def _cifar_shape(options) -> dict:
    return {"depth": 100, "growth": 12, "batch": CIFAR_BATCH[_set(options)], "size": 32}


def _formats(options) -> list[str]:
    """Whole networks: contiguous only in the quick set (the block suite covers both formats)."""
    return ["contiguous"] if options.quick else list(MEMORY_FORMATS)


def block(options) -> list[dict]:
    return _configs("block", "block", [_block_shape(options)], IMPLEMENTATIONS, MEMORY_FORMATS, "train", options)


def densenet_bc100(options) -> list[dict]:
    return _configs("densenet_bc100", "densenet_cifar", [_cifar_shape(options)], IMPLEMENTATIONS, _formats(options),
                    "train", options)


def densenet121(options) -> list[dict]:
    return _configs("densenet121", "densenet121", [IMAGENET_INPUT[_set(options)]], IMPLEMENTATIONS,
                    _formats(options), "train", options)


def depth(options) -> list[dict]:
    """Dense blocks of growing depth (contiguous format): memory and time against L."""
    configs = []
    for growth, depths in SWEEP_DEPTHS[_set(options)].items():
        shapes = [{"num_layers": layers, "c0": 2 * growth, "growth": growth, "bn_size": 4, "batch": SWEEP_BATCH,
                   "size": SWEEP_SIZE} for layers in depths]
        for config in _configs("depth", "block", shapes, IMPLEMENTATIONS, ["contiguous"], "train", options):
            # one correctness check per implementation and growth rate (the block suite checks the rest)
            config["check"] = config["shape"]["num_layers"] == depths[0]
            config["repeats"] = options.sweep_repeats
            configs.append(config)
    return configs


def inference(options) -> list[dict]:
    return (_configs("inference", "block", [_block_shape(options)], INFERENCE_IMPLEMENTATIONS, MEMORY_FORMATS,
                     "eval", options)
            + _configs("inference", "densenet_cifar", [_cifar_shape(options)], INFERENCE_IMPLEMENTATIONS,
                       _formats(options), "eval", options))


SUITES = {"block": block, "densenet_bc100": densenet_bc100, "densenet121": densenet121, "depth": depth,
          "inference": inference}
