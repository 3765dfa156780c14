"""Gaps found by a mutation audit of the model zoo: each test kills a mutant the contract
tests in test_models.py let through (init, option checks, strides and shapes, residual
wiring, attention against torch's reference, parameter counts)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.models import MODELS, NORM_TYPES, num_parameters
from sharpscope.models.resnet import resnet
from sharpscope.optim.samon import normalization_parameters

torch.set_num_threads(1)

MNIST1D, DIGITS, CIFAR = (40,), (1, 8, 8), (3, 32, 32)


def build(name, shape, num_classes=10, seed=0, **options):
    torch.manual_seed(seed)
    return MODELS[name](shape, num_classes, **options)


def convs(model):
    return [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]


# ------------------------------------------------------------------ init


def test_convs_use_he_fan_out_init():
    """std = sqrt(2 / (out_channels * kernel area)), the fan_out of torchvision's ResNet; the
    stem (3 -> 16 channels, fan_in 27 vs fan_out 144) and the stage-opening convs differ
    from fan_in by a factor of 2.3 and 1.4."""
    model = build("resnet20", CIFAR)
    checked = 0
    for conv in convs(model):
        fan_out = conv.out_channels * math.prod(conv.kernel_size)
        if conv.weight.numel() < 400:
            continue
        expected = math.sqrt(2.0 / fan_out)
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.15), conv
        checked += 1
    assert checked >= 20


@pytest.mark.parametrize(
    ("name", "shape", "options"),
    [
        ("resnet20", DIGITS, {"width": 4}),
        ("wrn", DIGITS, {"depth": 10, "width": 1}),
        ("cnn", DIGITS, {}),
        ("cnn1d", MNIST1D, {}),
    ],
)
def test_conv_biases_start_at_zero_without_norm(name, shape, options):
    model = build(name, shape, norm="none", **options)
    biases = [c.bias for c in convs(model)]
    assert biases and all(b is not None and torch.count_nonzero(b) == 0 for b in biases)


def test_wrn_head_bias_starts_at_zero():
    assert torch.count_nonzero(build("wrn", DIGITS, depth=10, width=1).head.bias) == 0


def residual_branch_ratio(model):
    """std of every block's second conv over that of its first (non-opening blocks:
    same shape, same He std before scaling)."""
    second, first = [], []
    for block in model.blocks:
        if block.conv1.in_channels == block.conv1.out_channels:
            first.append(block.conv1.weight.flatten())
            second.append(block.conv2.weight.flatten())
    return (torch.cat(second).std() / torch.cat(first).std()).item()


def test_unnormalized_resnet_scales_residual_branches_by_inverse_sqrt_of_block_count():
    # ResNet-56: 27 blocks, branch scale 27^-1/2 = 0.192 (not 1/27 = 0.037)
    model = build("resnet56", CIFAR, norm="none", width=8)
    assert residual_branch_ratio(model) == pytest.approx(27**-0.5, rel=0.05)


@pytest.mark.parametrize("norm", ["batch", "group", "layer"])
def test_normalized_resnet_branches_are_not_scaled(norm):
    model = build("resnet20", DIGITS, norm=norm)
    assert residual_branch_ratio(model) == pytest.approx(1.0, rel=0.1)


def test_vit_init_truncated_normal_002_and_zero_biases():
    model = build("vit", CIFAR)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    weights = torch.cat([m.weight.flatten() for m in linears])
    assert weights.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(torch.count_nonzero(m.bias) == 0 for m in linears)
    tokens = torch.cat([model.cls_token.flatten(), model.position.flatten()])
    assert tokens.std().item() == pytest.approx(0.02, rel=0.1)


# ------------------------------------------------------------------ option checking


@pytest.mark.parametrize(
    ("name", "shape", "options", "fragment"),
    [
        ("vit", DIGITS, {"dropout": float("nan")}, "dropout"),
        ("vit", DIGITS, {"mlp_ratio": float("inf")}, "mlp_ratio"),
        ("wrn", DIGITS, {"dropout": "nan"}, "dropout"),
    ],
    ids=str,
)
def test_non_finite_float_options_are_refused(name, shape, options, fragment):
    with pytest.raises(SharpscopeError, match=fragment):
        build(name, shape, **options)


@pytest.mark.parametrize(("name", "shape"), [("cnn", (1, 0, 8)), ("mlp", (0,)), ("cnn1d", (0,))])
def test_empty_input_dimensions_are_refused(name, shape):
    with pytest.raises(SharpscopeError, match="expects inputs of shape"):
        build(name, shape)


def test_bool_num_classes_is_refused():
    with pytest.raises(SharpscopeError, match="num_classes"):
        MODELS["mlp"](MNIST1D, True)


@pytest.mark.parametrize("depth", [2, -4])
def test_resnet_needs_at_least_one_block_per_stage(depth):
    with pytest.raises(SharpscopeError, match="6n \\+ 2"):
        resnet(CIFAR, 10, depth=depth)


def test_num_parameters_counts_only_trainable_ones():
    model = build("mlp", MNIST1D, width=8, depth=1)
    total = 40 * 8 + 8 + 8 * 10 + 10
    assert num_parameters(model) == total
    model.net[1].weight.requires_grad_(False)
    assert num_parameters(model) == total - 40 * 8


# ------------------------------------------------------------------ normalization parameters


NORMED = [
    ("mlp", MNIST1D, {"width": 16}, ["batch", "layer"]),
    ("cnn1d", MNIST1D, {"width": 8}, ["batch", "layer"]),
    ("cnn", DIGITS, {}, ["batch", "layer"]),
    ("resnet20", DIGITS, {"width": 4}, ["batch", "layer", "group"]),
    ("wrn", DIGITS, {"depth": 10, "width": 1}, ["batch", "layer", "group"]),
]


@pytest.mark.parametrize(
    ("name", "shape", "options", "norm"),
    [(name, shape, options, norm) for name, shape, options, norms in NORMED for norm in norms],
    ids=str,
)
def test_every_norm_layer_has_a_scale_and_shift_that_sam_on_perturbs(name, shape, options, norm):
    """SAM-ON perturbs exactly the affine parameters of the norm layers: two per layer, of
    the layer's width, and nothing else."""
    model = build(name, shape, norm=norm, **options)
    layers = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    assert layers
    expected = []
    for m in layers:
        width = m.num_channels if isinstance(m, nn.GroupNorm) else m.weight.shape[0]
        assert m.weight is not None and m.bias is not None, m
        assert m.weight.shape == m.bias.shape == (width,)
        expected += [m.weight, m.bias]
    found = [p for _, p in normalization_parameters(model)]
    assert [id(p) for p in found] == [id(p) for p in expected]


