"""PyTorch features users rely on keep working with dense_ops models (issue 4).

compile/export, autocast, copies and serialization, dtype moves, frozen layers and DDP,
each checked against the naive torch.cat model with the same weights.
"""
import copy
import io

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import dense_ops
from dense_ops import models
from helpers import run_gloo_ranks
from helpers import randomize_batch_norms
from model_helpers import assert_same_step, forward_backward


def tiny_pair(bottleneck=True, dtype=torch.float64):
    """(ours, naive): a 2-layers-per-block CIFAR DenseNet(-BC) with k=4 and the same weights."""
    depth = 16 if bottleneck else 10
    torch.manual_seed(0)
    naive = models.densenet_cifar(depth, 4, bottleneck, num_classes=3, block_type="naive")
    naive = randomize_batch_norms(naive).to(dtype)
    ours = models.densenet_cifar(depth, 4, bottleneck, num_classes=3).to(dtype)
    ours.load_state_dict(naive.state_dict(), strict=True)
    return ours, naive


def _assert_compiled_equals_eager(eager, x, backend):
    """torch.compile(fullgraph=True) fails on any graph break; results must equal eager's."""
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    for training in (True, False):
        eager.train(training)
        compiled_model.train(training)
        out_e, gx_e, grads_e, bufs_e = forward_backward(eager, x)
        out_c, gx_c, grads_c, bufs_c = forward_backward(compiled, x)
        torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx_c, gx_e, atol=1e-5, rtol=1e-5)
        for mine, theirs in ((grads_c, grads_e), (bufs_c, bufs_e)):
            assert mine.keys() == {f"_orig_mod.{name}" for name in theirs}
            for name in theirs:
                torch.testing.assert_close(mine[f"_orig_mod.{name}"], theirs[name], atol=1e-5, rtol=1e-5, msg=name)


def test_compile_block_inductor_train_and_eval():
    torch.manual_seed(0)
    block = randomize_batch_norms(dense_ops.DenseBlock(2, 4, 2, 3))
    _assert_compiled_equals_eager(block, torch.randn(2, 4, 5, 5), backend="inductor")


@pytest.mark.slow
def test_compile_whole_model_without_graph_breaks():
    # aot_eager traces exactly what inductor sees (fake kernels, autograd) without its
    # C++ code generation, which takes a minute per graph on this CPU.
    ours, _ = tiny_pair(dtype=torch.float32)
    _assert_compiled_equals_eager(ours, torch.randn(2, 3, 8, 8), backend="aot_eager")


def test_export_eval_model():
    ours, naive = tiny_pair()
    ours.eval()
    naive.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    exported = torch.export.export(ours, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert "dense_ops.dense_block_forward.default" in targets
    for inputs in (x, torch.randn_like(x)):
        torch.testing.assert_close(exported.module()(inputs), naive(inputs), atol=1e-10, rtol=0)


@pytest.mark.parametrize("bottleneck", [True, False], ids=["BC", "basic"])
def test_autocast_bfloat16_close_to_naive(bottleneck):
    ours, naive = tiny_pair(bottleneck, dtype=torch.float32)
    x = torch.randn(4, 3, 8, 8)
    results = []
    for model in (ours, naive):
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xg)
        out.float().sum().backward()
        results.append((out.float(), xg.grad, {n: p.grad for n, p in model.named_parameters()}))
    (out_o, gx_o, grads_o), (out_n, gx_n, grads_n) = results
    torch.testing.assert_close(out_o, out_n, atol=5e-2, rtol=5e-2)
    torch.testing.assert_close(gx_o, gx_n, atol=5e-2, rtol=5e-2)
    for name in grads_n:
        assert grads_o[name].dtype == torch.float32, name
        scale = grads_n[name].abs().max().item() + 1e-3
        torch.testing.assert_close(grads_o[name] / scale, grads_n[name] / scale, atol=5e-2, rtol=0, msg=name)
    for (name, mine), theirs in zip(ours.named_buffers(), naive.buffers()):
        assert mine.dtype == theirs.dtype, name  # statistics stay float32
        torch.testing.assert_close(mine, theirs, atol=2e-2, rtol=2e-2, msg=name)



@pytest.mark.parametrize("training", [True, False])
def test_float64_model_under_autocast_stays_float64_like_naive(training):
    """Autocast leaves float64 tensors alone (the naive model then runs in float64): so must our blocks."""
    ours, naive = tiny_pair()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for model in (ours, naive):
        model.train(training)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, naive(x), atol=1e-10, rtol=0)

