"""Official CondenseNet checkpoints (github.com/ShichenLiu/CondenseNet) in dense-ops: load_official_condensenet
against the official forward pass, re-implemented in official_condensenet.py (the reference), and the
official configuration options (group_1x1/group_3x3, bottleneck, dropout, init, DenseNet-LGC).

The fixtures under tests/fixtures/ are official-format checkpoints with random values; how each was
made: tests/fixtures/make_official_condensenet.py (test_fixtures_are_what_this_script_makes checks it).
"""
import pathlib

import pytest
import torch

import dense_ops
import official_condensenet as official
from dense_ops import CondensedConv, LearnedGroupConv, condense
from dense_ops.models import (LayerOptions, condensenet74, condensenet_cifar, densenet_lgc,
                              load_official_condensenet)
from dense_ops.flops import count_flops_params

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
# float64 through both models: only summation order differs (~1e-15 relative at these magnitudes).
ATOL = 1e-9


def our_model(args: official.Args):
    """Our training-form model for the official options `args`."""
    if args.model == "densenet_LGC":
        return densenet_lgc(args.stages, args.growth, args.num_classes, 1 if args.cifar else 2, args.reduction,
                            group_1x1=args.group_1x1, group_3x3=args.group_3x3,
                            condense_factor=args.condense_factor, bottleneck=args.bottleneck,
                            dropout_rate=args.dropout_rate)
    options = LayerOptions(group_1x1=args.group_1x1, group_3x3=args.group_3x3, condense_factor=args.condense_factor,
                           bottleneck=args.bottleneck, dropout_rate=args.dropout_rate)
    return dense_ops.models.CondenseNet(args.stages, args.growth, args.num_classes, 1 if args.cifar else 2, options)


def our_condensed_model(args: official.Args):
    """What dense_ops.condense returns for a fully condensed model of these options (the values are overwritten)."""
    model = our_model(args)
    dense_ops.update_condensation(model, 1.0)
    return condense(model)


def official_state(checkpoint: dict) -> dict:
    return {k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()}


def image(args: official.Args, batch=2):
    size = 32 if args.cifar else 224  # the sizes at which the official final AvgPool2d is global
    return torch.randn(batch, 3, size, size, dtype=torch.float64)


def cifar_args():
    return official.FIXTURES["condensenet_cifar14_train"][0]


def cifar_state():
    return official_state(torch.load(FIXTURES / "condensenet_cifar14_train.pth", weights_only=True))


