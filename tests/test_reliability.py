"""Reliability: re-entrancy (shared weights, outputs alive at once, threads), NaN/Inf and edge shapes
like the naive block, flat memory over many steps, saved buffers released with the graph, gradcheck
of CondenseNet layers in training mode, and CondenseNet bad inputs not covered in test_condense.py."""
import copy
import gc
import os
import threading

import pytest
import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

import dense_ops
from dense_ops import CondensedConv, CondensedLinear, LearnedGroupConv, reference
from helpers import assert_close_dicts, block_pair, randomize_batch_norms, run_step

F64 = dict(atol=1e-9, rtol=0.0)
F32 = dict(atol=1e-4, rtol=1e-4)


def grads_and_buffers(module):
    return ({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in module.named_buffers()})


def assert_same_state(ours, naive, tol=F64):
    (our_grads, our_buffers), (naive_grads, naive_buffers) = grads_and_buffers(ours), grads_and_buffers(naive)
    assert_close_dicts(our_grads, naive_grads, **tol)
    assert_close_dicts(our_buffers, naive_buffers, **tol)


# ------------------------------------------------------------------------------ re-entrancy

@pytest.mark.parametrize("bn_size", [2, None], ids=["bottleneck", "basic"])
@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
def test_one_block_applied_to_two_inputs_in_one_graph(bn_size, recompute):
    """Shared weights: both calls' gradients add up, the running statistics are updated twice."""
    naive, ours = block_pair(num_layers=3, in_channels=4, bn_size=bn_size, growth=3, recompute=recompute)
    x1 = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    x2 = torch.randn(3, 4, 3, 6, dtype=torch.float64)  # another batch and spatial size: other buffer sizes
    g1, g2 = torch.randn(2, 13, 5, 5, dtype=torch.float64), torch.randn(3, 13, 3, 6, dtype=torch.float64)
    input_grads = []
    for block in (naive, ours):
        a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        ((block(a) * g1).sum() + (block(b) * g2).sum()).backward()
        input_grads.append((a.grad, b.grad))
    for expected, actual in zip(*input_grads):
        torch.testing.assert_close(actual, expected, **F64)
    assert_same_state(ours, naive)


class BlockTwice(nn.Module):
    """y = block(transition(block(x))): the second call's input depends on the first call's output."""

    def __init__(self, block, transition):
        super().__init__()
        self.block, self.transition = block, transition

    def forward(self, x):
        return self.block(self.transition(self.block(x)))


def test_block_output_fed_back_into_the_same_block():
    naive, ours = block_pair(num_layers=3, in_channels=6, growth=4)
    transition = randomize_batch_norms(reference.Transition(18, 6)).double()
    naive, ours = BlockTwice(naive, transition), BlockTwice(ours, copy.deepcopy(transition))
    x = torch.randn(3, 6, 8, 8, dtype=torch.float64)
    grad = torch.randn(3, 18, 4, 4, dtype=torch.float64)
    expected, actual = run_step(naive, x, grad), run_step(ours, x, grad)
    torch.testing.assert_close(actual[0], expected[0], **F64)
    torch.testing.assert_close(actual[1], expected[1], **F64)
    assert_close_dicts(actual[2], expected[2], **F64)
    assert_close_dicts(actual[3], expected[3], **F64)


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
def test_outputs_alive_at_once_do_not_share_buffers(recompute):
    """A second call must not write into the first call's output or saved tensors; the graphs are
    then differentiated in reverse order."""
    naive, ours = block_pair(num_layers=3, recompute=recompute)
    xs = [torch.randn(2, 6, 4, 4, dtype=torch.float64) for _ in range(2)]
    grads = [torch.randn(2, 18, 4, 4, dtype=torch.float64) for _ in range(2)]
    input_grads = []
    for block in (naive, ours):
        inputs = [x.clone().requires_grad_() for x in xs]
        first = block(inputs[0])
        snapshot = first.detach().clone()
        second = block(inputs[1])
        assert first.data_ptr() != second.data_ptr()
        torch.testing.assert_close(first, snapshot, atol=0, rtol=0)
        second.backward(grads[1])
        first.backward(grads[0])
        input_grads.append([x.grad for x in inputs])
    for expected, actual in zip(*input_grads):
        torch.testing.assert_close(actual, expected, **F64)
    assert_same_state(ours, naive)

    ours.eval()
    with torch.no_grad():  # inference: nothing saved, but outputs must still be separate
        first = ours(xs[0])
        snapshot = first.clone()
        ours(xs[1])
    torch.testing.assert_close(first, snapshot, atol=0, rtol=0)


