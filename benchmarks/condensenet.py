"""CPU inference benchmark of the converted CondenseNet-74 and a per-layer micro-benchmark.

    python -m benchmarks.condensenet [--batch-sizes 1 32] [--repeats 5] [--threads N]

Model level (224x224, eval mode, inference_mode): the converted CondenseNet-74 (C=G=4) with the
fused CondensedConv op, preallocated block buffers that the transitions pool into, and the 3x3
grouped convs as dense_ops.ops.group_conv3x3, against the same weights in the reference
converted form of the official code (index_select / BN / ReLU / grouped conv / shuffle modules,
torch.cat per layer) and against torchvision's densenet121.
Layer level: CondensedConv (fused op) against the reference form and the masked dense conv of
the training-time LearnedGroupConv, on layers of CondenseNet-74.
Each timing: correctness check first, two warm-up runs, then the median of --repeats runs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchvision

import dense_ops
from dense_ops import reference
from dense_ops.models import condensenet74


def median_ms(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def randomized_condensenet74() -> torch.nn.Module:
    """CondenseNet-74 (C=G=4) with random weights and BN statistics, fully condensed."""
    torch.manual_seed(0)
    model = condensenet74(condense_factor=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    dense_ops.update_condensation(model, 1.0)
    return model.eval()


@torch.inference_mode()
def model_benchmark(batch_sizes, repeats: int, memory_format=torch.contiguous_format) -> None:
    training_form = randomized_condensenet74()
    fused = dense_ops.condense(training_form, prune_classifier=False)
    naive = reference.unfused_condensenet(fused)
    densenet121 = torchvision.models.densenet121().eval()
    for model in (fused, naive, densenet121):
        model.to(memory_format=memory_format)
    print(f"\nModel inference, 224x224, {memory_format}, {torch.get_num_threads()} threads (median ms of {repeats})")
    print(f"{'batch':>5s} {'fused CondenseNet-74':>21s} {'reference converted':>20s} {'speed-up':>9s} "
          f"{'densenet121':>12s} {'vs densenet121':>15s}")
    for batch in batch_sizes:
        x = torch.randn(batch, 3, 224, 224).to(memory_format=memory_format)
        torch.testing.assert_close(fused(x), naive(x), rtol=1e-4, atol=1e-4)
        fused_ms = median_ms(lambda: fused(x), repeats)
        naive_ms = median_ms(lambda: naive(x), repeats)
        densenet_ms = median_ms(lambda: densenet121(x), repeats)
        print(f"{batch:5d} {fused_ms:21.1f} {naive_ms:20.1f} {naive_ms / fused_ms:8.2f}x {densenet_ms:12.1f} "
              f"{densenet_ms / fused_ms:14.2f}x")


def sample_layers(model: torch.nn.Module):
    """(name, LearnedGroupConv, input resolution) of the last layer of every stage of CondenseNet-74."""
    size, layers = 112, []
    for i in range(1, 6):
        block = model.features.get_submodule(f"denseblock_{i}")
        last = list(block.values())[-1].conv_1
        layers.append((f"stage {i} last layer ({last.in_channels}->{last.out_channels}, {size}x{size})", last, size))
        size //= 2
    return layers


@torch.inference_mode()
def layer_benchmark(batch_sizes, repeats: int) -> None:
    model = randomized_condensenet74()
    print(f"\nCondensedConv per layer (median ms of {repeats})")
    print(f"{'layer':48s} {'batch':>5s} {'fused':>8s} {'reference':>10s} {'masked dense':>13s} {'ref/fused':>10s}")
    for name, learned, size in sample_layers(model):
        fused = dense_ops.CondensedConv.from_learned(learned).eval()
        naive = reference.CondensedConv(fused)
        for batch in batch_sizes:
            x = torch.randn(batch, learned.in_channels, size, size)
            torch.testing.assert_close(fused(x), learned(x), rtol=1e-4, atol=1e-4)
            times = [median_ms(lambda f=f: f(x), repeats) for f in (fused, naive, learned)]
            print(f"{name:48s} {batch:5d} {times[0]:8.2f} {times[1]:10.2f} {times[2]:13.2f} "
                  f"{times[1] / times[0]:9.2f}x")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-models", action="store_true", help="only the per-layer micro-benchmark")
    parser.add_argument("--skip-layers", action="store_true", help="only the model benchmark")
    parser.add_argument("--channels-last", action="store_true", help="run the models in channels-last layout")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_layers:
        layer_benchmark(args.batch_sizes, args.repeats)
    if not args.skip_models:
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model_benchmark(args.batch_sizes, args.repeats, fmt)


if __name__ == "__main__":
    main()