def assert_same_outputs(ours, reference, x, train=False):
    ours.train(train)
    reference.train(train)
    with torch.no_grad():
        expected = reference(x)
        actual = ours(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


TRAIN_FIXTURES = [name for name, (_, _, _, conv) in official.FIXTURES.items() if not conv]
CONVERTED_FIXTURES = [name for name, (_, _, _, conv) in official.FIXTURES.items() if conv]


# ------------------------------------------------------------------------------------ fixtures

@pytest.mark.parametrize("name", list(official.FIXTURES))
def test_fixtures_are_what_this_script_makes(name):
    committed = torch.load(FIXTURES / f"{name}.pth", weights_only=True)
    made = official.fixture_checkpoint(name)
    assert committed.keys() == made.keys()
    assert committed["state_dict"].keys() == made["state_dict"].keys()
    for key, value in made["state_dict"].items():
        assert committed["state_dict"][key].dtype == value.dtype, key
        torch.testing.assert_close(committed["state_dict"][key], value, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------------------- training form

@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", TRAIN_FIXTURES)
def test_training_checkpoint_gives_the_official_outputs(name, train):
    args = official.FIXTURES[name][0]
    path = FIXTURES / f"{name}.pth"
    ours = load_official_condensenet(our_model(args), path).double()
    reference = official.fixture_model(name)
    reference.load_state_dict(official_state(torch.load(path, weights_only=True)))
    assert_same_outputs(ours, reference.double(), image(args), train)


@pytest.mark.parametrize("name", TRAIN_FIXTURES)
def test_training_checkpoint_keeps_masks_and_stage(name):
    args, _, stage, _ = official.FIXTURES[name]
    state = official_state(torch.load(FIXTURES / f"{name}.pth", weights_only=True))
    model = load_official_condensenet(our_model(args), state)  # a bare state dict
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LearnedGroupConv)}
    assert layers and len(layers) == sum(k.endswith("._mask") for k in state)
    for prefix, layer in layers.items():
        assert torch.equal(layer.mask, state[f"{prefix}._mask"])
        assert layer.stage.dtype == torch.long and int(layer.stage) == stage == layer._host_stage
    # Training goes on from the loaded stage: the next stage prunes one more 1/C of the inputs.
    dense_ops.update_condensation(model, 1.0)
    for layer in layers.values():
        assert torch.all(layer.kept_inputs().sum(1) == layer.in_channels // layer.condense_factor)


@pytest.mark.slow
def test_condensenet74_checkpoint_gives_the_official_outputs():
    """The full CondenseNet-74 (too large to commit: made here as the fixtures are) at a 64x64 input: its
    final map is 2x2, so the reference pools 2x2 (the official AvgPool2d(7) is the global pooling at 224)."""
    args = official.Args(stages=(4, 6, 8, 10, 8), growth=(8, 16, 32, 64, 128), data="imagenet", num_classes=1000,
                         pool_size=2)
    reference = official.official_model(args, seed=6, stage=2)
    ours = load_official_condensenet(condensenet74(), {"state_dict": reference.state_dict()})
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    assert_same_outputs(ours.double(), reference.double(), x)


# ------------------------------------------------------------------------------ converted form

@pytest.mark.parametrize("name", CONVERTED_FIXTURES)
def test_converted_checkpoint_gives_the_official_outputs(name):
    args = official.FIXTURES[name][0]
    path = FIXTURES / f"{name}.pth"
    ours = load_official_condensenet(our_condensed_model(args), str(path)).double()
    assert any(isinstance(m, CondensedConv) for m in ours.modules())
    reference = official.fixture_model(name)
    reference.load_state_dict(official_state(torch.load(path, weights_only=True)))
    assert_same_outputs(ours, reference.double(), image(args))


@pytest.mark.parametrize("name", ["condensenet_cifar14_train", "densenet_lgc_cifar14_train"])
def test_condense_of_a_loaded_checkpoint_equals_the_official_convert_model(name):
    args, seed, _, _ = official.FIXTURES[name]
    reference = official.official_model(args, seed, stage=args.condense_factor - 1)
    ours = condense(load_official_condensenet(our_model(args), reference.state_dict()))
    assert_same_outputs(ours.double(), official.converted(reference).double(), image(args))


def test_a_converted_densenet_lgc_gives_the_official_outputs():
    """DenseNet-LGC's converted form (learned group convs in the transitions too), made here from the fixture's
    options (no committed fixture: the CondenseNet fixtures cover the converted layers' format)."""
    args, seed, _, _ = official.FIXTURES["densenet_lgc_cifar14_train"]
    reference = official.converted(official.official_model(args, seed, stage=args.condense_factor - 1))
    ours = load_official_condensenet(our_condensed_model(args), reference.state_dict())
    assert isinstance(ours.features.transition_1.conv, CondensedConv)
    assert_same_outputs(ours.double(), reference.double(), image(args))


def test_a_checkpoint_in_the_legacy_serialization_loads(tmp_path):
    """The official checkpoints were written by PyTorch 0.3/1.1: the pre-1.6 (non-zip) file format."""
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(torch.load(FIXTURES / "condensenet_cifar14_train.pth", weights_only=True), path,
               _use_new_zipfile_serialization=False)
    state = official_state(torch.load(path, weights_only=True))
    model = load_official_condensenet(our_model(cifar_args()), path)
    torch.testing.assert_close(model.classifier.weight, state["classifier.weight"], rtol=0, atol=0)


# ------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("build,message", [
    (lambda: condensenet_cifar(depth=20, growth_rates=(4, 8, 16), group_3x3=2),
     "has no 'features.denseblock_1.denselayer_3.conv_1._mask'"),
    (lambda: condensenet_cifar(depth=14, growth_rates=(4, 8, 8), group_3x3=2),
     r"'features.denseblock_3.denselayer_1.conv_1._mask' has shape \[64, 32, 1, 1\], the model's "
     r"'features.denseblock_3.denselayer_1.conv_1.mask' has \[32, 32, 1, 1\]"),
    (lambda: condensenet_cifar(depth=14, growth_rates=(4, 8, 16)),  # group_3x3 4, the checkpoint's 2
     r"'features.denseblock_1.denselayer_1.conv_2.conv.weight' has shape \[4, 8, 3, 3\]"),
    (lambda: densenet_lgc((2, 2, 2), (4, 8, 16), group_3x3=2), "has no 'features.transition_1.conv._mask'"),
])
def test_a_checkpoint_of_another_configuration_names_the_first_mismatch(build, message):
    with pytest.raises(ValueError, match=message):
        load_official_condensenet(build(), cifar_state())


