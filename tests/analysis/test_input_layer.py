"""Precomputed input layers along a landscape slice: the same grid as evaluating every
layer at every point, and only for layers whose input does not depend on the weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.analysis._functional import ParamLayout, flat_parameters
from sharpscope.analysis.input_layer import (
    PrecomputedInputLayers,
    fan_in,
    find_input_layers,
)
from sharpscope.analysis.landscape import LandscapeResult, landscape
from sharpscope.curvature.fold import fold_batchnorm
from sharpscope.errors import SharpscopeError

from cases import bn_conv1d

torch.set_num_threads(1)
F64 = torch.float64


def image_mlp(seed=0):
    """A first layer with fan-in 108: precomputed by default for 1-D and 2-D slices."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(108, 9), nn.ReLU(), nn.Linear(9, 8), nn.Tanh(), nn.Linear(8, 3)
    ).to(F64)


def bn_cnn(seed=0):
    return bn_conv1d(2, 6, seed=seed)


def data(n, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


def assert_same_grid(a, b, rtol=1e-12):
    torch.testing.assert_close(a.loss, b.loss, rtol=rtol, atol=0)
    torch.testing.assert_close(a.accuracy, b.accuracy, rtol=0, atol=0)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("bias", ["ignore", "normalize"])  # "normalize": the bias moves too
def test_image_mlp_is_precomputed_by_default_and_gives_the_same_grid(dims, bias):
    net = image_mlp()
    x, y = data(40, (3, 6, 6))
    kw = {"grid": 5, "bias": bias, "vectorize": False, "batch_size": 16}  # 16 + 16 + 8
    fast = landscape(net, (x, y), dims, **kw)
    every = landscape(net, (x, y), dims, precompute_input=False, **kw)
    assert fast.settings["input_layers"] == ["1"] and every.settings["input_layers"] == []
    assert_same_grid(fast, every)
    assert "forward" not in vars(net[1])  # the user's model is not changed


def test_folded_batchnorm_moving_with_the_slice_is_applied_to_the_combination():
    """bias="normalize" moves the BatchNorm scale and shift: the folded affine map must be
    the point's own, applied after the precomputed combination."""
    net = bn_cnn()
    x, y = data(24, (12,))
    kw = {"grid": 5, "bias": "normalize", "vectorize": False}
    fast = landscape(net, (x, y), 2, precompute_input=True, **kw)
    plain = landscape(net, (x, y), 2, precompute_input=False, fold_bn=False, **kw)
    assert fast.settings["input_layers"] == ["1"] and fast.settings["bn_folded"] == ["2"]
    assert_same_grid(fast, plain)
    unfolded = landscape(net, (x, y), 2, precompute_input=True, fold_bn=False, **kw)
    assert unfolded.settings["input_layers"] == ["1"]
    assert_same_grid(unfolded, plain)


def test_interpolation_with_moving_batchnorm_statistics():
    a, b = bn_cnn(seed=0), bn_cnn(seed=1)
    x, y = data(24, (12,))
    kw = {"directions": b, "grid": 9, "vectorize": False}
    fast = landscape(a, (x, y), 1, precompute_input=True, **kw)
    every = landscape(a, (x, y), 1, precompute_input=False, **kw)
    assert fast.states and fast.settings["input_layers"] == ["1"]
    assert_same_grid(fast, every)


def test_small_fan_in_is_left_to_the_layer_unless_asked():
    net = bn_cnn()  # Conv1d(2, 4, 3): fan-in 6, cheaper than combining 3 stored outputs
    assert fan_in(net[1]) == 6 and fan_in(image_mlp()[1]) == 108
    x, y = data(16, (12,))
    kw = {"grid": 3, "vectorize": False}
    assert landscape(net, (x, y), 2, **kw).settings["input_layers"] == []
    asked = landscape(net, (x, y), 2, precompute_input=True, **kw)
    assert asked.settings["input_layers"] == ["1"]
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    built, why = PrecomputedInputLayers.build(
        net.eval(), layout, theta, torch.zeros(2, layout.size, dtype=F64), [(x, y)]
    )
    assert (
        built is None
        and why == "the input layer 1 has fan-in 6, under the 96 where precomputing pays"
    )
    # asked for, but nothing reads the data directly: said, and evaluated as usual
    scaled = nn.Sequential(Scale(), nn.Linear(12, 3)).to(F64)
    with pytest.warns(RuntimeWarning, match="no linear or convolution layer reads the data"):
        r = landscape(scaled, (x, y), 2, precompute_input=True, **kw)
    assert r.settings["input_layers"] == []


class Scale(nn.Module):
    """A learned input scale: the next layer's input depends on a parameter."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * self.scale


class Twice(nn.Module):
    """One layer applied to both halves of the input (shared weights)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 4)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.cat([self.shared(x[:, :6]), self.shared(x[:, 6:])], 1))


