"""End to end on real data, offline: train a small CondenseNet and a small DenseNet-BC, condense, compare.

    python -m benchmarks.digits                       # scikit-learn's bundled 8x8 digits (no download)
    python -m benchmarks.digits --cifar-root DIR      # a local CIFAR-10 copy (cifar-10-batches-py); never downloads

CondenseNet training follows the paper: cosine learning rate per iteration, condensation driven by
dense_ops.update_condensation(model, progress) every iteration (C-1 pruning stages in the first
half), optional group lasso. Then dense_ops.condense converts the model; the script reports test
accuracy before and after conversion (with and without classifier pruning; a WARNING line when the
difference exceeds 0 or 1 point respectively), parameters, FLOPs (the paper's convention) and
inference time.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import dense_ops
from dense_ops.models import condensenet_cifar
from dense_ops.flops import count_flops_params


def digits_data(seed: int):
    """8x8 digits as 3x8x8 images in [0, 1]; a fixed 80/20 split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).div_(16.0).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(y))
    return (x[order[:split]], y[order[:split]]), (x[order[split:]], y[order[split:]])


def cifar_data(root: str):
    """CIFAR-10 from a local copy (torchvision layout), normalized; raises if it is missing."""
    import numpy as np
    from torchvision.datasets import CIFAR10

    def load(train):
        data = CIFAR10(root, train=train, download=False)
        x = torch.from_numpy(np.asarray(data.data)).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor([0.4914, 0.4824, 0.4467]).view(1, 3, 1, 1)
        std = torch.tensor([0.2471, 0.2435, 0.2616]).view(1, 3, 1, 1)
        return (x - mean) / std, torch.tensor(data.targets)

    return load(True), load(False)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random crop with 4-pixel zero padding and horizontal flip (CIFAR's standard augmentation)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy, dx = torch.randint(0, 9, (2,))
    out = padded[:, :, dy:dy + h, dx:dx + w]
    flip = torch.rand(n) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), out.flip(3), out)


def small_densenet_bc(num_classes: int, growth: int = 8, layers: int = 4) -> nn.Module:
    """DenseNet-BC with two dense blocks (dense_ops.DenseBlock), compression 0.5."""
    c = 2 * growth
    modules = OrderedDict([("conv0", nn.Conv2d(3, c, 3, padding=1, bias=False))])
    for i in range(2):
        modules[f"denseblock{i + 1}"] = dense_ops.DenseBlock(layers, c, 4, growth)
        c += layers * growth
        if i == 0:
            modules["transition1"] = dense_ops.Transition(c, c // 2)
            c //= 2
    modules.update([("norm5", nn.BatchNorm2d(c)), ("relu5", nn.ReLU(inplace=True)),
                    ("pool5", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten()),
                    ("classifier", nn.Linear(c, num_classes))])
    return nn.Sequential(modules)


def train(model: nn.Module, data, epochs: int, batch_size: int, lr: float, lasso: float, name: str,
          cifar: bool) -> None:
    (x, y), _ = data
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(y) / batch_size)
    total = epochs * steps_per_epoch
    model.train()
    with tqdm(total=total, desc=f"train {name}", unit="it") as bar:
        for step in range(total):
            if step % steps_per_epoch == 0:
                order = torch.randperm(len(y))
            batch = order[(step % steps_per_epoch) * batch_size:][:batch_size]
            progress = step / total
            dense_ops.update_condensation(model, progress)  # no-op for models without learned group convs
            for group in optimizer.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * progress))
            inputs = augment(x[batch]) if cifar else x[batch]
            loss = F.cross_entropy(model(inputs), y[batch])
            if lasso > 0:
                loss = loss + lasso * dense_ops.group_lasso_loss(model)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
            bar.update()
    dense_ops.update_condensation(model, 1.0)


@torch.inference_mode()
def accuracy(model: nn.Module, data, batch_size: int = 500) -> float:
    _, (x, y) = data
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return 100.0 * correct / len(y)


@torch.inference_mode()
def inference_ms(model: nn.Module, x: torch.Tensor, repeats: int = 7) -> float:
    """Median wall time of one eval-mode forward of x (after two warm-up runs), in milliseconds."""
    model.eval()
    for _ in range(2):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar-root", help="folder holding a local CIFAR-10 copy (never downloaded)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 40 (digits), 300 (CIFAR)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--lasso", type=float, default=1e-5, help="group-lasso weight")
    parser.add_argument("--depth", type=int, default=None, help="CondenseNet depth 6n+2 (default 14 digits, 86 CIFAR)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: these small images gain nothing from more)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cifar = args.cifar_root is not None
    data = cifar_data(args.cifar_root) if cifar else digits_data(args.seed)
    epochs = args.epochs or (300 if cifar else 40)
    image_size = tuple(data[0][0].shape[1:])
    num_classes = 10

    if cifar:
        condensenet = condensenet_cifar(depth=args.depth or 86, num_classes=num_classes)
        densenet = small_densenet_bc(num_classes, growth=12, layers=16)
    else:
        condensenet = condensenet_cifar(depth=args.depth or 14, growth_rates=(4, 8, 16), num_classes=num_classes)
        densenet = small_densenet_bc(num_classes, growth=12, layers=6)
    train(condensenet, data, epochs, args.batch_size, args.lr, args.lasso, "CondenseNet", cifar)
    train(densenet, data, epochs, args.batch_size, args.lr, 0.0, "DenseNet-BC", cifar)

    converted_exact = dense_ops.condense(condensenet, prune_classifier=False)
    converted = dense_ops.condense(condensenet)
    rows = [("DenseNet-BC", densenet), ("CondenseNet (training form, condensed masks)", condensenet),
            ("CondenseNet converted, classifier kept", converted_exact),
            ("CondenseNet converted, classifier pruned", converted)]
    x_test = data[1][0][:256]
    print(f"\n{'cifar-10' if cifar else 'digits'}: {len(data[0][1])} train / {len(data[1][1])} test images "
          f"{image_size}, {epochs} epochs; inference time: batch {len(x_test)}, median of 7, "
          f"{torch.get_num_threads()} threads")
    print(f"{'model':48s} {'test acc %':>10s} {'params':>9s} {'FLOPs':>11s} {'ms':>8s}")
    accuracies = []
    for name, model in rows:
        flops, params = count_flops_params(model, image_size)
        accuracies.append(accuracy(model, data))
        print(f"{name:48s} {accuracies[-1]:10.2f} {params:9d} {flops:11d} {inference_ms(model, x_test):8.2f}")
    report_conversion(*accuracies[1:])


def report_conversion(trained: float, exact: float, pruned: float) -> None:
    """Checks the conversion: the same accuracy without classifier pruning, within 1 percentage point
    with it. A warning, not an exit code: short runs can legitimately miss the 1-point bound."""
    exact_diff, pruned_diff = exact - trained, pruned - trained
    print(f"conversion: classifier kept {exact_diff:+.2f} points (expected 0), "
          f"classifier pruned {pruned_diff:+.2f} points (expected within 1)")
    if exact_diff != 0:
        print(f"WARNING: converting without classifier pruning changed the test accuracy by {exact_diff:+.2f} "
              "points; the conversion should be exact (up to rounding of near-ties)")
    if abs(pruned_diff) > 1.0 + 1e-9:  # slack for the rounding of the percentages
        print(f"WARNING: classifier pruning changed the test accuracy by {pruned_diff:+.2f} points, more than 1 "
              "(short runs can miss this bound)")


if __name__ == "__main__":
    main()