def test_a_checkpoint_of_the_other_form_says_so():
    with pytest.raises(ValueError, match="training-form checkpoint"):
        load_official_condensenet(our_condensed_model(cifar_args()), cifar_state())
    converted = FIXTURES / "condensenet_cifar14_converted.pth"
    with pytest.raises(ValueError, match="converted checkpoint"):
        load_official_condensenet(our_model(cifar_args()), converted)


def test_an_extra_key_is_named():
    state = cifar_state()
    state["features.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="'features.extra.weight' is not in the model"):
        load_official_condensenet(our_model(cifar_args()), state)


LAYER = "features.denseblock_1.denselayer_2.conv_1."


def corrupt_mask(state):
    state[LAYER + "_mask"][0, 0] = 1 - state[LAYER + "_mask"][0, 0]  # one output of a group differs


def corrupt_stage(state):
    state[LAYER + "_stage"].fill_(2)


def corrupt_count(state):
    state[LAYER + "_count"].fill_(0)


def drop_count(state):
    del state[LAYER + "_count"]


@pytest.mark.parametrize("corrupt,message", [
    (corrupt_mask, f"'{LAYER}_mask' is not a learned group mask"),
    (corrupt_stage, f"'{LAYER}_count' holds \\[3.0\\], expected \\[6\\]"),
    (corrupt_count, f"'{LAYER}_count' holds \\[0.0\\], expected \\[3\\]"),
    (drop_count, f"has no '{LAYER}_count'"),
    (lambda s: s[LAYER + "_stage"].fill_(4), f"'{LAYER}_stage' holds 4.0, expected an integer stage"),
    (lambda s: s[LAYER + "_stage"].fill_(0.5), f"'{LAYER}_stage' holds 0.5"),
])
def test_an_inconsistent_learned_group_conv_is_named(corrupt, message):
    state = cifar_state()
    corrupt(state)
    model = our_model(cifar_args())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message):
        load_official_condensenet(model, state)
    for key, value in model.state_dict().items():  # nothing was loaded
        assert torch.equal(value, before[key]), key


def test_mask_and_stage_that_disagree_are_named():
    state = cifar_state()
    state[LAYER + "_mask"].fill_(1)  # stage 1 drops a quarter of the inputs; this mask keeps all
    with pytest.raises(ValueError, match=f"'{LAYER}_mask' keeps \\[12, 12, 12, 12\\] inputs per group, but stage 1"):
        load_official_condensenet(our_model(cifar_args()), state)


