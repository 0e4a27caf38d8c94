"""What gets measured: a model for each (workload, implementation) and the step that runs it.

A configuration is a plain dict (it crosses process boundaries), for example
  {"workload": "block", "impl": "dense_ops/bn_relu", "memory_format": "channels_last",
   "mode": "train", "shape": {"num_layers": 24, "c0": 32, "growth": 12, "bn_size": 4,
   "batch": 32, "size": 32}}
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATIONS = ("naive", "checkpoint", "dense_ops/bn_relu", "dense_ops/bottleneck")
# An implementation name ending in COMPILED is that model under torch.compile, default mode (inductor).
COMPILED = "+compile"
COMPILED_IMPLEMENTATIONS = ("naive+compile", "dense_ops/bn_relu+compile", "dense_ops/bottleneck+compile")
# Converted CondenseNet inference: "naive" is the official code's converted form (index_select,
# BN, ReLU, grouped conv, shuffle, torch.cat per layer); "naive+model_choices" the same layer ops
# inside dense_ops' model-level choices (preallocated block buffers, 2x2 pools as strided adds,
# 3x3 grouped convs as the group_conv3x3 op), so that it differs from "dense_ops/fused" (our
# CondensedConv op and those choices) only by the condensed 1x1 conv; "masked" the
# training-time model with its masked dense 1x1 convs; "torchvision/densenet121" the network that
# CondenseNet-74 is measured against (5.5x its multiply-adds at a similar ImageNet accuracy).
CONDENSENET_IMPLEMENTATIONS = ("naive", "naive+model_choices", "masked", "dense_ops/fused", "torchvision/densenet121")
FUSED_CONDENSENET = "dense_ops/fused"
# "convolutions": every convolution of one naive training step alone, forward and backward, on its
# own recorded input (see ConvolutionsAlone): the time floor that fusing everything else approaches.
# Timed only: it is no model, so there is nothing to check and its memory means nothing.
CONVOLUTIONS = "convolutions"
# "arithmetic": the floating-point operations of one naive training step run as large square GEMMs
# (see ArithmeticAlone): the step's arithmetic at this machine's best GEMM rate. Timed only, as above.
ARITHMETIC = "arithmetic"
FLOORS = (CONVOLUTIONS, ARITHMETIC)
ALL_IMPLEMENTATIONS = ("naive", "naive+compile", CONVOLUTIONS, ARITHMETIC, "checkpoint", "dense_ops/bn_relu",
                       "dense_ops/bn_relu+compile", "dense_ops/bottleneck", "dense_ops/bottleneck+compile"
                       ) + CONDENSENET_IMPLEMENTATIONS[1:]
BASELINE = "naive"
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def split_compiled(impl: str) -> tuple[str, bool]:
    """'naive+compile' -> ('naive', True); 'naive' -> ('naive', False)."""
    return impl.removesuffix(COMPILED), impl.endswith(COMPILED)


def block_type_and_recompute(impl: str) -> tuple[str, str]:
    """'dense_ops/bottleneck' -> ('dense_ops', 'bottleneck'); the others use the default level."""
    block_type, _, recompute = impl.partition("/")
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {IMPLEMENTATIONS}, got {impl!r}")
    return block_type, recompute or "bn_relu"


def _dense_block(impl: str, shape: dict) -> nn.Module:
    import dense_ops
    block_type, recompute = block_type_and_recompute(impl)
    args = (shape["num_layers"], shape["c0"], shape["bn_size"], shape["growth"])
    if block_type == "naive":
        return dense_ops.reference.DenseBlock(*args)
    if block_type == "checkpoint":
        from torchvision.models.densenet import _DenseBlock
        return _DenseBlock(*args, drop_rate=0.0, memory_efficient=True)
    return dense_ops.DenseBlock(*args, recompute=recompute)


def _densenet_cifar(impl: str, shape: dict) -> nn.Module:
    from dense_ops import models
    block_type, recompute = block_type_and_recompute(impl)
    return models.densenet_cifar(depth=shape["depth"], growth_rate=shape["growth"], block_type=block_type,
                                 recompute=recompute)


def _densenet121(impl: str, shape: dict) -> nn.Module:
    from dense_ops import models
    block_type, recompute = block_type_and_recompute(impl)
    return models.densenet121(block_type=block_type, recompute=recompute)


def _condensenet74(impl: str, shape: dict) -> nn.Module:
    """CondenseNet-74 (C=G=4), fully condensed, with random weights and BN statistics drawn from
    a fixed seed: every implementation gets the same weights in its own form."""
    import dense_ops
    if impl not in CONDENSENET_IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {CONDENSENET_IMPLEMENTATIONS}, got {impl!r}")
    if impl == "torchvision/densenet121":
        import torchvision
        return torchvision.models.densenet121()
    torch.manual_seed(0)
    model = dense_ops.models.condensenet74(condense_factor=4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    dense_ops.update_condensation(model, 1.0)
    if impl == "masked":
        return model
    fused = dense_ops.condense(model.eval(), prune_classifier=False)
    if impl == FUSED_CONDENSENET:
        return fused
    official = dense_ops.reference.unfused_condensenet(fused)
    return official if impl == "naive" else with_model_choices(official)


def with_model_choices(official: nn.Module) -> nn.Module:
    """The official converted form with dense_ops' model-level inference choices turned back on.

    unfused_condensenet swaps every fused CondensedConv for the official index_select / BN / ReLU /
    grouped conv / shuffle modules, every 2x2 pool for ATen's and turns each block's `preallocate`
    off. Here the pools are dense_ops' again (AvgPool2x2: strided adds) and, with `preallocate` on,
    dense_ops.models.condensenet runs the same layer modules with its own model-level choices:
    every block writes into one preallocated buffer (no torch.cat) and the 3x3 grouped convs run as
    dense_ops.ops.group_conv3x3 (GroupConv2d, as in the fused row). A reference CondensedConv is not the fused
    op, so each layer still applies its own BN and ReLU after it.
    """
    import dense_ops

    blocks = [module for module in official.modules() if hasattr(module, "preallocate")]
    if not blocks:  # else this row would silently measure the official form again
        raise RuntimeError("no CondenseNet block has a `preallocate` switch: dense_ops.models.condensenet changed")
    for block in blocks:
        block.preallocate = True
    for name, module in list(official.named_modules()):
        if type(module) is nn.AvgPool2d and module.kernel_size == 2 and module.stride == 2:
            parent, _, child = name.rpartition(".")
            setattr(official.get_submodule(parent), child, dense_ops.models.condensenet.AvgPool2x2())
    return official


# workload name -> (model builder, does the model classify (else: it returns a feature map),
#                   are its weights fixed by the builder (else the correctness check copies them))
WORKLOADS = {
    "block": (_dense_block, False, False),
    "densenet_cifar": (_densenet_cifar, True, False),
    "densenet121": (_densenet121, True, False),
    "condensenet74": (_condensenet74, True, True),
}


def describe(config: dict) -> str:
    """A short human-readable name of a configuration's workload and shape."""
    s = config["shape"]
    if config["workload"] == "block":
        return f"block L={s['num_layers']} k={s['growth']} C0={s['c0']} N={s['batch']} {s['size']}x{s['size']}"
    if config["workload"] == "densenet_cifar":
        return f"DenseNet-BC-{s['depth']} k={s['growth']} N={s['batch']} {s['size']}x{s['size']}"
    if config["workload"] == "condensenet74":
        return f"CondenseNet-74 C=G=4 N={s['batch']} {s['size']}x{s['size']}"
    return f"densenet121 N={s['batch']} {s['size']}x{s['size']}"


