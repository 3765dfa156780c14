"""Contract tests for the model zoo (sharpscope.models)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.models import MODELS, NORM_TYPES, model_names, num_parameters
from sharpscope.models.norm import MODELS_FOR_RANK, num_groups
from sharpscope.models.resnet import resnet
from sharpscope.registry import build_model

torch.set_num_threads(1)

MNIST1D, DIGITS, CIFAR = (40,), (1, 8, 8), (3, 32, 32)

# which of the canonical shapes each model accepts (the others must be refused)
SUPPORTED = {
    "mlp": {MNIST1D, DIGITS, CIFAR},
    "cnn1d": {MNIST1D},
    "cnn": {DIGITS, CIFAR},
    "resnet": {DIGITS, CIFAR},
    "resnet20": {DIGITS, CIFAR},
    "resnet32": {DIGITS, CIFAR},
    "resnet56": {DIGITS, CIFAR},
    "wrn": {DIGITS, CIFAR},
    "vit": {MNIST1D, DIGITS, CIFAR},
}
# further shapes each model must handle: channels-first sequences, odd image sizes
EXTRA_SHAPES = {
    "mlp": [(2, 3)],
    "cnn1d": [(2, 40), (3, 7)],
    "cnn": [(3, 10, 14), (2, 1, 1)],
    "resnet": [(3, 10, 14)],
    "resnet20": [(3, 10, 14), (2, 1, 1)],
    "resnet32": [],
    "resnet56": [],
    "wrn": [(3, 10, 14)],
    "vit": [(2, 40), (3, 12, 8)],
}
# small settings for the tests that run backward passes
SMALL = {
    "mlp": ((40,), {"width": 16}),
    "cnn1d": ((40,), {"width": 8}),
    "cnn": ((1, 8, 8), {}),
    "resnet": ((3, 8, 8), {"width": 2, "depth": 8}),
    "resnet20": ((3, 8, 8), {"width": 4}),
    "resnet32": ((3, 8, 8), {"width": 2}),
    "resnet56": ((3, 8, 8), {"width": 2}),
    "wrn": ((3, 8, 8), {"depth": 10, "width": 1}),
    "vit": ((3, 8, 8), {"dim": 16, "depth": 2, "heads": 2}),
}


def build(name, shape, num_classes=10, seed=0, **options):
    torch.manual_seed(seed)
    return MODELS[name](shape, num_classes, **options)


def norm_modules(model):
    return [m for m in model.modules() if isinstance(m, NORM_TYPES)]


def test_registry_names():
    assert model_names() == sorted(SUPPORTED)
    assert set(MODELS) == set(SUPPORTED)


@pytest.mark.parametrize("shape", [MNIST1D, DIGITS, CIFAR], ids=["mnist1d", "digits", "cifar"])
@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_builds_on_canonical_shapes_or_refuses(name, shape):
    if shape not in SUPPORTED[name]:
        with pytest.raises(SharpscopeError, match=name):
            build(name, shape)
        return
    model = build(name, shape, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    ("name", "shape"), [(n, s) for n, shapes in EXTRA_SHAPES.items() for s in shapes], ids=str
)
def test_builds_on_other_shapes(name, shape):
    model = build(name, shape, num_classes=3, **SMALL[name][1]).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *shape))
    assert out.shape == (2, 3)


# ------------------------------------------------------------------ parameter counts


def resnet_count(in_channels, width, n, num_classes, shortcut):
    """CIFAR ResNet count from He et al. (2016), Sec. 4.2, with BatchNorm."""
    widths = [width, 2 * width, 4 * width]
    total = 9 * in_channels * width + 2 * width  # stem conv + norm
    prev = width
    for w in widths:
        for i in range(n):
            c_in = prev if i == 0 else w
            total += 9 * c_in * w + 9 * w * w + 2 * (2 * w)
            if shortcut == "B" and c_in != w:
                total += c_in * w + 2 * w
        prev = w
    return total + widths[-1] * num_classes + num_classes


def wrn_count(in_channels, depth, k, num_classes):
    """WRN-d-k count from Zagoruyko & Komodakis (2016), Table 1, pre-activation blocks."""
    n = (depth - 4) // 6
    total = 9 * in_channels * 16
    prev = 16
    for w in (16 * k, 32 * k, 64 * k):
        for i in range(n):
            c_in = prev if i == 0 else w
            total += 2 * c_in + 9 * c_in * w + 2 * w + 9 * w * w
            if c_in != w:
                total += c_in * w
        prev = w
    return total + 2 * prev + prev * num_classes + num_classes


def test_cnn_on_digits_has_about_3000_parameters():
    count = num_parameters(build("cnn", DIGITS))
    assert 2000 <= count <= 4000
    # 3x3 convs 1->8->16 without bias, BatchNorm scale+shift, head 16 -> 64 -> 10
    assert count == 9 * 8 + 9 * 8 * 16 + 2 * (8 + 16) + (16 * 64 + 64) + (64 * 10 + 10)


def test_cnn1d_default_size():
    count = num_parameters(build("cnn1d", MNIST1D))
    assert 10_000 <= count <= 20_000
    assert count == 5 * 32 + 2 * 5 * 32 * 32 + 3 * 2 * 32 + 32 * 10 + 10


@pytest.mark.parametrize("name", ["resnet20", "resnet32", "resnet56"])
@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_parameter_count(name, shortcut):
    depth = int(name.removeprefix("resnet"))
    model = build(name, CIFAR, shortcut=shortcut)
    assert num_parameters(model) == resnet_count(3, 16, (depth - 2) // 6, 10, shortcut)


def test_resnet20_matches_published_size():
    # 0.27M (He et al. 2016, Table 6); the common PyTorch port with option A has 269,722
    assert num_parameters(build("resnet20", CIFAR, shortcut="A")) == 269_722
    assert num_parameters(build("resnet20", CIFAR, width=32)) == resnet_count(3, 32, 3, 10, "B")


def test_wrn_16_4_and_28_10_build_with_published_sizes():
    assert num_parameters(build("wrn", CIFAR)) == wrn_count(3, 16, 4, 10) == 2_748_890
    big = build("wrn", CIFAR, depth=28, width=10)
    # WRN-28-10: 36.5M parameters (paper, Table 4)
    assert num_parameters(big) == wrn_count(3, 28, 10, 10) == 36_479_194


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_unknown_option_names_valid_options(name):
    shape = next(iter(sorted(SUPPORTED[name], key=len)))
    with pytest.raises(SharpscopeError) as info:
        build(name, shape, bogus=1)
    message = str(info.value)
    assert "\n" not in message and "bogus" in message
    valid = {"mlp": ["width", "depth", "activation", "norm"], "cnn1d": ["width", "depth", "norm"]}
    valid["cnn"] = valid["cnn1d"]
    valid |= {f"resnet{d}": ["width", "norm", "shortcut"] for d in (20, 32, 56)}
    valid["resnet"] = ["depth", *valid["resnet20"]]
    valid["wrn"] = ["depth", "width", "dropout", "norm"]
    valid["vit"] = ["patch", "dim", "depth", "heads", "mlp_ratio", "dropout"]
    for option in valid[name]:
        assert option in message


@pytest.mark.parametrize(
    ("name", "shape", "options", "fragment"),
    [
        ("mlp", MNIST1D, {"norm": "bn"}, "none|batch|layer"),
        ("mlp", MNIST1D, {"activation": "swish"}, "relu|tanh|gelu"),
        ("mlp", MNIST1D, {"depth": -1}, "depth"),
        ("mlp", MNIST1D, {"width": "wide"}, "width"),
        ("mlp", MNIST1D, {"width": True}, "width"),
        ("cnn1d", MNIST1D, {"norm": "group"}, "batch|layer|none"),
        ("cnn", DIGITS, {"depth": 0}, "depth"),
        ("cnn", DIGITS, {"width": 2.5}, "width"),
        ("resnet20", CIFAR, {"shortcut": "C"}, "A|B"),
        ("resnet20", CIFAR, {"norm": "instance"}, "batch|layer|group|none"),
        ("wrn", CIFAR, {"depth": 15}, "6n + 4"),
        ("wrn", CIFAR, {"depth": 27}, "6n + 4"),
        ("wrn", CIFAR, {"depth": 4}, "depth"),
        ("wrn", CIFAR, {"dropout": 1.0}, "dropout"),
        ("vit", CIFAR, {"heads": 3}, "divisible by heads"),
        ("vit", CIFAR, {"patch": 5}, "patch"),
        ("vit", MNIST1D, {"patch": 3}, "patch"),
        ("vit", CIFAR, {"mlp_ratio": 0}, "mlp_ratio"),
    ],
    ids=str,
)
def test_bad_values_raise_one_line(name, shape, options, fragment):
    with pytest.raises(SharpscopeError) as info:
        build(name, shape, **options)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_resnet_depth_must_be_6n_plus_2():
    with pytest.raises(SharpscopeError, match="6n \\+ 2"):
        resnet(CIFAR, 10, depth=21)
    assert num_parameters(resnet(CIFAR, 10, depth=44)) == resnet_count(3, 16, 7, 10, "B")


@pytest.mark.parametrize("num_classes", [0, -3, 2.5])
def test_bad_num_classes(num_classes):
    with pytest.raises(SharpscopeError, match="num_classes"):
        MODELS["mlp"](MNIST1D, num_classes)


def test_option_strings_from_command_line_are_converted():
    model = build("resnet20", DIGITS, width="8", norm="Group", shortcut="a")
    assert model.conv.out_channels == 8
    assert all(m.num_groups == num_groups(m.num_channels) for m in norm_modules(model))
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    assert build("wrn", DIGITS, depth="10", width=1, dropout="0.3").blocks[0].dropout.p == 0.3


# ------------------------------------------------------------------ normalization


def norm_kinds(model):
    kinds = set()
    for m in norm_modules(model):
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            kinds.add("batch")
        elif isinstance(m, nn.LayerNorm) or (isinstance(m, nn.GroupNorm) and m.num_groups == 1):
            kinds.add("layer")
        else:
            kinds.add("group")
    return kinds


@pytest.mark.parametrize(
    ("name", "shape", "norms", "default"),
    [
        ("mlp", MNIST1D, ["none", "batch", "layer"], "none"),
        ("cnn1d", MNIST1D, ["batch", "layer", "none"], "batch"),
        ("cnn", DIGITS, ["batch", "layer", "none"], "batch"),
        ("resnet20", DIGITS, ["batch", "layer", "group", "none"], "batch"),
        ("wrn", DIGITS, ["batch", "layer", "group", "none"], "batch"),
    ],
)
def test_norm_option_gives_the_right_module_types(name, shape, norms, default):
    small = {"wrn": {"depth": 10, "width": 2}}.get(name, {})
    assert norm_kinds(build(name, shape, **small)) == ({default} - {"none"})
    for norm in norms:
        model = build(name, shape, norm=norm, **small)
        assert norm_kinds(model) == ({norm} - {"none"})
        convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
        # a conv carries a bias exactly when no norm layer follows it
        assert all((c.bias is not None) == (norm == "none") for c in convs)


def test_norm_layer_counts():
    # ResNet-20: stem + 2 per block + 2 projection shortcuts (option B)
    assert len(norm_modules(build("resnet20", DIGITS))) == 1 + 2 * 9 + 2
    assert len(norm_modules(build("resnet20", DIGITS, shortcut="A"))) == 1 + 2 * 9
    # WRN-16-4: 2 per block + the final one
    assert len(norm_modules(build("wrn", DIGITS, width=1))) == 2 * 6 + 1
    # cnn1d with norm="layer" uses GroupNorm(1, C) after each conv
    layer = norm_modules(build("cnn1d", MNIST1D, norm="layer"))
    assert [type(m) for m in layer] == [nn.GroupNorm] * 3
    assert all(m.num_groups == 1 for m in layer)
    # ViT: pre-norm, two LayerNorms per block and a final one
    vit = build("vit", DIGITS, depth=3)
    assert [type(m) for m in norm_modules(vit)] == [nn.LayerNorm] * 7


def test_layer_norm_on_conv_features_normalizes_over_channels_and_space():
    model = build("cnn1d", MNIST1D, norm="layer", depth=1)
    conv, norm = model.features[0], model.features[1]
    z = conv(torch.randn(4, 1, 40))
    expected = F.layer_norm(z, z.shape[1:])  # LN over (C, L), unit affine at init
    torch.testing.assert_close(norm(z), expected, rtol=1e-5, atol=1e-5)


def test_unnormalized_resnet56_starts_with_bounded_activations():
    model = build("resnet56", CIFAR, norm="none").eval()
    x = torch.randn(16, *CIFAR)
    with torch.no_grad():
        stem = F.relu(model.conv(x))
        deep = model.blocks(stem)
    # without the 1/sqrt(L) branch scaling the second moment grows ~2^27 over 27 blocks
    ratio = (deep.pow(2).mean() / stem.pow(2).mean()).item()
    assert 0.1 < ratio < 10


# ------------------------------------------------------------------ determinism, gradients


@pytest.mark.parametrize("name", sorted(SMALL))
def test_deterministic_under_manual_seed(name):
    shape, options = SMALL[name]
    a = build(name, shape, seed=3, **options).state_dict()
    b = build(name, shape, seed=3, **options).state_dict()
    c = build(name, shape, seed=4, **options).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def small_batch(shape, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_gradients_reach_every_parameter(name):
    shape, options = SMALL[name]
    model = build(name, shape, **options).train()
    x, y = small_batch(shape)
    F.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def warm_up_running_stats(model, shape, steps=3):
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(small_batch(shape, n=8, seed=100 + i)[0] * 2 + 0.5)
    return model.eval()


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("mlp", {"norm": "batch", "width": 16}),
        ("cnn1d", {}),
        ("cnn", {}),
        ("resnet20", {"width": 4}),
        ("resnet20", {"width": 4, "norm": "group"}),
        ("wrn", {"depth": 10, "width": 1}),
        ("vit", {"dim": 16, "depth": 2, "heads": 2}),
    ],
    ids=str,
)
def test_eval_outputs_do_not_depend_on_batch_composition(name, options):
    shape = MNIST1D if name in ("mlp", "cnn1d") else DIGITS
    model = warm_up_running_stats(build(name, shape, **options), shape)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert all(m.running_mean.abs().sum() > 0 for m in bns)  # the stats really moved
    x, _ = small_batch(shape, n=5)
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(len(x))])
        reordered = model(x.flip(0)).flip(0)
    torch.testing.assert_close(alone, batched, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reordered, batched, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_hessian_vector_product_matches_finite_differences(name):
    """Double backward works (the Hessian engine needs it) and agrees with central
    differences of the gradient in float64, in eval mode."""
    shape, options = SMALL[name]
    model = warm_up_running_stats(build(name, shape, **options), shape).double()
    params = [p for p in model.parameters()]
    x, y = small_batch(shape)
    x = x.double()
    g = torch.Generator().manual_seed(1)
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]

    def grads():
        return torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)

    gv = sum((a * b).sum() for a, b in zip(grads(), v))
    hv = torch.cat([h.flatten() for h in torch.autograd.grad(gv, params)])

    # ReLU kinks: a step h moves pre-activations by ~h, and with ~1e4 units a step of
    # 1e-5 already crosses a few kinks, so use h = 1e-7 (rounding error ~1e-16/h ≈ 1e-9)
    h = 1e-7
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(d, alpha=h)
    plus = torch.cat([t.flatten() for t in grads()]).detach()
    with torch.no_grad():
        for p, d in zip(params, v):
            p.add_(d, alpha=-2 * h)
    minus = torch.cat([t.flatten() for t in grads()]).detach()
    fd = (plus - minus) / (2 * h)
    assert torch.linalg.vector_norm(hv - fd) <= 1e-6 * torch.linalg.vector_norm(hv)


def test_a_fixed_depth_resnet_refuses_a_depth_option():
    with pytest.raises(SharpscopeError, match="has its depth in its name"):
        build_model({"name": "resnet20", "depth": 20}, (3, 32, 32), 10)


def test_the_advice_for_another_resnet_depth_works():
    # bug B1 (session 29): the refusal named a model `resnet` that was not registered
    with pytest.raises(SharpscopeError) as info:
        build_model({"name": "resnet56", "depth": 110}, CIFAR, 10)
    assert "--model resnet --model-opt depth=N" in str(info.value)
    assert '{name = "resnet", depth = N}' in str(info.value)
    # He et al.'s ResNet-44 and -110 (0.66M and 1.7M, option A), from the command line's text
    for depth, count in (("44", 658_586), (110, 1_727_962), (20.0, 269_722)):
        model = build_model({"name": "resnet", "depth": depth, "shortcut": "a"}, CIFAR, 10)
        assert num_parameters(model) == count
    assert num_parameters(build_model("resnet", CIFAR, 10)) == num_parameters(
        build_model("resnet20", CIFAR, 10)
    )
    for bad in (21, 2, "x", 20.5):
        with pytest.raises(SharpscopeError, match="'resnet'.*depth"):
            build_model({"name": "resnet", "depth": bad}, CIFAR, 10)


def test_a_fixed_depth_resnet_lists_no_depth_option():
    with pytest.raises(SharpscopeError) as info:
        build_model({"name": "resnet20", "bogus": 1}, CIFAR, 10)
    assert "depth" not in str(info.value)


def test_resolved_resnet_spec_records_its_depth():
    from sharpscope.models import resolved_model_spec

    assert resolved_model_spec({"name": "resnet", "depth": "44"}) == {
        "name": "resnet",
        "depth": 44,
        "width": 16,
        "norm": "batch",
        "shortcut": "B",
    }


def test_is_norm_layer_counts_what_samon_counts():
    """D8 (session 29): is_norm_layer left out InstanceNorm and RMSNorm, which SAM-ON's set
    N (optimizers.md) includes; a user finding norm layers with it missed them."""
    from sharpscope.models import is_norm_layer
    from sharpscope.optim.samon import normalization_parameters

    layers = [nn.InstanceNorm1d(3, affine=True), nn.LayerNorm(3), nn.BatchNorm1d(3)]
    if hasattr(nn, "RMSNorm"):
        layers.append(nn.RMSNorm(3))
    assert all(is_norm_layer(layer) for layer in layers)
    assert not is_norm_layer(nn.Linear(3, 3))
    model = nn.Sequential(*layers)
    found = {name.split(".")[0] for name, _ in normalization_parameters(model)}
    assert found == {str(i) for i, m in enumerate(model) if is_norm_layer(m)}


def test_readme_documents_the_resnet_shortcut_and_its_parameter_counts():
    """D4 (session 29): the README listed only `norm` for the ResNets, so that the default
    shortcut B, unlike He et al.'s CIFAR option A, went unnoticed (both round to 0.27M)."""
    from pathlib import Path

    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert "`shortcut=A|B`" in readme and "`--model-opt shortcut=A`" in readme
    for shortcut in ("A", "B"):
        count = num_parameters(build("resnet20", CIFAR, shortcut=shortcut))
        assert f"{count:,}" in readme