# ---------------------------------------------------------------------------------- threads

def small_densenet(seed, bn_size, recompute):
    torch.manual_seed(seed)
    block = dense_ops.DenseBlock(3, 6, bn_size, 4, recompute=recompute)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), block, dense_ops.Transition(18, 8),
                          nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    return randomize_batch_norms(model).double()


def train(model, seed, steps=4):
    """A few SGD steps on fixed random data; returns the losses and the final state."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=generator)
        target = torch.randint(0, 5, (4,), generator=generator)
        loss = nn.functional.cross_entropy(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), model.state_dict()


def run_in_threads(jobs):
    """Runs every job at once (released together by a barrier); re-raises the first failure."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def worker(i, job):
        try:
            barrier.wait()
            results[i] = job()
        except BaseException as error:  # noqa: BLE001  (reported in the main thread)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def test_two_threads_train_two_models_like_sequential_runs():
    configs = [(1, 2, "bn_relu"), (2, None, "bn_relu"), (3, 4, "bottleneck")]
    models = [small_densenet(*config) for config in configs]
    expected = [train(copy.deepcopy(m), seed) for m, (seed, *_) in zip(models, configs)]
    actual = run_in_threads([lambda m=m, s=seed: train(m, s) for m, (seed, *_) in zip(models, configs)])
    for (expected_losses, expected_state), (losses, state) in zip(expected, actual):
        torch.testing.assert_close(losses, expected_losses, atol=1e-12, rtol=0)
        assert_close_dicts(state, expected_state, atol=1e-12)


def test_threads_share_one_block_for_inference():
    _, block = block_pair(num_layers=4, in_channels=6, growth=4)
    block.eval()
    inputs = [torch.randn(3, 6, 7, 7, dtype=torch.float64) for _ in range(4)]

    def infer(x):
        with torch.no_grad():
            return [block(x) for _ in range(5)]

    expected = [infer(x)[0] for x in inputs]
    for outputs, want in zip(run_in_threads([lambda x=x: infer(x) for x in inputs]), expected):
        for out in outputs:
            torch.testing.assert_close(out, want, atol=0, rtol=0)


# ------------------------------------------------------------------------- values and shapes

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_non_finite_input_propagates_like_naive(value, training):
    naive, ours = block_pair(num_layers=3)
    naive.train(training), ours.train(training)
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    x[1, 2, 1, 3] = value
    grad = torch.randn(3, 18, 5, 5, dtype=torch.float64)
    expected, actual = run_step(naive, x, grad), run_step(ours, x, grad)
    for name, a, e in (("output", actual[0], expected[0]), ("input grad", actual[1], expected[1])):
        torch.testing.assert_close(a, e, **F64, equal_nan=True, msg=name)
    for got, want in ((actual[2], expected[2]), (actual[3], expected[3])):
        for name in want:
            torch.testing.assert_close(got[name], want[name], **F64, equal_nan=True, msg=name)
    if not training:  # eval: only the outputs near the bad pixel are affected
        assert not torch.isfinite(actual[0]).all() and torch.isfinite(actual[0][0]).all()