def test_deepcopy_and_save_load_whole_model_and_state_dict():
    ours, naive = tiny_pair()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    forward_backward(ours, x)  # a model that has already trained a step
    copied = copy.deepcopy(ours)

    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded_whole = torch.load(buffer, weights_only=False)

    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    loaded_state = models.densenet_cifar(16, 4, num_classes=3).double()
    loaded_state.load_state_dict(torch.load(buffer, weights_only=True), strict=True)

    for model in (copied, loaded_whole, loaded_state):
        assert isinstance(model.features.denseblock1, dense_ops.DenseBlock)
        for training in (True, False):
            assert_same_step(copy.deepcopy(model).train(training), copy.deepcopy(ours).train(training), x, atol=0)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_channels_last_model_matches_naive(training):
    ours, naive = tiny_pair()
    ours = ours.to(memory_format=torch.channels_last).train(training)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    with torch.no_grad():  # stem + first block, on a copy: a training forward updates running statistics
        assert copy.deepcopy(ours).features[:2](x).is_contiguous(memory_format=torch.channels_last)
    assert_same_step(ours, naive.train(training), x, atol=1e-10)


def _max_relative_error(value, reference):
    """max |value - reference| / max |reference|; an all-zero reference (a channel no ReLU lets
    through) divides by the smallest normal float64 instead, so only an exact zero passes."""
    scale = reference.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
    return ((value.double() - reference).abs().max() / scale).item()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float16, 1e-2), (torch.bfloat16, 3e-2)], ids=["half", "bf16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_low_precision_models_as_accurate_as_naive(dtype, tolerance, training):
    """.half() / .to(bfloat16) models run, and are as close to a float64 run as the naive model.

    Gradients are compared in eval mode only: batch-norm backward in training over a few
    values per channel is ill-conditioned in half precision for both implementations.
    """
    ours, naive = tiny_pair(dtype=torch.float32)
    x = torch.randn(4, 3, 8, 8)
    truth = forward_backward(copy.deepcopy(naive).double().train(training), x.double())
    ours = (ours.half() if dtype == torch.float16 else ours.to(dtype)).train(training)
    results = {name: forward_backward(model.to(dtype).train(training), x.to(dtype))
               for name, model in (("ours", ours), ("naive", naive))}
    assert results["ours"][0].dtype == dtype and results["ours"][1].dtype == dtype
    checked = [0] if training else [0, 1]
    for index in checked:
        error = {name: _max_relative_error(result[index], truth[index]) for name, result in results.items()}
        assert error["ours"] <= max(2 * error["naive"], tolerance), (index, error)
    if not training:
        for name, grad in truth[2].items():
            error = {key: _max_relative_error(result[2][name], grad) for key, result in results.items()}
            assert error["ours"] <= max(2 * error["naive"], tolerance), (name, error)
    for name, value in truth[3].items():
        torch.testing.assert_close(results["ours"][3][name].double(), value.double(), atol=tolerance, rtol=tolerance,
                                   msg=name)


def _freeze(model):
    model.features.conv0.requires_grad_(False)  # the first block's input then needs no grad
    model.features.denseblock1.denselayer1.requires_grad_(False)
    model.features.denseblock2.denselayer2.norm1.requires_grad_(False)  # part of a layer
    return model


@pytest.mark.parametrize("recompute", ["bn_relu", "bottleneck"])
def test_frozen_layers_get_no_grads_and_others_match(recompute):
    ours, naive = tiny_pair()
    for block in (m for m in ours.modules() if isinstance(m, dense_ops.DenseBlock)):
        block.recompute = recompute
    _freeze(ours)
    _freeze(naive)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    out_o, _, grads_o, bufs_o = forward_backward(ours, x, input_grad=False)
    out_n, _, grads_n, bufs_n = forward_backward(naive, x, input_grad=False)
    frozen = {n for n, p in naive.named_parameters() if not p.requires_grad}
    assert len(frozen) == 1 + 6 + 2
    assert grads_o.keys() == grads_n.keys()
    assert not frozen & grads_o.keys()
    torch.testing.assert_close(out_o, out_n, atol=1e-10, rtol=0)
    for name in grads_n:
        torch.testing.assert_close(grads_o[name], grads_n[name], atol=1e-10, rtol=0, msg=name)
    for name in bufs_n:
        torch.testing.assert_close(bufs_o[name], bufs_n[name], atol=1e-10, rtol=0, msg=name)


def _ddp_steps(rank, world_size):
    ours, naive = tiny_pair()
    torch.manual_seed(1)
    batch = torch.randn(2 * world_size, 3, 8, 8, dtype=torch.float64)
    x = batch[2 * rank:2 * rank + 2]  # each rank its own half of the batch
    ddp_ours, ddp_naive = DistributedDataParallel(ours), DistributedDataParallel(naive)
    for _ in range(2):  # the second step starts from buffers DDP broadcast from rank 0
        assert_same_step(ddp_ours, ddp_naive, x, atol=1e-10)
    # DDP averaged the gradients: every rank holds the same ones.
    for p in ours.parameters():
        gathered = [torch.empty_like(p.grad) for _ in range(world_size)]
        dist.all_gather(gathered, p.grad)
        torch.testing.assert_close(gathered[0], gathered[1], atol=0, rtol=0)


@pytest.mark.slow
def test_ddp_two_processes_gloo_matches_naive(tmp_path):
    run_gloo_ranks(_ddp_steps, 2, str(tmp_path / "ddp_init"))
