"""Synchronized batch statistics (dense_ops.convert_sync_batchnorm) over gloo with 2 ranks:
each rank's results equal the naive block run on the whole (concatenated) batch."""
import pytest
import torch
import torch.distributed as dist

import dense_ops
from helpers import block_pair, run_gloo_ranks

# Different batch sizes per rank: the group's statistics weigh every sample equally.
BATCH_SIZES = (3, 5)
CASES = [(2, "bn_relu"), (2, "bottleneck"), (None, "bn_relu")]  # (bn_size, recompute)


def _collectives(run):
    """How many all-reduces run() issues (our op calls c10d's functional all-reduce)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    names = ("_c10d_functional::all_reduce", "_c10d_functional::all_reduce_")
    return sum(e.count for e in profile.key_averages() if e.key in names)


def _check_case(rank, bn_size, recompute, num_layers=3):
    torch.manual_seed(0)  # the same weights and whole batch on every rank
    naive, ours = block_pair(num_layers=num_layers, bn_size=bn_size, recompute=recompute)
    dense_ops.convert_sync_batchnorm(ours)
    x = torch.randn(sum(BATCH_SIZES), 6, 5, 5, dtype=torch.float64) * 2 + 0.5
    grad = torch.randn(x.shape[0], 6 + num_layers * 4, 5, 5, dtype=torch.float64)
    start = sum(BATCH_SIZES[:rank])
    rows = slice(start, start + BATCH_SIZES[rank])

    x_naive = x.clone().requires_grad_()
    naive(x_naive).backward(grad)
    x_ours = x[rows].clone().requires_grad_()
    out = ours(x_ours)
    out.backward(grad[rows])

    torch.testing.assert_close(out, _naive_output(naive, x)[rows], atol=1e-9, rtol=0)
    torch.testing.assert_close(x_ours.grad, x_naive.grad[rows], atol=1e-9, rtol=0)
    for (name, p_ours), (_, p_naive) in zip(ours.named_parameters(), naive.named_parameters()):
        total = p_ours.grad.clone()
        dist.all_reduce(total)  # each rank holds its samples' share of the gradient
        torch.testing.assert_close(total, p_naive.grad, atol=1e-9, rtol=0, msg=name)
    for (name, b_ours), (_, b_naive) in zip(ours.named_buffers(), naive.named_buffers()):
        torch.testing.assert_close(b_ours, b_naive, atol=1e-9, rtol=0, msg=name)

    # One all-reduce for the sample count, then one per written slice of channels and per
    # bottleneck BN: O(L), not one per (reader, channel) pair.
    per_bottleneck = 1 if bn_size else 0
    forward = _collectives(lambda: ours(x_ours))
    assert forward == 1 + (num_layers + 1) + num_layers * per_bottleneck + 1  # + the running-stat count
    out = ours(x_ours)
    backward = _collectives(lambda: out.backward(grad[rows]))
    assert backward == 1 + num_layers + num_layers * per_bottleneck


def _naive_output(naive, x):
    """The naive block's training-mode output for x, without touching its running statistics."""
    state = {k: v.clone() for k, v in naive.state_dict().items()}
    with torch.no_grad():
        out = naive(x)
    naive.load_state_dict(state)
    return out


def _steps(rank, world_size):
    torch.set_num_threads(1)
    for bn_size, recompute in CASES:
        _check_case(rank, bn_size, recompute)


@pytest.mark.slow
def test_sync_batchnorm_two_ranks_match_naive_on_whole_batch(tmp_path):
    run_gloo_ranks(_steps, 2, str(tmp_path / "sync_init"))


def test_eval_mode_and_single_process_do_not_synchronize():
    naive, ours = block_pair()
    dense_ops.convert_sync_batchnorm(ours)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    # No process group: plain per-batch statistics, as nn.SyncBatchNorm does.
    torch.testing.assert_close(ours(x), naive(x), atol=1e-9, rtol=0)
    ours.eval(), naive.eval()
    torch.testing.assert_close(ours(x), naive(x), atol=1e-9, rtol=0)


def test_convert_sync_batchnorm_rejects_models_without_our_blocks():
    with pytest.raises(ValueError, match="swap_dense_blocks"):
        dense_ops.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))
    with pytest.raises(TypeError, match="model"):
        dense_ops.convert_sync_batchnorm("not a model")


def _frozen_norm(block):
    block.denselayer2.norm1.eval()


def _other_drop_rate(block):
    block.denselayer2.drop_rate = 0.5


def _no_affine(block):
    block.denselayer2.norm1.affine = False


def _other_eps(block):
    block.denselayer2.norm2.eps = 1e-3


def _hook(block):
    block.denselayer2.conv1.register_forward_hook(lambda *args: None)


@pytest.mark.parametrize("change, reason", [
    (_frozen_norm, "differ in train/eval mode"), (_other_drop_rate, "differ in drop_rate"),
    (_no_affine, "lacks affine parameters"), (_other_eps, "differ in eps"), (_hook, "hooks are registered"),
])
def test_unfusable_synchronized_block_names_the_reason(change, reason):
    """A synchronized block cannot fall back to module-by-module BN (it would not synchronize): the
    error says which of the reasons holds, and only that one."""
    block = dense_ops.DenseBlock(3, 4, 2, 4)
    change(block)
    with pytest.raises(ValueError, match="must run as one op") as error:
        dense_ops.nn.dense.run_layers(list(block.values()), torch.randn(2, 4, 3, 3), "bn_relu", sync_group="0")
    reasons = ("differ in train/eval mode", "differ in drop_rate", "lacks affine parameters", "differ in eps",
               "hooks are registered")
    assert [r for r in reasons if r in str(error.value)] == [reason]