def test_non_finite_output_gradient_propagates_like_naive():
    naive, ours = block_pair(num_layers=2)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    grad = torch.randn(2, 14, 4, 4, dtype=torch.float64)
    grad[0, 9, 2, 2] = float("nan")
    grad[1, 3, 0, 1] = float("inf")
    expected, actual = run_step(naive, x, grad), run_step(ours, x, grad)
    torch.testing.assert_close(actual[1], expected[1], **F64, equal_nan=True)
    for name in expected[2]:
        torch.testing.assert_close(actual[2][name], expected[2][name], **F64, equal_nan=True, msg=name)


@pytest.mark.parametrize("batch,height,width", [(2, 1, 1), (5, 1, 1), (1, 1, 2), (1, 2, 1)])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_tiny_spatial_sizes_match_naive(batch, height, width, training):
    naive, ours = block_pair(num_layers=3)
    naive.train(training), ours.train(training)
    x = torch.randn(batch, 6, height, width, dtype=torch.float64)
    grad = torch.randn(batch, 18, height, width, dtype=torch.float64)
    expected, actual = run_step(naive, x, grad), run_step(ours, x, grad)
    for a, e in zip(actual[:2], expected[:2]):
        torch.testing.assert_close(a, e, **F64)
    assert_close_dicts(actual[2], expected[2], **F64)
    assert_close_dicts(actual[3], expected[3], **F64)


@pytest.mark.parametrize("bn_size", [2, None], ids=["bottleneck", "basic"])
@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_backward_matches_naive(bn_size, recompute, training):
    naive, ours = block_pair(bn_size=bn_size, recompute=recompute)
    naive.train(training), ours.train(training)
    x = torch.randn(0, 6, 4, 4, dtype=torch.float64)
    grad = torch.randn(0, 18, 4, 4, dtype=torch.float64)
    expected, actual = run_step(naive, x, grad), run_step(ours, x, grad)
    assert actual[0].shape == (0, 18, 4, 4) and actual[1].shape == (0, 6, 4, 4)
    assert_close_dicts(actual[2], expected[2], atol=0)  # zero gradients, exactly
    assert_close_dicts(actual[3], expected[3], atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_many_input_channels(training):
    naive, ours = block_pair(num_layers=2, in_channels=3000, bn_size=4, growth=8, dtype=torch.float32)
    naive.train(training), ours.train(training)
    x = torch.randn(2, 3000, 3, 3)
    grad = torch.randn(2, 3016, 3, 3)
    expected, actual = run_step(naive, x, grad), run_step(ours, x, grad)
    for a, e in zip(actual[:2], expected[:2]):
        torch.testing.assert_close(a, e, **F32)
    assert_close_dicts(actual[2], expected[2], **F32)
    assert_close_dicts(actual[3], expected[3], **F32)


@pytest.mark.parametrize("bad_input,error", [
    (torch.randn(2, 5, 4, 4, dtype=torch.float64), ValueError),  # wrong channel count
    (torch.randn(1, 6, 1, 1, dtype=torch.float64), ValueError),  # one value per channel
    (torch.randn(2, 6, 4, 4), RuntimeError),  # float32 input, float64 weights (checked in C++)
])
def test_rejected_training_input_leaves_the_block_untouched(bad_input, error):
    """No buffer changes on a rejected call (nn.BatchNorm2d itself counts a step in its first BN
    before raising); a following valid step matches a naive block that never saw the bad input."""
    naive, ours = block_pair(num_layers=3)
    for block in (naive, ours):
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # the running averages depend on num_batches_tracked
    before = {n: b.clone() for n, b in ours.named_buffers()}
    with pytest.raises(error):
        ours(bad_input)
    assert_close_dicts(dict(ours.named_buffers()), before, atol=0)
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64)
    grad = torch.randn(2, 18, 4, 4, dtype=torch.float64)
    expected, actual = run_step(naive, x, grad), run_step(ours, x, grad)
    torch.testing.assert_close(actual[0], expected[0], **F64)
    assert_close_dicts(actual[3], expected[3], **F64)