def _found(model, x):
    model = model.to(F64).eval()
    return find_input_layers(model, ParamLayout.of(model), x)


def test_only_layers_whose_input_is_independent_of_the_weights_qualify():
    x = torch.randn(5, 12, dtype=F64)
    assert _found(nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 3)), x) == ["0"]
    assert _found(nn.Sequential(Scale(), nn.Linear(12, 3)), x) == []
    # running statistics before the layer move in "states" interpolation
    assert _found(nn.Sequential(nn.BatchNorm1d(12, affine=False), nn.Linear(12, 3)), x) == []
    frozen = nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 3))
    frozen[0].requires_grad_(False)  # not in the slice; the next layer's input moves
    assert _found(frozen, x) == []
    assert _found(Twice(), x) == []  # runs twice per forward pass
    hooked = nn.Sequential(nn.Linear(12, 4), nn.ReLU(), nn.Linear(4, 3))
    hooked[0].register_forward_hook(lambda module, inputs, output: output * 2)
    assert _found(hooked, x) == []


def test_the_check_catches_outputs_that_do_not_reproduce_the_model():
    net = image_mlp().eval()
    x, y = data(8, (108,))
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    directions = torch.randn(2, layout.size, dtype=F64) * 0.1
    points = torch.tensor([[1.0, -1.0]], dtype=F64)
    built, why = PrecomputedInputLayers.build(
        net, layout, theta, directions, [(x, y)], check_points=points
    )
    assert why == "" and built.names == ["1"]
    args = (net, layout, theta, directions, points, x)
    assert built._agrees(*args)
    built._basis["1"][0][2] += 1e-3  # the second direction's term, slightly wrong
    assert not built._agrees(*args)


def test_outputs_too_large_are_not_stored():
    net = image_mlp().eval()
    x, y = data(8, (108,))
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    directions = torch.zeros(2, layout.size, dtype=F64)
    built, why = PrecomputedInputLayers.build(
        net, layout, theta, directions, [(x, y)], max_bytes=8 * 9 * 3 * 8 - 1
    )
    assert built is None and "would take" in why
    built, _ = PrecomputedInputLayers.build(
        net, layout, theta, directions, [(x, y)], max_bytes=8 * 9 * 3 * 8
    )
    assert built is not None and built.basis_bytes == 8 * 9 * 3 * 8


def test_folded_copy_keeps_its_other_folded_layers():
    net = bn_cnn().eval()
    x, _ = data(6, (12,))
    folded, pairs = fold_batchnorm(net, x)
    assert find_input_layers(folded, ParamLayout.of(net), x, [n for n, _ in pairs]) == ["1"]