def test_vit_norm_parameters_are_its_layer_norms():
    model = build("vit", DIGITS, dim=16, depth=2, heads=2)
    names = [n for n, _ in normalization_parameters(model)]
    assert names == [
        f"{prefix}.{kind}"
        for prefix in (
            "blocks.0.norm1",
            "blocks.0.norm2",
            "blocks.1.norm1",
            "blocks.1.norm2",
            "norm",
        )
        for kind in ("weight", "bias")
    ]


# ------------------------------------------------------------------ layouts, strides


def test_cnn1d_blocks_halve_the_length():
    model = build("cnn1d", MNIST1D)
    features = model.features(torch.zeros(2, 1, 40))
    assert features.shape == (2, 32, 5)  # 40 -> 20 -> 10 -> 5
    assert [c.stride for c in convs(model)] == [(2,)] * 3
    assert [c.padding for c in convs(model)] == [(2,)] * 3


def test_cnn_pools_only_between_blocks_and_doubles_the_width():
    model = build("cnn", CIFAR, depth=3)
    kinds = [type(m).__name__ for m in model.features]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] * 2 + [
        "Conv2d",
        "BatchNorm2d",
        "ReLU",
    ]
    assert [c.out_channels for c in convs(model)] == [8, 16, 32]
    assert model.features(torch.zeros(1, *CIFAR)).shape == (1, 32, 8, 8)
    count = 3 * 8 * 9 + 8 * 16 * 9 + 16 * 32 * 9 + 2 * (8 + 16 + 32)
    assert num_parameters(model) == count + (32 * 128 + 128) + (128 * 10 + 10)