# ------------------------------------------------------------------------------------ memory

def resident_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="AddressSanitizer's quarantine keeps freed memory resident (make sanitize)")
@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
def test_resident_memory_stays_flat_over_training_steps(recompute):
    # One step's feature buffer is 16 * 64 * 16 * 16 * 4 bytes = 1 MiB: leaking it every step shows
    # as 10+ MiB over the measured steps (freed heap memory absorbs a part); about 1 MiB of noise.
    _, block = block_pair(num_layers=4, in_channels=16, bn_size=4, growth=12, dtype=torch.float32,
                          recompute=recompute)
    optimizer = torch.optim.SGD(block.parameters(), lr=1e-3)
    x = torch.randn(16, 16, 16, 16)

    def steps(count):
        for _ in range(count):
            optimizer.zero_grad()
            block(x).square().mean().backward()
            optimizer.step()
        gc.collect()

    steps(5)  # warm-up: allocator pools, thread pools, optimizer state
    before = resident_bytes()
    steps(20)
    growth = resident_bytes() - before
    assert growth < 4 * 2**20, f"resident memory grew by {growth / 2**20:.1f} MiB over 20 steps"


@pytest.mark.parametrize("bn_size,recompute,drop_rate", [(2, "bn_relu", 0.2), (2, "bottleneck", 0.0),
                                                         (None, "bn_relu", 0.2)])
def test_saved_buffers_released_when_graph_is_freed(bn_size, recompute, drop_rate):
    """Every tensor the block saves for backward (shared feature buffer, statistics, bottleneck
    outputs, dropout mask), except the module's own parameters, is freed with the graph."""
    _, block = block_pair(num_layers=3, bn_size=bn_size, recompute=recompute, drop_rate=drop_rate)
    own = {t.untyped_storage().data_ptr() for t in list(block.parameters()) + list(block.buffers())}
    x = torch.randn(2, 6, 4, 4, dtype=torch.float64, requires_grad=True)

    def track(tensor):
        if tensor.untyped_storage().data_ptr() not in own:
            saved.append(StorageWeakRef(tensor.untyped_storage()))
        return tensor.detach()  # returning a saved output itself would make a reference cycle with its grad_fn

    for release in ("backward", "del"):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(track, lambda tensor: tensor):
            out = block(x)
        features = StorageWeakRef(out.untyped_storage())
        assert saved and not any(ref.expired() for ref in saved)
        if release == "backward":
            out.sum().backward()
        del out
        gc.collect()
        assert features.expired()
        assert all(ref.expired() for ref in saved), f"{sum(not r.expired() for r in saved)} saved buffers alive"


# -------------------------------------------------------------------- CondenseNet gradcheck

@pytest.mark.slow
def test_learned_group_conv_gradcheck_in_training_with_dropout():
    layer = randomize_batch_norms(LearnedGroupConv(8, 4, 2, 2, dropout_rate=0.3)).double().train()
    dense_ops.update_condensation(layer, 0.6)  # stage 1: half of each group's inputs dropped
    x = torch.randn(3, 8, 3, 3, dtype=torch.float64, requires_grad=True)

    def forward(inp, conv_weight, norm_weight, norm_bias):
        torch.manual_seed(3)  # the same dropout mask at every evaluation
        return layer(inp)

    params = (layer.conv.weight, layer.norm.weight, layer.norm.bias)
    assert torch.autograd.gradcheck(forward, (x, *params), eps=1e-6, atol=1e-6)


