"""The benchmark suites: each turns the command-line options into a list of configurations."""
from __future__ import annotations

from itertools import product

from .workloads import IMPLEMENTATIONS, MEMORY_FORMATS

# issue 2's single dense block: L=24, C0=32, k=12, bn_size=4, N=32, 32x32
BLOCK_SHAPE = {"num_layers": 24, "c0": 32, "growth": 12, "bn_size": 4, "batch": 32, "size": 32}
CIFAR_SHAPE = {"depth": 100, "growth": 12, "batch": 64, "size": 32}
# depth sweep: a block at the 8x8 resolution of a CIFAR DenseNet's last block, with a small
# batch so that the naive block at L=128, k=32 stays near 1.2 GiB
SWEEP_BATCH, SWEEP_SIZE = 8, 8
SWEEP_DEPTHS = {"quick": (16, 32, 64, 128), "full": (16, 32, 64, 128, 192, 256)}
SWEEP_GROWTH_RATES = (12, 32)
INFERENCE_IMPLEMENTATIONS = ("naive", "dense_ops/bn_relu")  # recompute levels only differ in training


def _configs(suite: str, workload: str, shapes, impls, formats, mode: str, options) -> list[dict]:
    return [{"suite": suite, "workload": workload, "shape": shape, "impl": impl, "memory_format": memory_format,
             "mode": mode, "device": options.device, "threads": options.threads, "warmup": options.warmup,
             "repeats": options.repeats, "check": True}
            for shape, memory_format, impl in product(shapes, formats, impls)]


def block(options) -> list[dict]:
    return _configs("block", "block", [BLOCK_SHAPE], IMPLEMENTATIONS, MEMORY_FORMATS, "train", options)


def densenet_bc100(options) -> list[dict]:
    return _configs("densenet_bc100", "densenet_cifar", [CIFAR_SHAPE], IMPLEMENTATIONS, MEMORY_FORMATS, "train",
                    options)


def densenet121(options) -> list[dict]:
    shape = {"batch": 8, "size": 64} if options.quick else {"batch": 16, "size": 224}
    formats = ["contiguous"] if options.quick else list(MEMORY_FORMATS)
    return _configs("densenet121", "densenet121", [shape], IMPLEMENTATIONS, formats, "train", options)


def depth(options) -> list[dict]:
    """Dense blocks of growing depth (contiguous format): memory and time against L."""
    configs = []
    for growth in SWEEP_GROWTH_RATES:
        depths = SWEEP_DEPTHS["quick" if options.quick else "full"]
        shapes = [{"num_layers": layers, "c0": 2 * growth, "growth": growth, "bn_size": 4, "batch": SWEEP_BATCH,
                   "size": SWEEP_SIZE} for layers in depths]
        for config in _configs("depth", "block", shapes, IMPLEMENTATIONS, ["contiguous"], "train", options):
            # one correctness check per implementation and growth rate (the block suite checks the rest)
            config["check"] = config["shape"]["num_layers"] == depths[0]
            config["repeats"] = options.sweep_repeats
            configs.append(config)
    return configs


def inference(options) -> list[dict]:
    return (_configs("inference", "block", [BLOCK_SHAPE], INFERENCE_IMPLEMENTATIONS, MEMORY_FORMATS, "eval", options)
            + _configs("inference", "densenet_cifar", [CIFAR_SHAPE], INFERENCE_IMPLEMENTATIONS, MEMORY_FORMATS,
                       "eval", options))


SUITES = {"block": block, "densenet_bc100": densenet_bc100, "densenet121": densenet121, "depth": depth,
          "inference": inference}
