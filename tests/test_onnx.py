"""torch.onnx.export(model, (x,), dynamo=True) of models holding dense_ops ops: the ONNX graph has standard
operators only, and onnxruntime's outputs equal PyTorch's (float32: 1e-5)."""
import pytest
import torch
from torch import nn

import dense_ops
from dense_ops import models
from helpers import randomize_batch_norms

pytest.importorskip("onnxscript")  # torch.onnx's dynamo exporter needs it
onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

# What the dense_ops ops become: gather, folded batch norm, ReLU, (grouped) convolution, the channel
# shuffle and concatenation; plus what the rest of the models needs (pooling, the classifier, the
# exporter's shape and slice bookkeeping).
STANDARD_OPS = {"Gather", "Mul", "Add", "Sub", "Relu", "Conv", "Reshape", "Transpose", "Concat", "Sqrt", "Reciprocal",
                "Div", "AveragePool", "MaxPool", "GlobalAveragePool", "ReduceMean", "Gemm", "MatMul", "Flatten",
                "Slice",
                "BatchNormalization", "Constant", "Identity", "Shape", "Cast", "Expand", "ScatterND", "Squeeze",
                "Unsqueeze", "Range", "Pad", "Where", "Equal", "ConstantOfShape"}


def export_and_run(model: nn.Module, x: torch.Tensor, path) -> tuple[torch.Tensor, set[str]]:
    """(onnxruntime's output, the ONNX operator types) of the model exported the way the README shows."""
    program = torch.onnx.export(model, (x,), dynamo=True)
    program.save(str(path))
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    nodes = list(proto.graph.node) + [node for function in proto.functions for node in function.node]
    assert {node.domain for node in nodes} <= {"", "ai.onnx"}, "non-standard ONNX domains"
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output), {node.op_type for node in nodes}


def assert_onnx_equals_torch(model: nn.Module, x: torch.Tensor, path) -> set[str]:
    with torch.no_grad():
        expected = model(x)
    actual, op_types = export_and_run(model, x, path)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    assert op_types <= STANDARD_OPS, op_types - STANDARD_OPS
    return op_types


@pytest.mark.parametrize("bottleneck, depth", [(False, 13), (True, 16)], ids=["densenet13", "densenet-bc16"])
def test_cifar_densenet(bottleneck, depth, tmp_path):
    torch.manual_seed(0)
    model = randomize_batch_norms(models.densenet_cifar(depth, 12, bottleneck, num_classes=10)).eval()
    op_types = assert_onnx_equals_torch(model, torch.randn(2, 3, 32, 32), tmp_path / "densenet.onnx")
    assert {"Conv", "Relu", "Concat"} <= op_types


def test_imagenet_densenet_with_swapped_torchvision_blocks(tmp_path):
    """densenet121's structure (7x7 stem, max pool, DenseNet-BC blocks, transitions), fewer and narrower layers."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.DenseNet(growth_rate=8, block_config=(2, 3, 2), num_init_features=16, num_classes=5)
    model = randomize_batch_norms(dense_ops.swap_dense_blocks(model)).eval()
    assert_onnx_equals_torch(model, torch.randn(1, 3, 64, 64), tmp_path / "densenet121.onnx")


def condensed_condensenet(depth=14):
    """A CondenseNet past its last condensation stage (random weights: magnitude pruning keeps random
    inputs per group), converted with dense_ops.condense."""
    torch.manual_seed(0)
    model = randomize_batch_norms(models.condensenet_cifar(depth=depth, growth_rates=(4, 8, 8), num_classes=10))
    dense_ops.update_condensation(model, 1.0)
    return dense_ops.condense(model.eval())


@pytest.mark.slow
def test_condensed_condensenet(tmp_path):
    model = condensed_condensenet()
    assert any(isinstance(m, dense_ops.CondensedConv) for m in model.modules())
    op_types = assert_onnx_equals_torch(model, torch.randn(2, 3, 32, 32), tmp_path / "condensenet.onnx")
    assert {"Gather", "Mul", "Add", "Relu", "Conv", "Transpose"} <= op_types
    proto = onnx.load(str(tmp_path / "condensenet.onnx"))
    groups = {attribute.i for node in proto.graph.node if node.op_type == "Conv"
              for attribute in node.attribute if attribute.name == "group"}
    assert 4 in groups  # the condensed 1x1 convs stay grouped


def test_training_mode_dense_block_is_refused():
    """Batch statistics and running-statistics updates have no plain form here: the non-strict capture
    refuses with our message; torch.onnx then retries with dynamo (which cannot see that an ONNX export
    is running), and that graph fails to translate, naming the op."""
    model = models.densenet_cifar(16, 4, num_classes=3).train()
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="training mode"), \
            pytest.raises(Exception, match="No ONNX function found for .*dense_ops.dense_block_forward"):
        torch.onnx.export(model, (x,), dynamo=True)
    with pytest.raises(NotImplementedError, match=r"export the model in eval mode \(model.eval\(\)\)"):
        dense_ops.ops._plain_dense_block_forward(x, [], None, True, True, 1e-5)


def test_the_ops_still_run_outside_export():
    """The plain-torch forms are for ONNX export only: torch.export keeps the fused ops."""
    model = condensed_condensenet()
    exported = torch.export.export(model, (torch.randn(1, 3, 32, 32),))
    graphs = [m.graph for m in exported.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    targets = {str(node.target) for graph in graphs for node in graph.nodes if node.op == "call_function"}
    assert "dense_ops.condensed_conv.default" in targets  # inside the model's no_grad region