def test_condensed_conv_gradcheck_in_training():
    """Training mode runs the reference path with batch statistics; it must be differentiable."""
    torch.manual_seed(0)
    layer = randomize_batch_norms(CondensedConv(6, 4, 2, 2)).double().train()
    with torch.no_grad():
        layer.index.copy_(torch.tensor([5, 0, 0, 3]))  # channel 0 read by both groups
    x = torch.randn(3, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    params = (layer.weight, layer.norm.weight, layer.norm.bias)
    assert torch.autograd.gradcheck(lambda inp, *p: layer(inp), (x, *params), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------- CondenseNet bad inputs

def condensed_conv_args(dtype=torch.float64):
    layer = randomize_batch_norms(CondensedConv(12, 8, 4, 2)).to(dtype).eval()
    scale, shift = layer.folded_norm()
    x = torch.randn(2, 12, 3, 3, dtype=dtype)
    return layer, [x, layer.index, scale.detach(), shift.detach(), layer.weight.detach(), layer.groups]


def test_condensed_conv_module_rejects_mixed_dtypes():
    layer, (x, *_) = condensed_conv_args(torch.float64)
    with torch.no_grad(), pytest.raises(RuntimeError, match="weight dtype Double differs from input dtype Float"):
        layer(x.float())


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex128, torch.bool])
def test_condensed_conv_rejects_non_floating_input(dtype):
    layer, args = condensed_conv_args()
    with torch.no_grad(), pytest.raises(RuntimeError, match="input must be floating point"):
        layer(args[0].to(dtype))


@pytest.mark.parametrize("position,bad,message", [
    (0, lambda x: x[0], "input must be 4-D"),
    (1, lambda index: index.int(), "index must be a 1-D int64 tensor"),
    (1, lambda index: index.view(4, 2), "index must be a 1-D int64 tensor"),
    (1, lambda index: torch.full_like(index, -1), r"index\[0\] = -1 is out of range"),
    (2, lambda scale: scale[:-1], "scale and shift must be floating 1-D tensors of the index's length 8"),
    (3, lambda shift: shift[:-1], "scale and shift must be floating 1-D tensors of the index's length 8"),
    (4, lambda weight: weight[:, :1], r"weight must be \[out_channels, 2\]"),
    (5, lambda groups: 0, "groups must be positive"),
    (5, lambda groups: -4, "groups must be positive"),
])
def test_condensed_conv_op_bad_arguments(position, bad, message):
    _, args = condensed_conv_args()
    args[position] = bad(args[position])
    with pytest.raises(RuntimeError, match=message):
        dense_ops.ops.condensed_conv(*args)


@pytest.mark.parametrize("build,name", [
    (lambda: CondensedConv(0, 8, 4, 2), "in_channels"),
    (lambda: CondensedConv(12, -8, 4, 2), "out_channels"),
    (lambda: CondensedConv(12, 8, 0, 2), "groups"),
    (lambda: CondensedConv(12, 8, 4, 0), "kept_per_group"),
    (lambda: CondensedConv(12, 6, 4, 2), r"out_channels \(6\) must be divisible by groups \(4\)"),
    (lambda: CondensedConv(12.0, 8, 4, 2), "in_channels"),
    (lambda: LearnedGroupConv(0, 8, 4, 2), "in_channels"),
    (lambda: LearnedGroupConv(12, 8, -4, 2), "groups"),
    (lambda: LearnedGroupConv(12, 8, 4, 0), "condense_factor"),
    (lambda: LearnedGroupConv(12, 8, 4, 2, dropout_rate=1.0), "dropout_rate"),
    (lambda: CondensedLinear(4, 2, 5), r"kept_features \(5\) must not exceed in_features \(4\)"),
    (lambda: CondensedLinear(4, 0, 2), "out_features"),
    (lambda: CondensedLinear.from_linear(nn.Linear(3, 2), 0.1), "keeps none"),
    (lambda: dense_ops.condense(nn.Sequential(LearnedGroupConv(8, 4, 2, 2))), "no nn.Linear classifier"),
    (lambda: dense_ops.update_condensation(LearnedGroupConv(8, 4, 2, 2), float("inf")), "progress"),
])
def test_condensenet_bad_constructor_arguments(build, name):
    with pytest.raises(ValueError, match=name):
        build()