def test_an_index_out_of_range_is_named():
    state = official_state(torch.load(FIXTURES / "condensenet_cifar14_converted.pth", weights_only=True))
    state[LAYER + "index"][0] = 12
    with pytest.raises(ValueError, match=rf"{LAYER}index must hold integer indices in \[0, 12\)"):
        load_official_condensenet(our_condensed_model(cifar_args()), state)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        load_official_condensenet("model.pth", cifar_state())
    with pytest.raises(TypeError, match="checkpoint must be a path"):
        load_official_condensenet(our_model(cifar_args()), 3)
    with pytest.raises(ValueError, match="checkpoint holds no state dict of tensors"):
        load_official_condensenet(our_model(cifar_args()), {"state_dict": {"a": 1}})


def test_checkpoints_without_num_batches_tracked_load():
    """PyTorch < 0.4.1 wrote no num_batches_tracked (the released official checkpoints may lack it)."""
    state = {k: v for k, v in cifar_state().items() if not k.endswith("num_batches_tracked")}
    model = load_official_condensenet(our_model(cifar_args()), state)
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


# ------------------------------------------------------------------------------------- options

def test_official_init_gives_the_official_weights():
    """init_mode="fan_out" draws the official code's weights from the same seed."""
    args = official.Args(stages=(2, 2, 2), growth=(4, 8, 16), group_3x3=2)
    torch.manual_seed(7)
    reference = official.CondenseNet(args)
    torch.manual_seed(7)
    ours = condensenet_cifar(14, (4, 8, 16), group_3x3=2, init_mode="fan_out")
    theirs = dict(reference.named_parameters())
    assert theirs.keys() == dict(ours.named_parameters()).keys()
    for name, value in ours.named_parameters():
        torch.testing.assert_close(value, theirs[name], rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="init_mode must be one of"):
        condensenet_cifar(14, init_mode="xavier")


def test_condensenet74_options_reach_every_layer():
    model = condensenet74(condense_factor=8, group_1x1=4, group_3x3=2, bottleneck=2, dropout_rate=0.1)
    layers = [m for m in model.modules() if isinstance(m, LearnedGroupConv)]
    assert len(layers) == 36
    for layer in layers:
        assert (layer.groups, layer.condense_factor, layer.drop.p) == (4, 8, 0.1)
    layer = model.features.denseblock_5.denselayer_1
    assert layer.conv_1.out_channels == 2 * 128 and layer.conv_2.conv.groups == 2
    with pytest.raises(ValueError, match="bottleneck must be a positive integer"):
        condensenet74(bottleneck=0)


def test_densenet_lgc_transitions_compress_with_learned_group_convs():
    model = densenet_lgc((2, 2, 2), (4, 4, 4), reduction=0.375, group_1x1=4)
    first = model.features.transition_1.conv
    # 8 + 2*4 = 16 channels -> ceil(16 * 0.375) = 6, rounded up to a multiple of group_1x1: 8.
    assert isinstance(first, LearnedGroupConv) and (first.in_channels, first.out_channels) == (16, 8)
    assert model.features.denseblock_2.in_channels == 8
    condensed = condense(model)
    assert isinstance(condensed.features.transition_1.conv, CondensedConv)
    with pytest.raises(ValueError, match=r"densenet_lgc.s reduction\) must be in \(0, 1\]"):
        densenet_lgc((2, 2, 2), (4, 4, 4), reduction=0.0)


# ------------------------------------------------------------------------------- FLOPs, params

@pytest.mark.parametrize("build,input_size", [
    (lambda: condensenet_cifar(depth=14, growth_rates=(4, 8, 16)), (3, 32, 32)),
    (lambda: densenet_lgc((2, 2, 2), (4, 4, 4)), (3, 32, 32)),
])
def test_training_form_counts_at_its_condensed_cost(build, input_size):
    """As the official measure_model: a learned group conv costs 1/C of its dense 1x1 conv, so with C = G
    the training form counts what its condensed form (classifier unpruned) counts, at any stage."""
    model = build()
    before = count_flops_params(model, input_size)
    dense_ops.update_condensation(model, 1.0)
    assert count_flops_params(model, input_size) == before
    assert before == count_flops_params(condense(model, prune_classifier=False), input_size)