def test_mlp_layers_are_linear_norm_activation():
    model = build("mlp", MNIST1D, width=8, depth=2, norm="batch", activation="tanh")
    kinds = [type(m) for m in model.net]
    assert kinds == [nn.Flatten] + [nn.Linear, nn.BatchNorm1d, nn.Tanh] * 2 + [nn.Linear]
    gelu = build("mlp", MNIST1D, width=8, depth=1, norm="layer", activation="gelu")
    assert [type(m) for m in gelu.net] == [nn.Flatten, nn.Linear, nn.LayerNorm, nn.GELU, nn.Linear]


def stage_outputs(model, stem, x):
    sizes = []
    h = stem(x)
    for block in model.blocks:
        h = block(h)
        sizes.append(tuple(h.shape[1:]))
    return sizes


def test_resnet_downsamples_at_the_start_of_stages_two_and_three_only():
    model = build("resnet20", CIFAR, width=4).eval()
    with torch.no_grad():
        sizes = stage_outputs(
            model, lambda x: F.relu(model.norm(model.conv(x))), torch.zeros(1, *CIFAR)
        )
    assert sizes == [(4, 32, 32)] * 3 + [(8, 16, 16)] * 3 + [(16, 8, 8)] * 3


def test_wrn_downsamples_at_the_start_of_stages_two_and_three_only():
    model = build("wrn", CIFAR, depth=16, width=1).eval()
    with torch.no_grad():
        sizes = stage_outputs(model, model.conv, torch.zeros(1, *CIFAR))
    assert sizes == [(16, 32, 32)] * 2 + [(32, 16, 16)] * 2 + [(64, 8, 8)] * 2


def test_option_a_shortcut_subsamples_and_appends_zero_channels():
    model = build("resnet20", CIFAR, width=4, shortcut="A")
    block = model.blocks[3]  # first block of stage 2: 4 -> 8 channels, stride 2
    x = torch.randn(2, 4, 10, 10)
    expected = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 4, 5, 5)], dim=1)
    torch.testing.assert_close(block.shortcut(x), expected, rtol=0, atol=0)


def test_resnet_block_applies_relu_after_the_sum():
    model = build("resnet20", DIGITS, width=4).eval()
    x = torch.randn(4, 4, 8, 8)  # a negative input: relu(F(x)) + x would be negative
    with torch.no_grad():
        out = model.blocks[0](x)
        block = model.blocks[0]
        expected = F.relu(block.norm2(block.conv2(F.relu(block.norm1(block.conv1(x))))) + x)
    assert out.min() >= 0
    torch.testing.assert_close(out, expected)


def test_resnet_forward_is_stem_relu_blocks_pool_head():
    model = build("resnet20", DIGITS, width=4, norm="none").eval()
    x = torch.randn(3, *DIGITS)
    with torch.no_grad():
        expected = model.head(model.blocks(F.relu(model.conv(x))).mean(dim=(2, 3)))
        torch.testing.assert_close(model(x), expected)


def test_wrn_block_projects_the_pre_activated_input():
    model = build("wrn", DIGITS, depth=10, width=2).eval()
    block = model.blocks[0]  # 16 -> 32 channels: a projection shortcut
    assert block.projection is not None
    with torch.no_grad():
        for m in block.modules():  # non-trivial norm statistics and affine
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.bias.uniform_(-1, 1)
        x = torch.randn(2, 16, 8, 8)
        a = F.relu(block.norm1(x))
        expected = block.conv2(F.relu(block.norm2(block.conv1(a)))) + block.projection(a)
        torch.testing.assert_close(block(x), expected)


def test_wrn_forward_ends_with_norm_relu_pool_head():
    model = build("wrn", DIGITS, depth=10, width=1).eval()
    with torch.no_grad():
        model.norm.bias.fill_(-0.5)  # some pre-activations negative: the relu matters
        x = torch.randn(3, *DIGITS)
        h = F.relu(model.norm(model.blocks(model.conv(x))))
        torch.testing.assert_close(model(x), model.head(h.mean(dim=(2, 3))))


