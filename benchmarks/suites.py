"""The benchmark suites: each turns the command-line options into a list of configurations."""
from __future__ import annotations

from itertools import product

from .workloads import (ARITHMETIC, COMPILED_IMPLEMENTATIONS, CONDENSENET_IMPLEMENTATIONS, CONVOLUTIONS, FLOORS,
                        IMPLEMENTATIONS, MEMORY_FORMATS, split_compiled)

# Sizes per set. "full" uses issue 2's sizes: one dense block with L=24, C0=32, k=12,
# bn_size=4 at N=32, 32x32, DenseNet-BC-100 (k=12) at N=64, 32x32, and issue 14's densenet121
# layout at 224x224, N=8, every suite, format and torch.compile row. "quick" is the default set and
# must stay under 3 minutes on 2 quiet CPU cores with 10 timed steps per row: it keeps the layers and
# maps but runs smaller batches (memory and time both scale with N, so the ratios to naive hold), the
# suites of issue 14's targets only (block, DenseNet-BC-100, CondenseNet, the depth sweep's memory)
# and one compile row, torch.compile(naive), which it only times (no float64 check, a second
# compilation, and no memory process): the warm dynamo trace alone of a compiled naive
# DenseNet-BC-100 costs some 15 s per process.
# "smoke" is tiny: seconds per configuration, for checking the benchmark machinery only.
# "training": the rows of each training suite. The depth sweep runs blocks at the 8x8 resolution
# of a CIFAR DenseNet's last block, C0 = 2k; "timed": whether its rows are timed too by default
# (--sweep-timing; else memory only); "search": whether the deepest block within the memory budget is
# searched for by measurement (else only the quadratic fit, labelled so).
EVERY_TRAINING_ROW = IMPLEMENTATIONS + COMPILED_IMPLEMENTATIONS + FLOORS
SIZES = {
    "full": {"suites": ("block", "densenet_bc100", "densenet121", "depth", "inference", "condensenet"),
             "block": {"num_layers": 24, "c0": 32, "growth": 12, "bn_size": 4, "batch": 32, "size": 32},
             "cifar": {"depth": 100, "growth": 12, "batch": 64, "size": 32},
             "imagenet": {"batch": 8, "size": 224},
             "condensenet": {"batches": (1, 32), "size": 224},
             "sweep": {"batch": 8, "size": 8, "timed": True, "search": True,
                       "depths": {12: (16, 32, 64, 128, 192, 256), 32: (16, 32, 64, 128, 192, 256)}},
             "training": {"block": EVERY_TRAINING_ROW, "densenet_bc100": EVERY_TRAINING_ROW,
                          "densenet121": EVERY_TRAINING_ROW},
             "check_compiled": True, "budget_gib": 2.0, "rounds": 2, "min_time_s": 1.0},
    "quick": {"suites": ("block", "densenet_bc100", "depth", "condensenet"),
              "block": {"num_layers": 24, "c0": 32, "growth": 12, "bn_size": 4, "batch": 4, "size": 32},
              "cifar": {"depth": 100, "growth": 12, "batch": 8, "size": 32},
              "imagenet": {"batch": 4, "size": 64},
              "condensenet": {"batches": (1,), "size": 224},
              "sweep": {"batch": 8, "size": 8, "timed": False, "search": False, "depths": {12: (16, 32, 64)}},
              "training": {"block": IMPLEMENTATIONS + ("naive+compile",) + FLOORS,
                           "densenet_bc100": ("naive", "naive+compile", *FLOORS, "dense_ops/bn_relu",
                                              "dense_ops/bottleneck"),
                           "densenet121": IMPLEMENTATIONS},
              "check_compiled": False, "budget_gib": 2.0, "rounds": 1, "min_time_s": 1.0},
    "smoke": {"suites": ("block", "densenet_bc100", "densenet121", "depth", "inference", "condensenet"),
              "block": {"num_layers": 6, "c0": 16, "growth": 8, "bn_size": 4, "batch": 4, "size": 16},
              "cifar": {"depth": 40, "growth": 12, "batch": 4, "size": 32},
              # 64x64: at 32x32 the last block runs at 1x1, where BN of the check's 2 samples (2 values per
              # channel) makes float64 rounding of a correct result exceed the check's 1e-8 (7e-8 measured)
              "imagenet": {"batch": 2, "size": 64},
              "condensenet": {"batches": (1,), "size": 64},
              "sweep": {"batch": 2, "size": 8, "timed": True, "search": True,
                        "depths": {12: (4, 8, 16), 32: (4, 8, 16)}},
              "training": {"block": IMPLEMENTATIONS + COMPILED_IMPLEMENTATIONS[:2] + FLOORS,
                           "densenet_bc100": IMPLEMENTATIONS,
                           "densenet121": IMPLEMENTATIONS},
              "check_compiled": True, "budget_gib": 1 / 64, "rounds": 1, "min_time_s": 0.0},
}
FLOOR_DESCRIPTIONS = {CONVOLUTIONS: "naive's convolutions alone: a time floor, no model to check",
                      ARITHMETIC: "naive's operations as large GEMMs: a time floor, no model to check"}