def test_resumed_precomputed_run_is_bit_identical(tmp_path):
    net = image_mlp()
    x, y = data(20, (108,))
    kw = {"grid": 5, "vectorize": False, "chunk_size": 4}
    full = landscape(net, (x, y), 2, **kw)
    path = tmp_path / "run.npz"
    part = landscape(net, (x, y), 2, out=path, max_points=6, **kw)
    assert not part.complete and LandscapeResult.load(path).settings["input_layers"] == ["1"]
    rest = landscape(net, (x, y), 2, out=path, **kw)
    torch.testing.assert_close(rest.loss, full.loss, rtol=0, atol=0)
    with pytest.raises(SharpscopeError, match=r"different settings \(input_layers\)"):
        landscape(net, (x, y), 2, out=path, precompute_input=False, **kw)


def test_vectorized_path_refuses_the_request():
    x, y = data(8, (108,))
    with pytest.raises(SharpscopeError, match="per-point loop"):
        landscape(image_mlp(), (x, y), 1, grid=3, vectorize=True, precompute_input=True)


class ReadsTheWeight(nn.Module):
    """The parent reads the input layer's weight itself (a penalty-like output term)."""

    def __init__(self):
        super().__init__()
        self.first, self.head = nn.Linear(108, 9), nn.Linear(9, 3)

    def forward(self, x):
        return self.head(torch.relu(self.first(x))) + self.first.weight.sum()


class Tied(nn.Module):
    """The input layer's weight is also held (tied) by a layer that reads hidden values."""

    def __init__(self):
        super().__init__()
        self.first, self.again = nn.Linear(108, 9), nn.Linear(108, 9)
        self.again.weight = self.first.weight
        self.expand, self.head = nn.Linear(9, 108), nn.Linear(9, 3)

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.head(torch.tanh(self.again(self.expand(h))))


def test_weights_of_a_precomputed_layer_are_left_unformed_only_when_nothing_else_reads_them():
    x, y = data(20, (108,))
    kw = {"grid": 5, "vectorize": False, "bias": "normalize"}
    torch.manual_seed(0)
    for net in (image_mlp(), Tied().to(F64), ReadsTheWeight().to(F64)):
        fast = landscape(net, (x, y), 2, **kw)
        every = landscape(net, (x, y), 2, precompute_input=False, **kw)
        assert_same_grid(fast, every)
    net = image_mlp().eval()
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    directions = torch.randn(2, layout.size, dtype=F64)
    points = torch.tensor([[1.0, -1.0]], dtype=F64)
    built, _ = PrecomputedInputLayers.build(net, layout, theta, directions, [(x, y)])
    assert built.unused == {"1.weight", "1.bias"}
    tied = Tied().to(F64).eval()
    layout = ParamLayout.of(tied)
    theta = flat_parameters(tied, layout)
    directions = torch.randn(2, layout.size, dtype=F64)
    built, _ = PrecomputedInputLayers.build(tied, layout, theta, directions, [(x, y)])
    assert built.names == ["first"] and built.unused == {"first.bias"}  # the weight is tied
    reads = ReadsTheWeight().to(F64).eval()
    layout = ParamLayout.of(reads)
    theta = flat_parameters(reads, layout)
    directions = torch.randn(2, layout.size, dtype=F64)
    built, why = PrecomputedInputLayers.build(
        reads, layout, theta, directions, [(x, y)], check_points=points
    )
    assert built is None and why == "the precomputed outputs did not reproduce the model's"


class ReadsALittle(nn.Module):
    """The parent reads the input layer's weight, with an effect far below float32 rounding
    checks (acceptance report, session 15): caught because unread tensors are set to NaN."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(128, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.a(x))) + 1e-3 * self.a.weight[:3, 0]


def test_a_weight_read_elsewhere_however_little_is_formed_at_every_point():
    torch.manual_seed(0)
    net = ReadsALittle().to(F64)
    x, y = data(32, (128,))
    kw = {"grid": 5, "vectorize": False}
    fast = landscape(net, (x, y), 1, **kw)
    every = landscape(net, (x, y), 1, precompute_input=False, **kw)
    assert fast.settings["input_layers"] == []  # the check refused it
    assert_same_grid(fast, every)