class Workload:
    """A model, its input and one training or inference step, built on one device and memory format."""

    def __init__(self, config: dict, device: torch.device, seed: int = 0, dtype: torch.dtype = torch.float32):
        builder, self.classifies, self.seeded_weights = WORKLOADS[config["workload"]]
        self.config = config
        self.device = device
        self.memory_format = MEMORY_FORMATS[config["memory_format"]]
        self.training = config["mode"] == "train"
        impl, self.compiled = split_compiled(config["impl"])
        self.floor = impl if impl in FLOORS else None
        if self.floor and not self.training:
            raise ValueError(f"{impl!r} is a training-step floor; got mode {config['mode']!r}")
        torch.manual_seed(seed)
        model_impl = BASELINE if self.floor else impl
        self.model = builder(model_impl, config["shape"]).to(device, dtype, memory_format=self.memory_format)
        self.model.train(self.training)
        if self.compiled:
            # In place (nn.Module.compile), so parameter and state-dict names stay those of the eager
            # model; default mode, backend inductor. Compilation happens in the first call.
            self.model.compile()
        self.input, self.target = self._make_batch(seed, dtype)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9) if self.training else None
        self.floor_work = FLOOR_WORK[impl](self) if self.floor else None

    def _make_batch(self, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.config["shape"]
        generator = torch.Generator().manual_seed(seed + 1)
        channels = s["c0"] if self.config["workload"] == "block" else 3
        x = torch.randn(s["batch"], channels, s["size"], s["size"], generator=generator)
        x = x.to(self.device, dtype).contiguous(memory_format=self.memory_format)
        if self.classifies:
            classes = 10 if self.config["workload"] == "densenet_cifar" else 1000
            target = torch.randint(0, classes, (s["batch"],),
                                   generator=generator).to(self.device)
        else:
            # The gradient flowing into the block's output, as if the rest of a network (and a mean loss) followed.
            out_channels = s["c0"] + s["num_layers"] * s["growth"]
            target = torch.randn(s["batch"], out_channels, s["size"], s["size"], generator=generator)
            target = (target / target.numel()).to(self.device, dtype).contiguous(memory_format=self.memory_format)
            x.requires_grad_(self.training)  # inside a network, a block's input needs a gradient too
        return x, target

    def backward(self, output: torch.Tensor, samples: int | None = None) -> None:
        """Cross-entropy against random labels, or the given output gradient for a lone block."""
        target = self.target[:samples]
        if self.classifies:
            F.cross_entropy(output, target).backward()
        else:
            output.backward(target)

    def step(self) -> None:
        """Training: forward + backward + SGD step (gradients freed after); inference: a forward under
        torch.inference_mode(), as deployed models run."""
        if not self.training:
            with torch.inference_mode():
                self.model(self.input)
            return
        if self.floor:
            self.floor_work.step()
            return
        self.backward(self.model(self.input))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.input.grad = None

    def outputs_and_grads(self, samples: int) -> dict[str, torch.Tensor]:
        """Output, and in training the input and parameter gradients, of one pass over the first
        `samples` samples of the batch (no optimizer step)."""
        if self.floor:
            raise ValueError(f"{self.floor!r} is a time floor, not a model: it has no outputs to check")
        self.model.zero_grad(set_to_none=True)
        x = self.input[:samples].detach().requires_grad_(self.input.requires_grad)
        if not self.training:
            with torch.no_grad():
                return {"output": self.model(x)}
        output = self.model(x)
        self.backward(output, samples)
        results = {"output": output.detach()}
        if x.requires_grad:
            results["input.grad"] = x.grad
        results.update({f"{name}.grad": p.grad for name, p in self.model.named_parameters()})
        self.model.zero_grad(set_to_none=True)
        return results


class ConvolutionsAlone:
    """Every convolution of one training step of the workload's naive model, each on the input it
    had in that step (in the workload's memory format), and nothing else: no BN, ReLU,
    concatenation, pooling, loss or optimizer. A step runs them all forward, then backward from
    fixed random output gradients (input gradients where the naive step needed them, and every
    weight gradient): the convolution work of the naive step with the same kernels (oneDNN on CPU)."""

    def __init__(self, workload: Workload):
        self.calls = []  # (conv, recorded input)

        def record(conv: nn.Conv2d, args: tuple) -> None:
            x = args[0]
            saved = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(x.requires_grad)
            self.calls.append((conv, saved))

        convs = [m for m in workload.model.modules() if isinstance(m, nn.Conv2d)]
        hooks = [conv.register_forward_pre_hook(record) for conv in convs]
        try:
            workload.backward(workload.model(workload.input))
        finally:
            for hook in hooks:
                hook.remove()
        workload.model.zero_grad(set_to_none=True)
        if not self.calls:
            raise RuntimeError(f"{workload.config['workload']} has no nn.Conv2d to time")
        generator = torch.Generator().manual_seed(2)
        with torch.no_grad():
            shapes = [conv(x).shape for conv, x in self.calls]
        self.output_grads = [torch.randn(shape, generator=generator).to(x.device, x.dtype)
                             .contiguous(memory_format=workload.memory_format)
                             for shape, (_, x) in zip(shapes, self.calls)]

    def step(self) -> None:
        self.forward_backward()
        for conv, x in self.calls:
            conv.weight.grad = x.grad = None
            if conv.bias is not None:
                conv.bias.grad = None

    def forward_backward(self) -> None:
        outputs = [conv(x) for conv, x in self.calls]
        torch.autograd.backward(outputs, self.output_grads)


class ArithmeticAlone:
    """The floating-point operations of one training step of the workload's naive model (forward
    and backward, counted by torch.utils.flop_counter: the convolutions and the classifier; the
    optimizer's few are left out), run as back-to-back square GEMMs of GEMM_SIZE in the workload's
    dtype (and in the autocast dtype under autocast). That is the step's arithmetic at the rate of a
    large GEMM, about the best this machine sustains: a floor for any implementation that does the
    same operations (direct convolutions; a Winograd 3x3 would do fewer)."""

    GEMM_SIZE = 2048

    def __init__(self, workload: Workload):
        from torch.utils.flop_counter import FlopCounterMode
        with FlopCounterMode(display=False) as counter:
            workload.backward(workload.model(workload.input))
        workload.model.zero_grad(set_to_none=True)
        workload.input.grad = None
        self.flops = counter.get_total_flops()
        if self.flops == 0:
            raise RuntimeError(f"{workload.config['workload']}: flop_counter counted no operation to time")
        full_gemms, rest = divmod(self.flops, 2 * self.GEMM_SIZE ** 3)
        rest_size = round((rest / 2) ** (1 / 3))  # the remainder as one smaller square GEMM
        generator = torch.Generator().manual_seed(3)

        def operands(n: int) -> tuple[torch.Tensor, torch.Tensor]:
            return tuple(torch.randn(n, n, generator=generator).to(workload.device, workload.input.dtype)
                         for _ in range(2))

        self.gemms = [operands(self.GEMM_SIZE)] * full_gemms + ([operands(rest_size)] if rest_size else [])

    def step(self) -> None:
        # On CUDA, cuDNN's float32 convolutions may use TF32 (torch.backends.cudnn.allow_tf32, on by
        # default): the GEMMs get the same allowance. The CPU ignores it.
        matmul = torch.backends.cuda.matmul
        allowed, matmul.allow_tf32 = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        try:
            for a, b in self.gemms:
                a @ b  # no out=: autocast only applies to ops that allocate their result
        finally:
            matmul.allow_tf32 = allowed


FLOOR_WORK = {CONVOLUTIONS: ConvolutionsAlone, ARITHMETIC: ArithmeticAlone}