def test_wrn_dropout_sits_between_the_convs_on_activated_features():
    model = build("wrn", DIGITS, depth=10, width=1, dropout=0.5).train()
    block = model.blocks[1]
    seen = {}
    block.dropout.register_forward_hook(lambda _m, args, out: seen.update(into=args[0], out=out))
    block.conv2.register_forward_pre_hook(lambda _m, args: seen.update(conv2=args[0]))
    model(torch.randn(4, *DIGITS))
    assert seen["into"].min() >= 0  # after norm2 and the ReLU
    assert torch.equal(seen["conv2"], seen["out"])  # the second conv reads the dropped features


# ------------------------------------------------------------------ ViT


def test_vit_attention_matches_torch_multihead_attention():
    torch.manual_seed(0)
    dim, heads = 16, 4
    model = build("vit", DIGITS, dim=dim, depth=1, heads=heads)
    attention = model.blocks[0].attention
    with torch.no_grad():
        attention.qkv.bias.normal_()
        attention.proj.bias.normal_()
    reference = nn.MultiheadAttention(dim, heads, batch_first=True)
    with torch.no_grad():
        reference.in_proj_weight.copy_(attention.qkv.weight * 20)
        reference.in_proj_bias.copy_(attention.qkv.bias)
        reference.out_proj.weight.copy_(attention.proj.weight)
        reference.out_proj.bias.copy_(attention.proj.bias)
        attention.qkv.weight.mul_(20)  # sharp attention weights: the scaling matters
    x = torch.randn(2, 5, dim)
    with torch.no_grad():
        expected, _ = reference(x, x, x, need_weights=False)
        torch.testing.assert_close(attention(x), expected, rtol=1e-4, atol=1e-5)


def test_vit_blocks_are_pre_norm():
    model = build("vit", DIGITS, dim=16, depth=1, heads=2).eval()
    block = model.blocks[0]
    with torch.no_grad():
        block.norm1.bias.normal_()
        block.norm2.weight.normal_()
        x = 3 * torch.randn(2, 5, 16) + 1
        h = x + block.attention(block.norm1(x))
        torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))


def test_vit_head_reads_the_class_token():
    model = build("vit", DIGITS, patch=4, dim=16, depth=1, heads=2).eval()
    x = torch.randn(2, *DIGITS)
    with torch.no_grad():
        patches = model.embed(x).flatten(2).transpose(1, 2)
        assert patches.shape == (2, 4, 16)  # 8x8 image, 4x4 patches
        tokens = torch.cat([model.cls_token.expand(2, -1, -1), patches], 1) + model.position
        expected = model.head(model.norm(model.blocks(tokens))[:, 0])
        torch.testing.assert_close(model(x), expected)


def test_vit_mlp_width_and_parameter_count():
    dim, depth, ratio, patch = 16, 2, 1.5, 4
    model = build("vit", CIFAR, patch=patch, dim=dim, depth=depth, heads=2, mlp_ratio=ratio)
    hidden = round(dim * ratio)
    assert model.blocks[0].mlp[0].out_features == hidden == 24
    tokens = (32 // patch) ** 2 + 1
    embed = 3 * patch * patch * dim + dim
    block = 2 * 2 * dim + (dim * 3 * dim + 3 * dim) + (dim * dim + dim)
    block += (dim * hidden + hidden) + (hidden * dim + dim)
    total = embed + dim + tokens * dim + depth * block + 2 * dim + dim * 10 + 10
    assert num_parameters(model) == total


def test_vit_dropout_acts_on_the_embedded_tokens():
    model = build("vit", DIGITS, dim=64, depth=1, heads=2, dropout=0.5).train()
    seen = []
    model.blocks.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    model(torch.randn(8, *DIGITS))
    zeros = (seen[0] == 0).float().mean().item()
    assert 0.4 < zeros < 0.6
    model.eval()
    seen.clear()
    model(torch.randn(8, *DIGITS))
    assert (seen[0] == 0).float().mean().item() < 0.01