INFERENCE_IMPLEMENTATIONS = ("naive", "dense_ops/bn_relu")  # recompute levels only differ in training


def _configs(suite: str, workload: str, shapes, impls, formats, mode: str, options) -> list[dict]:
    impls = [impl for impl in impls if not options.impls or impl in options.impls]
    formats = [fmt for fmt in formats if not options.formats or fmt in options.formats]
    return [_with_check({"suite": suite, "workload": workload, "shape": shape, "impl": impl,
                         "memory_format": memory_format, "mode": mode, "device": options.device,
                         "threads": options.threads, "warmup": options.warmup, "repeats": options.repeats,
                         "rounds": options.rounds, "min_time_s": options.min_time}, options)
            for shape, memory_format, impl in product(shapes, formats, impls)]


def _with_check(config: dict, options) -> dict:
    """Every row is checked against naive in float64 and its peak memory measured, but the
    floors (no model: only timed) and compiled rows in --quick: each of those costs a
    compilation (or a load from inductor's cache: 45 s for DenseNet-BC-100 here) per process, so
    --quick only times them."""
    if config["impl"] in FLOORS:
        return dict(config, check=False, memory=False, unchecked_because=FLOOR_DESCRIPTIONS[config["impl"]])
    if split_compiled(config["impl"])[1] and not SIZES[options.size]["check_compiled"]:
        return dict(config, check=False, memory=False,
                    unchecked_because=f"--{options.size} only times compiled rows; --smoke and --full check them "
                                      "and measure their memory")
    return dict(config, check=True)


def _formats(options) -> list[str]:
    """Networks and inference: contiguous only except in the full set (the block suite covers both formats)."""
    return list(MEMORY_FORMATS) if options.size == "full" else ["contiguous"]


def block(options) -> list[dict]:
    return _configs("block", "block", [SIZES[options.size]["block"]], SIZES[options.size]["training"]["block"],
                    MEMORY_FORMATS, "train", options)


def densenet_bc100(options) -> list[dict]:
    return _configs("densenet_bc100", "densenet_cifar", [SIZES[options.size]["cifar"]],
                    SIZES[options.size]["training"]["densenet_bc100"], _formats(options), "train", options)


def densenet121(options) -> list[dict]:
    return _configs("densenet121", "densenet121", [SIZES[options.size]["imagenet"]],
                    SIZES[options.size]["training"]["densenet121"], _formats(options), "train", options)


def depth(options) -> list[dict]:
    """Dense blocks of growing depth (contiguous format): memory (and in some sets time) against L.
    The budget search (benchmarks.depth_search) starts from these."""
    configs = []
    sweep = SIZES[options.size]["sweep"]
    for growth, depths in sweep["depths"].items():
        shapes = [{"num_layers": layers, "c0": 2 * growth, "growth": growth, "bn_size": 4, "batch": sweep["batch"],
                   "size": sweep["size"]} for layers in depths]
        for config in _configs("depth", "block", shapes, IMPLEMENTATIONS, ["contiguous"], "train", options):
            # one correctness check per implementation and growth rate (the block suite checks the rest)
            if config["shape"]["num_layers"] != depths[0]:
                config.update(check=False, unchecked_because=f"checked at L={depths[0]}")
            config["timed"] = options.sweep_timing
            configs.append(config)
    return configs


def inference(options) -> list[dict]:
    return (_configs("inference", "block", [SIZES[options.size]["block"]], INFERENCE_IMPLEMENTATIONS, _formats(options),
                     "eval", options)
            + _configs("inference", "densenet_cifar", [SIZES[options.size]["cifar"]], INFERENCE_IMPLEMENTATIONS,
                       _formats(options), "eval", options))


def condensenet(options) -> list[dict]:
    """Inference of the converted CondenseNet-74 (C=G=4): the fused op against the official
    converted form, the masked training-time model and torchvision's densenet121."""
    sizes = SIZES[options.size]["condensenet"]
    shapes = [{"batch": batch, "size": sizes["size"]} for batch in sizes["batches"]]
    configs = _configs("condensenet", "condensenet74", shapes, CONDENSENET_IMPLEMENTATIONS, ["contiguous"], "eval",
                       options)
    for config in configs:
        if config["impl"] == "torchvision/densenet121":
            config.update(check=False, unchecked_because="another network: the speed reference")
    return configs


SUITES = {"block": block, "densenet_bc100": densenet_bc100, "densenet121": densenet121, "depth": depth,
          "inference": inference, "condensenet": condensenet}