@pytest.mark.parametrize("rank", sorted(MODELS_FOR_RANK))
def test_a_refused_shape_names_the_models_that_take_it(rank):
    """`train --dataset digits` without --model (cnn1d, the default, on 8x8 images) said only
    which shape cnn1d expects; it now names the models for such inputs, each of which builds."""
    shape = {1: (40,), 2: (1, 40), 3: (3, 32, 32)}[rank]
    for name in MODELS_FOR_RANK[rank]:
        build_model({"name": name}, shape, 10)
    assert set(model_names()) <= {n for names in MODELS_FOR_RANK.values() for n in names}
    other = "cnn" if rank < 3 else "cnn1d"
    with pytest.raises(SharpscopeError) as info:
        build_model({"name": other}, shape, 10)
    assert str(info.value).endswith(
        f"the models for inputs like these are {', '.join(MODELS_FOR_RANK[rank])}"
    )


def test_a_choice_given_with_spaces_from_a_shell_is_read():
    """`--model-opt "norm= layer"` said "norm=' layer' is invalid (not a valid choice)"."""
    model = build_model({"name": "mlp", "norm": " Layer "}, (8,), 3)
    assert any(isinstance(m, nn.LayerNorm) for m in model.modules())


def test_a_vit_patch_that_does_not_divide_the_image_names_each_size_once():
    """It said "choose a patch that divides 32 and 32"."""
    with pytest.raises(SharpscopeError, match=r"choose a patch that divides 32$"):
        build_model({"name": "vit", "patch": 5}, (3, 32, 32), 10)
    with pytest.raises(SharpscopeError, match=r"choose a patch that divides 24 and 32$"):
        build_model({"name": "vit", "patch": 5}, (3, 32, 24), 10)


@pytest.mark.parametrize("name", MODELS_FOR_RANK[3])
def test_channels_last_images_are_warned_about_once_in_one_line(name):
    """Session 29 (models D7): a data factory's (N, 32, 32, 3) images built a network with
    32 input channels over 32 x 3 pixels and trained without a word. The mlp flattens its
    input, for which the order of the axes is only a permutation of its first layer."""
    if name == "mlp":
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            build_model({"name": name}, (32, 32, 3), 10)
        return
    options = {"patch": 1} if name == "vit" else {}
    with pytest.warns(RuntimeWarning, match=r"look channels-last") as caught:
        build_model({"name": name, **options}, (32, 32, 3), 10)
    (warning,) = [w for w in caught if "channels-last" in str(w.message)]
    assert "x.permute(0, 3, 1, 2)" in str(warning.message)
    assert "\n" not in str(warning.message) and warning.filename == __file__
    for shape in ((3, 32, 32), (1, 28, 28), (4, 8, 8), (3, 4, 3)):  # channels first
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            build_model({"name": name, **options}, shape, 10)
