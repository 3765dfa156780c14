"""Loss-landscape slices against exact answers (analysis.md §6, "Validation")."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sharpscope.analysis._functional import ParamLayout, flat_parameters
from sharpscope.analysis.directions import normalize_direction, random_direction
from sharpscope.analysis.landscape import LandscapeResult, landscape
from sharpscope.errors import SharpscopeError
from sharpscope.registry import LOSS_CHECK_EXAMPLES

from cases import RecurrentClassifier, half_mse, linear_regression, rendezvous_file, spawned_group

torch.set_num_threads(1)
F64 = torch.float64


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)
    ).to(F64)


def bn_cnn(seed=0, width=4):
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Unflatten(1, (1, 10)),
        nn.Conv1d(1, width, 3, stride=2, padding=1),
        nn.BatchNorm1d(width),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(5 * width, 3),
    ).to(F64)
    with torch.no_grad():
        net[2].running_mean.uniform_(-0.5, 0.5)
        net[2].running_var.uniform_(0.5, 2.0)
    return net


def class_data(n=24, d=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


# --- closed forms ---------------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False])
def test_quadratic_slices_match_taylor_expansion(vectorize):
    """L(θ + αδ + βη) = L* + αgᵀδ + βgᵀη + ½(α²δᵀHδ + 2αβδᵀHη + β²ηᵀHη) exactly."""
    model, x, y = linear_regression(20, 4)
    w = model.weight.detach()[0]
    g, h = x.T @ (x @ w - y) / len(y), x.T @ x / len(y)
    l0 = float(half_mse(x @ w, y))
    r = landscape(
        model, (x, y), 2, grid=5, span=0.7, loss=half_mse, vectorize=vectorize, chunk_size=6
    )
    d1, d2 = r.directions.double()
    assert r.loss.shape == (5, 5) and r.complete
    for i, a in enumerate(r.x.tolist()):
        for j, b in enumerate(r.y.tolist()):
            v = a * d1 + b * d2
            assert r.loss[i, j].item() == pytest.approx(
                l0 + float(g @ v + 0.5 * v @ h @ v), rel=1e-10
            )
    assert torch.isnan(r.accuracy).all()  # regression targets
    one = landscape(model, (x, y), 1, grid=7, loss=half_mse, vectorize=vectorize)
    d = one.directions[0].double()
    expected = [l0 + a * float(g @ d) + 0.5 * a * a * float(d @ h @ d) for a in one.x.tolist()]
    np.testing.assert_allclose(one.loss.numpy(), expected, rtol=1e-10)
    torch.testing.assert_close(one.x, torch.linspace(-1, 1, 7, dtype=F64))


def test_eigen_directions_give_half_lambda_alpha_squared():
    pytest.importorskip("sharpscope.analysis.spectrum")
    model, x, y = linear_regression(30, 4, seed=2, noise=False)  # g = 0, L* = 0
    r = landscape(model, (x, y), 2, grid=5, span=0.5, directions="eigen", loss=half_mse)
    lam = torch.linalg.eigvalsh(x.T @ x / len(y)).flip(0)
    torch.testing.assert_close(r.eigenvalues, lam[:2], rtol=1e-6, atol=1e-9)
    assert r.direction_kind == "eigen" and abs(r.cosine) < 1e-6
    expected = 0.5 * (lam[0] * r.x[:, None] ** 2 + lam[1] * r.y[None, :] ** 2)
    torch.testing.assert_close(r.loss, expected, rtol=1e-6, atol=1e-12)


def test_b6_two_eigen_directions_of_a_one_parameter_model_name_dims():
    """Stress B6 (session 28): the error said "k=2 is larger than the number of parameters
    (1); use k <= 1", a k the user never gave."""
    model = nn.Linear(1, 1, bias=False).double()
    x, y = torch.randn(8, 1, dtype=F64), torch.randn(8, dtype=F64)
    with pytest.raises(SharpscopeError, match=r"^directions='eigen' with dims=2 needs 2") as info:
        landscape(model, (x, y), 2, grid=3, directions="eigen", loss=half_mse)
    assert "k=" not in str(info.value) and "1 trainable parameter" in str(info.value)
    one = landscape(model, (x, y), 1, grid=3, directions="eigen", loss=half_mse)
    assert one.eigenvalues.shape == (1,)


# --- directions -----------------------------------------------------------------------------


def test_filter_normalized_direction_has_the_weight_filter_norms():
    net = bn_cnn(width=5)
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    params = layout.unflatten(theta)
    for bias in ("ignore", "keep", "normalize"):
        d = layout.unflatten(
            random_direction(theta, layout, seed=3, index=0, norm="filter", bias=bias)
        )
        for name, w in params.items():
            if w.dim() >= 2:
                torch.testing.assert_close(
                    d[name].flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-8, atol=0
                )
            elif bias == "ignore":
                assert (d[name] == 0).all()
            elif bias == "keep":
                torch.testing.assert_close(d[name], w)
            else:
                assert d[name].norm().item() == pytest.approx(w.norm().item(), rel=1e-8)
    raw = torch.randn(layout.size, dtype=F64)
    layer = layout.unflatten(normalize_direction(raw, theta, layout, "layer", "ignore"))
    element = normalize_direction(raw, theta, layout, "element", "keep")
    for name, w in params.items():
        if w.dim() >= 2:
            assert layer[name].norm().item() == pytest.approx(w.norm().item(), rel=1e-8)
    mask = layout.matrix_mask()
    torch.testing.assert_close(element[mask], (raw * theta.abs())[mask])


def test_bias_normalize_keeps_the_raw_direction():
    """bias="normalize" rescales a bias's raw direction as a whole: d_b = r_b·‖θ_b‖/‖r_b‖
    (θ_b = (5, 6), r_b = (1, 2)), not element by element."""
    layout = ParamLayout.of(nn.Linear(2, 2))
    theta = torch.tensor([3.0, 4.0, 0.0, 1.0, 5.0, 6.0], dtype=F64)
    raw = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 2.0], dtype=F64)
    d = normalize_direction(raw, theta, layout, "filter", "normalize")
    torch.testing.assert_close(d[4:], raw[4:] * (61 / 5) ** 0.5, rtol=1e-8, atol=0)


def test_two_random_directions_are_independent_and_cosine_is_normalized():
    """The 2-D random directions are drawn separately (|cos| < 0.5) and ``cosine`` is
    d₀·d₁/(‖d₀‖‖d₁‖)."""
    net = mlp()
    x, y = class_data()
    r = landscape(net, (x, y), 2, grid=3)
    d0, d1 = r.directions.double()
    assert abs(r.cosine) < 0.5
    assert r.cosine == pytest.approx(float(d0 @ d1 / (d0.norm() * d1.norm())), rel=1e-12)


@pytest.mark.parametrize("vectorize", [True, False])
def test_landscape_independent_of_batching(vectorize):
    """Batches of 5, 5, 5, 5, 3 weigh n_b/N (§0): loss and accuracy equal one batch's (1e-12)."""
    net = bn_cnn()
    x, y = class_data(n=23, d=10)
    kw = {"grid": 3, "seed": 2, "vectorize": vectorize}
    whole = landscape(net, (x, y), 1, **kw)
    batched = landscape(net, (x, y), 1, batch_size=5, **kw)
    torch.testing.assert_close(batched.loss, whole.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(batched.accuracy, whole.accuracy, rtol=1e-12, atol=0)


def test_filter_normalized_slice_invariant_under_relu_rescaling():
    net = mlp()
    x, y = class_data()
    other = copy.deepcopy(net)
    with torch.no_grad():
        other[0].weight.mul_(10)
        other[0].bias.mul_(10)
        other[2].weight.div_(10)
    torch.testing.assert_close(other(x), net(x))
    kw = {"grid": 9, "span": 1.0, "seed": 4}
    a = landscape(net, (x, y), 1, **kw)
    b = landscape(other, (x, y), 1, **kw)
    torch.testing.assert_close(b.loss, a.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(b.accuracy, a.accuracy)
    raw_a = landscape(net, (x, y), 1, norm="none", **kw)
    raw_b = landscape(other, (x, y), 1, norm="none", **kw)
    assert (raw_a.loss - raw_b.loss).abs().max() > 1e-2


# --- interpolation and PCA ------------------------------------------------------------------


@pytest.mark.parametrize("vectorize", [True, False])
def test_interpolation_endpoints_reproduce_both_models(vectorize):
    a, b = bn_cnn(seed=0), bn_cnn(seed=1)
    x, y = class_data(n=30, d=10)
    r = landscape(a, (x, y), 1, directions=b, grid=41, vectorize=vectorize)
    assert r.direction_kind == "interpolation" and r.states
    torch.testing.assert_close(r.x, torch.linspace(-0.5, 1.5, 41, dtype=F64))
    assert r.x[10].item() == 0.0 and r.x[30].item() == 1.0  # exactly, not within rounding
    odd = landscape(a, (x, y), 1, directions=b, grid=23, span=0.1)
    assert odd.x[1].item() == 0.0 and odd.x[21].item() == 1.0
    centered = landscape(a, (x, y), 2, grid=11, span=0.7)
    assert centered.x[5].item() == 0.0 and centered.y[5].item() == 0.0
    for net, index in ((a, 10), (b, 30)):
        net.eval()
        with torch.no_grad():
            out = net(x)
        assert r.loss[index].item() == pytest.approx(
            nn.functional.cross_entropy(out, y).item(), rel=1e-9
        )
        assert r.accuracy[index].item() == pytest.approx(
            (out.argmax(1) == y).double().mean().item()
        )
    # weights-only interpolation keeps A's BatchNorm statistics at α = 1
    w = landscape(a, (x, y), 1, directions=b.state_dict(), x=[1.0], states=False)
    mixed = copy.deepcopy(b)
    mixed[2].load_state_dict(
        {
            **mixed[2].state_dict(),
            "running_mean": a[2].running_mean,
            "running_var": a[2].running_var,
        }
    )
    with torch.no_grad():
        assert w.loss[0].item() == pytest.approx(
            nn.functional.cross_entropy(mixed.eval()(x), y).item(), rel=1e-9
        )


@pytest.mark.parametrize("vectorize", [True, False])
def test_interpolated_batchnorm_variances_below_zero_give_nan_points_and_a_warning(vectorize):
    """Beyond the end points (1 - α)·v_A + α·v_B can be negative: BatchNorm then returns NaN.
    Such a point is computed, its loss NaN and its accuracy NaN too (not the argmax of NaN
    logits), and the call says why; weights-only interpolation stays finite."""
    a, b = bn_cnn(seed=0), bn_cnn(seed=1)
    with torch.no_grad():
        a[2].running_var.fill_(0.5)
        b[2].running_var.fill_(2.0)  # at α = -0.5: 0.75 - 1.0 < 0
    x, y = class_data(n=16, d=10)
    alphas = [-0.5, 0.0, 1.0, 1.5]
    with pytest.warns(RuntimeWarning, match=r"1 point\(s\) gave a non-finite loss.*BatchNorm"):
        r = landscape(a, (x, y), 1, directions=b, x=alphas, vectorize=vectorize)
    assert r.computed.tolist() == [1.0] * 4
    assert torch.isnan(r.loss[0]) and torch.isnan(r.accuracy[0])
    assert torch.isfinite(r.loss[1:]).all() and torch.isfinite(r.accuracy[1:]).all()
    assert r.loss[1].item() == pytest.approx(_loss_of(a, x, y), rel=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weights_only = landscape(a, (x, y), 1, directions=b, x=alphas, states=False)
    assert torch.isfinite(weights_only.loss).all()


@pytest.mark.parametrize("span", [1e30, 1e300])
def test_overflowing_span_names_the_span_in_its_warning(span):
    """Weights moved by 1e29 overflow float32 in the forward pass (1e300 in the weights
    themselves): the warning says so, and a sane span warns about nothing."""
    net = mlp().float()
    x, y = class_data()
    x = x.float()
    with pytest.warns(
        RuntimeWarning,
        match=r"8 point\(s\) gave a non-finite loss \(a weight "
        r"moves by up to .*e\+\d+ at the grid's ends, and float32 overflows at "
        r"3.4e\+38: use a smaller span\)",
    ):
        r = landscape(net, (x, y), 2, grid=3, span=span, seed=0)
    assert torch.isfinite(r.loss[1, 1]) and not torch.isfinite(r.loss).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(landscape(net, (x, y), 2, grid=3, span=1.0, seed=0).loss).all()


def test_interpolation_2d_states_follow_alpha():
    """2-D interpolation with states: at (α, β) = (1, 0) the model is B with B's BatchNorm
    statistics (the buffers move with α, not β)."""
    a, b = bn_cnn(seed=0), bn_cnn(seed=1)
    x, y = class_data(n=16, d=10)
    r = landscape(a, (x, y), 2, directions=b, x=[0.0, 1.0], y=[0.0, 0.5])
    assert r.loss[1, 0].item() == pytest.approx(_loss_of(b, x, y), rel=1e-9)


def test_interpolation_2d_and_architecture_mismatch():
    a, b = bn_cnn(seed=0), bn_cnn(seed=1)
    x, y = class_data(n=12, d=10)
    r = landscape(a, (x, y), 2, directions=b, grid=3)
    assert r.loss.shape == (3, 3) and r.directions.shape[0] == 2
    with pytest.raises(SharpscopeError, match="different architecture"):
        landscape(a, (x, y), 1, directions=bn_cnn(seed=1, width=6), grid=3)


def planted_trajectory(net, coefs):
    """Checkpoints θ + B c_t for the rows c_t of ``coefs`` (T, k), B a seeded orthonormal
    (P, k) basis: the state dicts and B."""
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(layout.size, coefs.shape[1], generator=g, dtype=F64))
    trajectory = []
    for c in coefs:
        sd = dict(net.state_dict())
        sd.update(layout.unflatten(theta + basis @ c))
        trajectory.append(sd)
    return trajectory, basis


@pytest.mark.parametrize("grid", [3, 6])
def test_pca_recovers_a_planted_trajectory(grid):
    net = mlp(seed=5)
    t = torch.linspace(0, 1, 8, dtype=F64)
    coefs = torch.stack([3 * (1 - t) ** 2 + 0.2, 2 * torch.sin(3 * t)], dim=1)  # (T, 2)
    trajectory, basis = planted_trajectory(net, coefs)
    x, y = class_data()
    r = landscape(net, (x, y), 2, directions=trajectory, grid=grid, bias="keep")
    assert r.direction_kind == "pca" and r.loss.shape == (grid, grid)
    assert float(r.explained_variance_ratio.sum()) == pytest.approx(1.0, abs=1e-10)
    dirs = r.directions.double()
    # the planted plane is the span of the two directions
    residual = basis - dirs.T @ (dirs @ basis)
    assert residual.norm() < 1e-10
    # each checkpoint is reproduced from its projected coordinates
    torch.testing.assert_close(r.trajectory @ dirs, coefs @ basis.T, rtol=0, atol=1e-10)
    lo, hi = r.trajectory.min(0).values, r.trajectory.max(0).values
    assert (r.x[0] < lo[0]) and (r.x[-1] > hi[0]) and (r.y[0] < lo[1]) and (r.y[-1] > hi[1])
    # the final model (0, 0) is a grid point (span plays no part)
    i, j = _index_of(r.x, 0.0), _index_of(r.y, 0.0)
    assert r.loss[i, j].item() == pytest.approx(_loss_of(net, x, y), rel=1e-12)
    assert all(_evenly_spaced(axis) for axis in r.axes)
    again = landscape(net, (x, y), 2, directions=trajectory, grid=grid, bias="keep", span=0.1)
    torch.testing.assert_close(again.x, r.x, rtol=1e-12, atol=1e-12)  # (SVD rounding)


def test_pca_of_a_trajectory_that_moves_only_biases_names_the_bias_option():
    """bias='ignore' (the default) leaves 1-D tensors out: the error says so and 'keep' works."""
    net = mlp(seed=5)
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    bias_only = 1.0 - layout.matrix_mask().double()
    trajectory = []
    for step in range(4):
        moved = theta + bias_only * torch.randn(layout.size, dtype=F64) * (step + 1)
        sd = dict(net.state_dict())
        sd.update(layout.unflatten(moved))
        trajectory.append(sd)
    x, y = class_data()
    with pytest.raises(SharpscopeError, match="bias='keep' takes them in"):
        landscape(net, (x, y), 2, directions=trajectory, grid=3)
    assert landscape(net, (x, y), 2, directions=trajectory, grid=3, bias="keep").loss.shape == (
        3,
        3,
    )


def test_pca_matches_sklearn_on_a_three_dimensional_trajectory():
    """Directions and explained-variance ratios equal sklearn's centered PCA (1e-8), on a
    trajectory with a large offset along its third, low-variance axis."""
    from sklearn.decomposition import PCA

    net = mlp(seed=5)
    t = torch.linspace(0, 1, 9, dtype=F64)
    coefs = torch.stack([3 * t, 1.5 * torch.sin(6 * t), 5 + 0.3 * torch.cos(5 * t)], dim=1)
    trajectory, basis = planted_trajectory(net, coefs)
    x, y = class_data()
    r = landscape(net, (x, y), 2, directions=trajectory, grid=3, bias="keep")
    pca = PCA(n_components=2).fit((coefs @ basis.T).numpy())
    np.testing.assert_allclose(
        r.explained_variance_ratio.numpy(), pca.explained_variance_ratio_, rtol=1e-8
    )
    cosines = np.abs(r.directions.double().numpy() @ pca.components_.T)
    np.testing.assert_allclose(np.diag(cosines), [1.0, 1.0], atol=1e-8)


def test_pca_ignore_bias_leaves_one_dimensional_tensors_out():
    """With the default bias="ignore" the PCA directions are exactly 0 on 1-D tensors."""
    net = mlp(seed=5)
    trajectory = [mlp(seed=s).state_dict() for s in (6, 7, 8)]
    x, y = class_data()
    r = landscape(net, (x, y), 2, directions=trajectory, grid=3)
    assert (r.directions[:, ~ParamLayout.of(net).matrix_mask()] == 0).all()


# --- default axes contain the reference points ----------------------------------------------


def _index_of(axis, value):
    hits = (axis == value).nonzero().flatten().tolist()
    assert len(hits) == 1, f"{value} is not exactly once on the axis {axis.tolist()}"
    return hits[0]


def _evenly_spaced(axis):
    steps = axis.diff()
    return bool(torch.allclose(steps, steps[0].expand_as(steps), rtol=1e-9, atol=0))


def _loss_of(net, x, y):
    net.eval()
    with torch.no_grad():
        return nn.functional.cross_entropy(net(x), y).item()


@pytest.mark.parametrize("grid", [3, 4, 10, 11])
def test_even_grid_missed_the_centre(grid):
    """grid=10 used to be linspace(-span, span, 10): the model itself was never evaluated."""
    net = mlp()
    x, y = class_data()
    r = landscape(net, (x, y), 2, grid=grid, span=0.5)
    for axis in r.axes:
        assert len(axis) == grid and _evenly_spaced(axis)
        assert axis.min().item() == -0.5 and axis.max().item() <= 0.5
        assert axis.max().item() == pytest.approx(0.5 if grid % 2 else 0.5 - 1 / grid, abs=1e-12)
    i, j = _index_of(r.x, 0.0), _index_of(r.y, 0.0)
    assert r.loss[i, j].item() == pytest.approx(_loss_of(net, x, y), rel=1e-12)
    if grid % 2:  # odd grids are linspace as before
        torch.testing.assert_close(r.x, torch.linspace(-0.5, 0.5, grid, dtype=F64))


@pytest.mark.parametrize("grid", [3, 4, 10, 11, 12])
def test_interpolation_grid_missed_the_endpoints(grid):
    """grid=11 used to be linspace(-0.5, 1.5, 11): neither α = 0 nor α = 1 was on it."""
    a, b = bn_cnn(seed=0), bn_cnn(seed=1)
    x, y = class_data(n=16, d=10)
    r = landscape(a, (x, y), 1, directions=b, grid=grid)
    assert len(r.x) == grid and _evenly_spaced(r.x)
    for net, alpha in ((a, 0.0), (b, 1.0)):
        assert r.loss[_index_of(r.x, alpha)].item() == pytest.approx(_loss_of(net, x, y), rel=1e-9)
    expected = {11: (-0.6, 1.4), 12: (-0.5, 1 + 1 / 3)}.get(grid)
    if expected is not None:
        assert (r.x[0].item(), r.x[-1].item()) == pytest.approx(expected, abs=1e-12)
    for span in (0.1, 3.0):
        wide = landscape(a, (x, y), 2, directions=b, grid=grid, span=span, max_points=1)
        for axis, anchor in ((wide.x, 0.0), (wide.x, 1.0), (wide.y, 0.0)):
            _index_of(axis, anchor)
        assert _evenly_spaced(wide.x) and len(wide.x) == grid


def test_explicit_axes_are_used_as_given():
    a, b = bn_cnn(seed=0), bn_cnn(seed=1)
    x, y = class_data(n=8, d=10)
    given = [0.1, 0.35, 0.7]
    r = landscape(a, (x, y), 1, directions=b, x=given)
    assert r.x.tolist() == given
    r = landscape(a, (x, y), 2, x=given, y=[-0.3, 0.25])
    assert r.x.tolist() == given and r.y.tolist() == [-0.3, 0.25]


def test_norm_recorded_as_filter_for_unit_directions():
    """eigen and PCA directions are unit vectors; they used to be recorded as "filter"."""
    pytest.importorskip("sharpscope.analysis.spectrum")
    model, x, y = linear_regression(30, 4, seed=2)
    eig = landscape(model, (x, y), 2, grid=3, directions="eigen", loss=half_mse)
    net = mlp(seed=5)
    cx, cy = class_data()
    trajectory = [mlp(seed=s).state_dict() for s in (6, 7, 8)]
    pca = landscape(net, (cx, cy), 2, grid=3, directions=trajectory)
    a, b = bn_cnn(seed=0), bn_cnn(seed=1)
    dx, dy = class_data(n=8, d=10)
    line = landscape(a, (dx, dy), 1, directions=b, grid=3)
    plane = landscape(a, (dx, dy), 2, directions=b, grid=3, norm="layer")
    random = landscape(net, (cx, cy), 1, grid=3, norm="element")
    for result, norm in ((eig, "unit"), (pca, "unit"), (line, "none"), (plane, "layer")):
        assert result.norm == norm and result.settings["norm"] == norm, result.direction_kind
    assert random.norm == "element" and random.settings["norm"] == "element"
    torch.testing.assert_close(eig.directions.norm(dim=1), torch.ones(2, dtype=F64))


# --- resuming, processes --------------------------------------------------------------------


def is_loss_check(targets) -> bool:
    """Whether a loss call is one of the loss checks before the points (check_model_loss,
    on at most LOSS_CHECK_EXAMPLES examples) rather than a point (the tests' 20 examples)."""
    return len(targets) <= LOSS_CHECK_EXAMPLES


class FlakyLoss:
    """Cross-entropy that raises after a number of point calls (a run killed half-way)."""

    __name__ = "cross_entropy"

    def __init__(self):
        self.calls_left = None

    def __call__(self, out, t):
        if self.calls_left is not None and not is_loss_check(t):
            if self.calls_left == 0:
                raise KeyboardInterrupt("simulated interruption")
            self.calls_left -= 1
        return nn.functional.cross_entropy(out, t)


@pytest.mark.parametrize("vectorize", [True, False])
def test_resume_after_interruption_gives_the_same_grid(tmp_path, vectorize):
    net = bn_cnn()
    x, y = class_data(n=20, d=10)
    kw = {"grid": 5, "chunk_size": 4, "vectorize": vectorize, "seed": 2}
    full = landscape(net, (x, y), 2, out=tmp_path / "full.npz", **kw)
    flaky = FlakyLoss()
    flaky.calls_left = 3 if vectorize else 11  # vmap: one call per chunk; loop: per point
    path = tmp_path / "run.npz"
    with pytest.raises(KeyboardInterrupt):
        landscape(net, (x, y), 2, out=path, loss=flaky, save_every=0, **kw)
    partial = LandscapeResult.load(path)
    done = partial.computed > 0.5
    assert not partial.complete and 0 < int(done.sum()) < 25
    assert torch.isnan(partial.loss[~done]).all()
    flaky.calls_left = None
    resumed = landscape(net, (x, y), 2, out=path, loss=flaky, **kw)
    assert resumed.complete
    torch.testing.assert_close(resumed.loss, full.loss, rtol=0, atol=0)
    torch.testing.assert_close(LandscapeResult.load(path).loss, full.loss, rtol=0, atol=0)
    # a budget of points, then the rest
    step = landscape(net, (x, y), 2, out=tmp_path / "steps.npz", max_points=7, **kw)
    # whole chunks of 4 points, vectorized or one after another in the loop
    assert int(step.computed.sum()) == 8 and not step.complete
    rest = landscape(net, (x, y), 2, out=tmp_path / "steps.npz", **kw)
    torch.testing.assert_close(rest.loss, full.loss, rtol=0, atol=0)
    # sizes beyond int64 are the whole grid and the whole data (session 27: an
    # OverflowError traceback from torch's split and comparison)
    huge = 10**30
    whole = landscape(
        net, (x, y), 2, **{**kw, "chunk_size": huge}, max_points=huge, batch_size=huge
    )
    assert whole.complete
    torch.testing.assert_close(whole.loss, full.loss, rtol=1e-6, atol=1e-7)
    with pytest.raises(SharpscopeError, match="different settings"):
        landscape(net, (x, y), 2, out=path, **{**kw, "seed": 3})


def test_computed_is_a_bool_mask_and_files_with_0_1_floats_still_resume(tmp_path):
    """``computed`` was stored as 0/1 floats: ``np.load(f)["loss"][mask]`` failed on it."""
    net = bn_cnn()
    x, y = class_data(n=20, d=10)
    kw = {"grid": 5, "chunk_size": 4, "vectorize": False, "seed": 2}
    full = landscape(net, (x, y), 2, **kw)
    assert full.computed.dtype == torch.bool
    path = tmp_path / "run.npz"
    partial = landscape(net, (x, y), 2, out=path, max_points=8, **kw)
    assert partial.computed.dtype == torch.bool
    with np.load(path) as archive:
        mask = archive["computed"]
        assert mask.dtype == bool and archive["loss"][mask].shape == (8,)
        arrays = {key: archive[key] for key in archive.files}
    assert LandscapeResult.load(path).computed.dtype == torch.bool
    arrays["computed"] = mask.astype(np.float64)  # the file an earlier version wrote
    np.savez(path, **arrays)
    resumed = landscape(net, (x, y), 2, out=path, **kw)
    assert resumed.meta.extra["points_loaded"] == 8 and resumed.complete
    torch.testing.assert_close(resumed.loss, full.loss, rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["loss", "computed", "directions", "x", "x values"])
def test_a_damaged_file_is_refused_on_resume(tmp_path, damage):
    """A file whose arrays were cut was a reshape traceback (loss, computed) or, for the
    directions and x, silently taken and written back."""
    net = bn_cnn()
    x, y = class_data(n=20, d=10)
    kw = {"grid": 5, "vectorize": False, "seed": 2}
    path = tmp_path / "run.npz"
    landscape(net, (x, y), 2, out=path, max_points=8, **kw)
    with np.load(path) as archive:
        arrays = {key: archive[key] for key in archive.files}
    name = damage.split()[0]
    if damage == "x values":
        arrays["x"] = arrays["x"] * 2
    elif damage == "directions":
        arrays["directions"] = arrays["directions"][:, :-1]
    else:
        arrays[name] = arrays[name][:3]
    np.savez(path, **arrays)
    with pytest.raises(SharpscopeError, match=f"whose {name} .*a damaged or edited file"):
        landscape(net, (x, y), 2, out=path, **kw)


class InterruptAfter:
    """Cross-entropy that raises after ``calls`` calls, noting the points ``path`` holds at
    each call (the loop makes one call per point, vmap one per block; the loss checks before
    them are not counted)."""

    __name__ = "cross_entropy"

    def __init__(self, calls, path, error=KeyboardInterrupt):
        self.calls, self.path, self.error, self.held = calls, path, error, []

    def __call__(self, out, t):
        if self.calls is not None and not is_loss_check(t):
            self.held.append(
                int(LandscapeResult.load(self.path).computed.sum()) if self.path.exists() else 0
            )
            if len(self.held) > self.calls:
                raise self.error("simulated interruption")
        return nn.functional.cross_entropy(out, t)


@pytest.mark.parametrize(
    ("vectorize", "error", "calls", "points"),
    [
        (False, KeyboardInterrupt, 6, 6),  # the loop records every point
        (True, KeyboardInterrupt, 3, 12),  # vmap: every block of 4
        (False, RuntimeError, 9, 9),  # any error mid-grid
    ],
)
def test_interrupt_lost_the_points_since_the_last_write(tmp_path, vectorize, error, calls, points):
    """Ctrl-C used to keep only what the last timed write held (nothing in the first 30 s)."""
    net = bn_cnn()
    x, y = class_data(n=20, d=10)
    kw = {"grid": 5, "chunk_size": 4, "vectorize": vectorize, "seed": 2, "save_every": 1e9}
    full = landscape(net, (x, y), 2, **kw)
    path = tmp_path / "run.npz"
    loss = InterruptAfter(calls, path, error)
    with pytest.raises(error, match="simulated"):
        landscape(net, (x, y), 2, out=path, loss=loss, **kw)
    # the first write comes after the first block, not after save_every seconds
    first = 1 if vectorize else 4  # calls before the first block is done
    assert loss.held[:first] == [0] * first and loss.held[first] == 4
    partial = LandscapeResult.load(path)
    done = partial.computed.reshape(-1) > 0.5
    assert done.tolist() == [True] * points + [False] * (25 - points) and not partial.complete
    flat_loss = partial.loss.reshape(-1)
    torch.testing.assert_close(flat_loss[:points], full.loss.reshape(-1)[:points], rtol=0, atol=0)
    assert torch.isnan(flat_loss[points:]).all()
    assert partial.meta.extra["points_evaluated"] == points
    assert partial.meta.extra["points_loaded"] == 0
    loss.calls = None
    resumed = landscape(net, (x, y), 2, out=path, loss=loss, **kw)
    assert resumed.complete
    assert resumed.meta.extra["points_loaded"] == points
    assert resumed.meta.extra["points_evaluated"] == 25 - points
    torch.testing.assert_close(resumed.loss, full.loss, rtol=0, atol=0)
    torch.testing.assert_close(resumed.accuracy, full.accuracy, rtol=0, atol=0)
    torch.testing.assert_close(LandscapeResult.load(path).loss, full.loss, rtol=0, atol=0)
    # an interrupt before any point leaves no file
    early = tmp_path / "early.npz"
    # (an error on the very first point is the model's or loss's: one line, SharpscopeError)
    with pytest.raises(error if error is KeyboardInterrupt else SharpscopeError):
        landscape(net, (x, y), 2, out=early, loss=InterruptAfter(0, early, error), **kw)
    assert not early.exists()


class _StopAfter:
    """Cross-entropy that raises KeyboardInterrupt on call ``calls + 1``."""

    __name__ = "cross_entropy"

    def __init__(self, calls):
        self.calls = calls

    def __call__(self, out, t):
        self.calls -= 1
        if self.calls < 0:
            raise KeyboardInterrupt("simulated interruption")
        return nn.functional.cross_entropy(out, t)


def test_a_half_done_block_resumes_bit_for_bit(tmp_path):
    """On resume a block's weights came from its unfinished rows alone, and a matmul over
    fewer rows rounds differently: single points were off by an ulp of the loss."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 3))
    x, y = class_data(n=6, d=10)
    kw = {"grid": 9, "chunk_size": 8, "vectorize": False, "seed": 0, "save_every": 1e9}
    full = landscape(net, (x, y), 2, **kw)
    for k in range(1, 24):  # an interrupt inside each of the first three blocks
        path = tmp_path / f"k{k}.npz"
        with pytest.raises(KeyboardInterrupt):
            landscape(net, (x, y), 2, out=path, loss=_StopAfter(k), **kw)
        resumed = landscape(net, (x, y), 2, out=path, **kw)
        assert torch.equal(resumed.loss, full.loss), k


def _worker(rank, world, rendezvous, out_dir):
    with spawned_group(rank, world, rendezvous):
        net = bn_cnn()
        x, y = class_data(n=20, d=10)
        r = landscape(
            net,
            (x, y),
            2,
            grid=5,
            chunk_size=3,
            out=f"{out_dir}/grid.npz",
            save_every=0,
            distributed=True,
        )
        torch.save(
            {"loss": r.loss, "acc": r.accuracy, "n": r.meta.extra["processes"]},
            f"{out_dir}/rank{rank}.pt",
        )


def test_two_processes_split_the_grid_and_agree_with_one(tmp_path):
    mp.spawn(_worker, args=(2, rendezvous_file(), str(tmp_path)), nprocs=2, join=True)
    net = bn_cnn()
    x, y = class_data(n=20, d=10)
    single = landscape(net, (x, y), 2, grid=5)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["n"] == 2
        torch.testing.assert_close(got["loss"], single.loss, rtol=0, atol=0)
        torch.testing.assert_close(got["acc"], single.accuracy, rtol=0, atol=0)
    written = LandscapeResult.load(tmp_path / "grid.npz")
    assert written.complete
    torch.testing.assert_close(written.loss, single.loss, rtol=0, atol=0)


# --- modes, files, errors -------------------------------------------------------------------


def test_eval_mode_used_and_restored_and_npz_roundtrip(tmp_path):
    net = bn_cnn()
    x, y = class_data(n=16, d=10)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    r = landscape(net, (x, y), 1, grid=3)
    assert net.training and r.meta.mode == "eval"
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, state[k])
    net.eval()
    with torch.no_grad():
        center = nn.functional.cross_entropy(net(x), y).item()
    assert r.loss[1].item() == pytest.approx(center, rel=1e-12)
    loaded = LandscapeResult.load(r.save(tmp_path / "l.npz"))
    torch.testing.assert_close(loaded.loss, r.loss)
    assert loaded.y is None and loaded.axes[0].shape == (3,) and loaded.dims == 1
    with np.load(tmp_path / "l.npz") as archive:
        assert {"x", "loss", "accuracy"} <= set(archive.files)


def test_loop_leaves_the_model_and_a_pending_graph_untouched_even_when_interrupted(tmp_path):
    # the loop points the model's parameters (and, with states, buffers) at each grid
    # point's values; the tensors the model held must never be written
    net, other = bn_cnn(0), bn_cnn(1)
    x, y = class_data(n=16, d=10)
    pending = nn.functional.cross_entropy(net.train()(x), y)  # graph built before the analysis
    held = {k: (v.data_ptr(), v.detach().clone()) for k, v in net.state_dict().items()}
    landscape(net, (x, y), 2, grid=3, vectorize=False)
    landscape(net, (x, y), 1, grid=3, vectorize=False, directions=other, states=True)
    flaky = FlakyLoss()
    flaky.calls_left = 2
    with pytest.raises(KeyboardInterrupt):
        landscape(net, (x, y), 1, grid=5, vectorize=False, loss=flaky)
    for name, tensor in net.state_dict().items():
        pointer, values = held[name]
        assert tensor.data_ptr() == pointer and torch.equal(tensor, values), name
    pending.backward()  # no "modified by an inplace operation"
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grid": 2}, "at least 3 points"),
        # a string or a bool is the wrong type, not too few points
        ({"grid": "5"}, r"grid must be an integer of at least 3 points per axis, got '5'"),
        ({"grid": True}, r"got True"),
        ({"dims": 3}, "dims must be 1 or 2"),
        ({"span": 0.0}, "span must be > 0"),
        ({"norm": "unit"}, "unknown norm"),
        ({"bias": "drop"}, "unknown bias mode"),
        ({"directions": "pca"}, r"unknown directions 'pca': use"),
        # a path was taken for a keyword (Python API acceptance, session 21)
        (
            {"directions": "runs/b/last.pt"},
            r"\(a file path: pass sharpscope.load_checkpoint\(path\), or its .model\)",
        ),
        ({"directions": "model.pth"}, r"'model.pth' \(a file path: pass"),
        ({"directions": ["a.pt", "b.pt"]}, r"or a loaded checkpoint \(sharpscope.load_checkpoint"),
        ({"directions": "random", "states": True}, "interpolation only"),
        # 1e10 points: their coordinates alone ran out of memory, with advice about batches
        ({"dims": 2, "grid": 100_000}, r"100000 x 100000 grid is 1e\+10 points.*smaller grid"),
    ],
)
def test_bad_input_raises_one_clear_error(kwargs, message):
    net = mlp()
    x, y = class_data()
    kwargs = {"dims": 1, **kwargs}
    with pytest.raises(SharpscopeError, match=message):
        landscape(net, (x, y), **kwargs)


def test_progress_hook_counts_every_grid_point():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    seen = []
    landscape(model, (x, y), dims=2, grid=5, progress=seen.append)
    assert sum(seen) == 25


@pytest.mark.parametrize("vectorize", [False, True])
def test_batchnorm_folding_changes_nothing_but_the_cost(vectorize):
    net = bn_cnn()
    x, y = class_data(n=16, d=10)
    kwargs = {"grid": 5, "bias": "normalize", "vectorize": vectorize}  # BN params move too
    folded = landscape(net, (x, y), 2, **kwargs)
    plain = landscape(net, (x, y), 2, fold_bn=False, **kwargs)
    assert folded.settings["bn_folded"] == ["2"] and plain.settings["bn_folded"] == []
    torch.testing.assert_close(folded.loss, plain.loss, rtol=1e-12, atol=0)
    torch.testing.assert_close(folded.accuracy, plain.accuracy)
    assert "forward" not in vars(net[1]) and "forward" not in vars(net[2])  # original intact


def test_one_hot_targets_score_the_accuracy_integer_labels_do():
    """MSE classification usually takes one-hot rows: the same losses (mse one-hot encodes
    integer labels itself) and now the same accuracy and 0-1 error, not NaN."""
    from sharpscope.analysis.msharpness import m_sharpness

    model = mlp()
    x, y = class_data(n=24)
    one_hot = nn.functional.one_hot(y, 3).to(F64)
    by_label = landscape(model, (x, y), 1, grid=5, loss="mse")
    by_row = landscape(model, (x, one_hot), 1, grid=5, loss="mse")
    torch.testing.assert_close(by_row.loss, by_label.loss)
    torch.testing.assert_close(by_row.accuracy, by_label.accuracy)
    assert torch.isfinite(by_row.accuracy).all()
    sharp = [m_sharpness(model, (x, t), 6, 0.5, loss="mse") for t in (y, one_hot)]
    assert sharp[1].error_increase == pytest.approx(sharp[0].error_increase)
    assert sharp[1].sharpness == pytest.approx(sharp[0].sharpness, rel=1e-12)
    soft = one_hot * 0.9 + 0.1 / 3  # soft labels: no class to score
    assert torch.isnan(landscape(model, (x, soft), 1, grid=3, loss="mse").accuracy).all()


def test_vmap_over_a_recurrent_model_names_vectorize_false():
    torch.manual_seed(0)
    model, data = RecurrentClassifier(nn.GRU), (torch.randn(8, 5, 2), torch.randint(0, 3, (8,)))
    with pytest.raises(SharpscopeError, match="vmap cannot run this model.*vectorize=False"):
        landscape(model, data, 1, grid=3, vectorize=True)
    assert torch.isfinite(landscape(model, data, 1, grid=3, vectorize=False).loss).all()


@pytest.mark.parametrize("vectorize", [True, False])
def test_labels_the_model_cannot_score_are_one_line(vectorize):
    torch.manual_seed(0)
    data = (torch.randn(8, 4), torch.full((8,), 6))
    with pytest.raises(SharpscopeError, match="failed on the data") as info:
        landscape(nn.Linear(4, 3), data, 1, grid=3, vectorize=vectorize)
    assert "\n" not in str(info.value)


def test_interpolation_warns_when_a_frozen_parameter_differs_between_the_models():
    """Only trainable parameters are interpolated: alpha = 1 is then not the second model."""

    def net(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        model[0].requires_grad_(False)
        return model

    data = (torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.warns(RuntimeWarning, match=r"frozen parameter '0.weight'.*not the second model"):
        landscape(net(0), data, 1, grid=3, directions=net(1))
    same_frozen = net(1)
    same_frozen[2].load_state_dict(net(2)[2].state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        landscape(net(1), data, 1, grid=3, directions=same_frozen)


def test_vmap_or_loop_retries_only_a_vectorize_the_caller_left_open():
    """landscape's GPU default is vmap: a model vmap cannot trace then runs in the loop."""
    from sharpscope.analysis._functional import VmapUnsupportedError, vmap_or_loop

    calls = []

    @vmap_or_loop
    def evaluate(points, vectorize=None):
        calls.append(vectorize)
        if vectorize is not False:
            raise VmapUnsupportedError(
                "torch.func.vmap cannot run this model (x); pass vectorize=False"
            )
        return points

    with pytest.warns(RuntimeWarning, match=r"cannot run this model \(x\): the loop instead"):
        assert evaluate(3) == 3
    assert calls == [None, False]
    with pytest.raises(VmapUnsupportedError):
        evaluate(3, vectorize=True)


class Tempered(nn.Module):
    """A linear classifier with a learned scalar temperature (a 0-dim parameter)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(5, 3)
        self.temperature = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.linear(x) / self.temperature


@pytest.mark.parametrize("vectorize", [True, False])
def test_a_zero_dimensional_parameter_is_sliced_like_any_other(vectorize):
    """Regression: unflattening a 0-dim parameter from a (P,) vector failed ("view()
    received an invalid combination of arguments") and was reported as a model error."""
    torch.manual_seed(0)
    net = Tempered().to(F64)
    x, y = class_data()
    r = landscape(net, (x, y), 1, grid=5, bias="normalize", vectorize=vectorize)
    layout = ParamLayout.of(net)
    assert layout.shapes[layout.names.index("temperature")] == torch.Size([])
    theta = flat_parameters(net, layout)
    moved = copy.deepcopy(net)
    with torch.no_grad():
        for name, value in layout.unflatten(theta + r.x[-1] * r.directions[0].double()).items():
            moved.get_parameter(name).copy_(value)
        expected = nn.functional.cross_entropy(moved(x), y).item()
    assert r.loss[-1].item() == pytest.approx(expected, rel=1e-12)


def test_affine_rows_are_the_block_formula_one_row_at_a_time():
    from sharpscope.analysis._functional import AffineRows, evaluate_parameter_sets

    net = mlp()
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(2, layout.size, generator=g, dtype=F64)
    coefficients = torch.randn(5, 2, generator=g, dtype=F64)
    block = theta + coefficients @ directions
    rows = AffineRows(layout, theta, directions, coefficients)
    assert len(rows) == 5 and len(rows[1:4]) == 3
    for i in range(5):
        formed = rows.tensors(i)
        assert list(formed) == list(layout.names)
        torch.testing.assert_close(layout.flatten(formed), block[i], rtol=1e-14, atol=1e-14)
    third = rows[2:3].tensors(0)
    assert all(torch.equal(third[n], v) for n, v in rows.tensors(2).items())  # same alone
    assert "0.weight" not in AffineRows(
        layout, theta, directions, coefficients, frozenset({"0.weight"})
    ).tensors(0)
    x, y = class_data()
    loss_fn = nn.functional.cross_entropy
    lazy = evaluate_parameter_sets(
        net, layout, rows, [(x, y)], loss_fn, classification=True, vectorize=False
    )
    eager = evaluate_parameter_sets(
        net, layout, block, [(x, y)], loss_fn, classification=True, vectorize=False
    )
    torch.testing.assert_close(lazy, eager, rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match="for the loop"):
        evaluate_parameter_sets(net, layout, rows, [(x, y)], loss_fn, classification=True)


def test_models_the_flat_vector_cannot_hold_are_one_line():
    """Regressions (acceptance report, session 15): mixed parameter dtypes were reported
    as a model failure, an uninitialized lazy module crashed."""
    from sharpscope.analysis.msharpness import m_sharpness

    x, y = class_data(n=16, d=4)

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3).double()

        def forward(self, x):
            return self.b(torch.tanh(self.a(x.float())).double())

    lazy = nn.Sequential(nn.LazyLinear(5), nn.Tanh(), nn.Linear(5, 3))
    for model, message in (
        (Mixed(), r"mixed dtypes \(float32, float64\)"),
        (lazy, "not initialized yet"),
    ):
        for run in (
            lambda m: landscape(m, (x, y), 1, grid=3),
            lambda m: m_sharpness(m, (x, y), 8, 0.05),
        ):
            with pytest.raises(SharpscopeError, match=message):
                run(model)


def test_a_landscape_of_biases_alone_asks_for_bias_normalize_and_zero_width_layers_pass():
    torch.manual_seed(0)
    net = mlp()
    for name, p in net.named_parameters():
        p.requires_grad_(name.endswith("bias"))  # BitFit: only the biases are trained
    x, y = class_data()
    with pytest.raises(SharpscopeError, match="bias='normalize'"):
        landscape(net, (x, y), 2, grid=3)
    r = landscape(net, (x, y), 2, grid=3, bias="normalize")
    assert float(r.loss.max() - r.loss.min()) > 0 and math.isfinite(r.cosine)

    class WithEmptyLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.l, self.extra = nn.Linear(5, 3), nn.Linear(5, 0)

        def forward(self, x):
            return self.l(x) + self.extra(x).sum()

    torch.manual_seed(0)
    empty = WithEmptyLayer().to(F64)
    r = landscape(empty, (x, y), 1, grid=3)
    plain = nn.Linear(5, 3).to(F64)
    plain.load_state_dict(empty.l.state_dict())
    moved = copy.deepcopy(plain)
    direction = ParamLayout.of(empty).unflatten(r.directions[0].double())
    with torch.no_grad():
        moved.weight += r.x[-1] * direction["l.weight"]
        expected = nn.functional.cross_entropy(moved(x), y).item()
    assert r.loss[-1].item() == pytest.approx(expected, rel=1e-12)


def test_degenerate_interpolation_and_pca_are_refused_and_a_zero_direction_has_no_cosine():
    """Acceptance report, session 15: identical end points gave a constant 'landscape', a
    trajectory on a line an empty second PCA axis, both without a word."""
    net = bn_cnn()
    x, y = class_data(n=16, d=10)
    with pytest.raises(SharpscopeError, match="same trainable weights and statistics"):
        landscape(net, (x, y), 1, directions=copy.deepcopy(net), grid=3)
    step = copy.deepcopy(net)
    with torch.no_grad():
        for p in step.parameters():
            p.add_(0.1)
    line = [copy.deepcopy(step), copy.deepcopy(step), copy.deepcopy(net)]
    with pytest.raises(SharpscopeError, match="spans fewer than 2 dimensions"):
        landscape(net, (x, y), 2, directions=line, grid=3, bias="keep")
    # float32 checkpoints on a line: their second component is float32 rounding (~1e-7)
    torch.manual_seed(0)
    net32 = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    step32 = {k: torch.randn_like(v) * 0.1 for k, v in net32.state_dict().items()}
    line32 = []
    for t in (0.0, 0.3, 0.55, 1.0):
        point = copy.deepcopy(net32)
        point.load_state_dict(
            {
                k: (v.double() + t * step32[k].double()).float()
                for k, v in net32.state_dict().items()
            }
        )
        line32.append(point)
    x32, y32 = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with pytest.raises(SharpscopeError, match="spans fewer than 2 dimensions"):
        landscape(line32[-1], (x32, y32), 2, directions=line32, grid=3, bias="normalize")
    assert landscape(line32[-1], (x32, y32), 1, directions=line32, grid=3).complete
    # only the running statistics differ: the weights' direction is zero, its cosine NaN
    stats = copy.deepcopy(net)
    with torch.no_grad():
        stats[2].running_var.mul_(2.0)
    r = landscape(net, (x, y), 2, directions=stats, grid=3)
    assert r.directions[0].abs().max() == 0 and math.isnan(r.cosine)
    assert r.loss[0, 1] != r.loss[1, 1]  # the statistics move along the first axis


def test_a_single_x_value_is_one_point():
    """x=0.5 evaluated one point; the grid's memory check made it a TypeError."""
    net = mlp()
    x, y = class_data()
    result = landscape(net, (x, y), dims=1, x=0.5)
    assert result.loss.shape == (1,) and bool(torch.isfinite(result.loss).all())


# ------------------------------------------------------- the GPU default: vmap or the loop
def test_forward_flops_counts_matrix_products_and_convolutions_exactly():
    from sharpscope.analysis.landscape import forward_flops

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )
    x = torch.randn(2, 3, 8, 8)
    conv = 2 * (3 * 3 * 3) * (4 * 8 * 8)  # 2 FLOPs per multiply-add, per output
    linear = 2 * (4 * 8 * 8) * 10
    assert forward_flops(model, x) == 2 * (conv + linear)
    assert forward_flops(model, x, per_example=True) == conv + linear
    assert forward_flops(nn.ReLU(), x) is None  # nothing to count: no opinion
    assert forward_flops(nn.Linear(7, 2), x) is None  # a pass that fails: no opinion


def test_vmap_is_the_gpu_default_only_while_one_point_leaves_the_gpu_idle(monkeypatch):
    """H200 (132 multiprocessors): vmap 1.06x the loop at 42 GFLOP per point, 0.84x at 84."""
    from types import SimpleNamespace

    from sharpscope.analysis.landscape import VMAP_MAX_FLOPS_PER_SM, vmap_pays_on_gpu

    def gpu_with(multiprocessors):
        props = SimpleNamespace(multi_processor_count=multiprocessors)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)

    gpu_with(132)
    assert vmap_pays_on_gpu(42e9, "cuda") and not vmap_pays_on_gpu(84e9, "cuda")
    assert vmap_pays_on_gpu(132 * VMAP_MAX_FLOPS_PER_SM, "cuda")
    gpu_with(20)  # a smaller GPU fills sooner
    assert not vmap_pays_on_gpu(42e9, "cuda") and vmap_pays_on_gpu(5e9, "cuda")


def test_the_default_path_goes_by_the_flops_of_one_point(monkeypatch):
    """The loop on CPU; on a GPU vmap until one point's pass over the largest batch fills
    it (a GPU of 2 multiprocessors here, so that a small model fills it)."""
    from types import SimpleNamespace

    from sharpscope.analysis.landscape import default_vectorize, forward_flops

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 50), nn.BatchNorm1d(50), nn.Tanh(), nn.Linear(50, 3))
    batches = [(torch.randn(64, 10), torch.randint(0, 3, (64,)))] * 2 + [
        (torch.randn(8, 10), torch.randint(0, 3, (8,)))
    ]
    per_example = 2 * (10 * 50 + 50 * 3)
    assert default_vectorize(model, batches, torch.device("cpu")) == (False, None)
    props = SimpleNamespace(multi_processor_count=2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    gpu = torch.device("cuda")
    assert default_vectorize(model, batches, gpu) == (True, 64.0 * per_example)
    huge = [(torch.randn(64, 10), torch.randint(0, 3, (2 * 10**7,)))]  # only len(y) counts
    assert default_vectorize(model, huge, gpu) == (False, 2e7 * per_example)
    assert default_vectorize(model, batches, gpu, precompute_input=True) == (False, None)
    # counting leaves a model in train mode as it was, BatchNorm statistics included
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert forward_flops(model, batches[0][0]) == 64 * per_example
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_direction_helpers_are_still_importable_from_landscape():
    """Review, session 21: moving them to directions.py dropped them from landscape."""
    import importlib

    directions = importlib.import_module("sharpscope.analysis.directions")
    module = importlib.import_module("sharpscope.analysis.landscape")  # not the function

    assert module.normalize_direction is directions.normalize_direction
    assert module.random_direction is directions.random_direction
    assert {"normalize_direction", "random_direction"} <= set(module.__all__)


# -- mutation-testing gaps (session 24) ---------------------------------------------------


def _small_mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(F64)


def _small_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 5, generator=g, dtype=F64), torch.randint(0, 3, (12,), generator=g)


def test_2d_interpolation_second_direction_is_filter_normalized_and_cosine_exact():
    """The β direction of a 2-D interpolation is the seeded random direction normalized as
    asked (each weight row has its weight row's norm, biases 0), and the cosine is
    d0·d1/(‖d0‖‖d1‖) with ‖d0‖ ≠ ‖d1‖ (random directions alone have equal norms)."""
    a, b = _small_mlp(0), _small_mlp(1)
    r = landscape(a, _small_data(), 2, directions=b, grid=3)
    layout = ParamLayout.of(a)
    theta = flat_parameters(a, layout).double()
    d0, d1 = r.directions.double()
    torch.testing.assert_close(d0, flat_parameters(b, layout).double() - theta, rtol=0, atol=0)
    for _, shape, sl in layout.slices():
        dd, ww = d1[sl].view(shape), theta[sl].view(shape)
        if len(shape) <= 1:
            assert not dd.any()
        else:
            torch.testing.assert_close(dd.norm(dim=1), ww.norm(dim=1), rtol=1e-9, atol=0)
    assert abs(float(d0.norm() / d1.norm()) - 1) > 0.05
    assert r.cosine == pytest.approx(float(d0 @ d1 / (d0.norm() * d1.norm())), abs=1e-12)


def test_cosine_of_unnormalized_random_directions():
    r = landscape(_small_mlp(0), _small_data(), 2, grid=3, norm="none", bias="keep")
    d0, d1 = r.directions.double()
    assert r.cosine == pytest.approx(float(d0 @ d1 / (d0.norm() * d1.norm())), abs=1e-12)


# -- resume gaps found by mutation testing (session 24, notes_out/s24/mut_cli.md) -------------


class _CountingLoss:
    """Cross-entropy that counts its calls and raises KeyboardInterrupt after ``stop``."""

    __name__ = "cross_entropy"

    def __init__(self, stop=None):
        self.calls, self.stop = 0, stop

    def __call__(self, out, t):
        if is_loss_check(t):
            return nn.functional.cross_entropy(out, t)
        if self.stop is not None and self.calls >= self.stop:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return nn.functional.cross_entropy(out, t)


_RESUME = {"grid": 5, "chunk_size": 4, "seed": 2, "save_every": 1e9}  # 25 points, 7 blocks


def test_a_resumed_loop_evaluates_only_the_points_the_file_lacks(tmp_path):
    """Mutant: the loop's rows `(~computed[block]).nonzero()` -> `torch.arange(len(block))`
    (a resumed run re-evaluates the finished points of a half-done block). The loop makes
    one loss call per point (one batch): 6 done before the interrupt, 19 after."""
    net, (x, y) = bn_cnn(), class_data(n=20, d=10)
    path = tmp_path / "run.npz"
    first = _CountingLoss(stop=6)
    with pytest.raises(KeyboardInterrupt):
        landscape(net, (x, y), 2, out=path, loss=first, vectorize=False, **_RESUME)
    assert int(LandscapeResult.load(path).computed.sum()) == 6
    again = _CountingLoss()
    resumed = landscape(net, (x, y), 2, out=path, loss=again, vectorize=False, **_RESUME)
    assert resumed.complete and resumed.meta.extra["points_loaded"] == 6
    assert again.calls == 25 - 6


def test_a_resumed_vmap_run_evaluates_only_the_blocks_the_file_lacks(tmp_path):
    """Mutant: drop the `if not bool(computed[idx].all())` filter of the blocks (a resumed
    vmap run evaluates every finished block again). vmap makes one loss call per block of 4:
    2 blocks before (--max-points 8), the 5 others after."""
    net, (x, y) = bn_cnn(), class_data(n=20, d=10)
    path = tmp_path / "run.npz"
    first = _CountingLoss()
    part = landscape(net, (x, y), 2, out=path, loss=first, vectorize=True, max_points=8, **_RESUME)
    assert int(part.computed.sum()) == 8 and first.calls == 2
    again = _CountingLoss()
    resumed = landscape(net, (x, y), 2, out=path, loss=again, vectorize=True, **_RESUME)
    assert resumed.complete and resumed.meta.extra["points_loaded"] == 8
    assert again.calls == 5


def test_resuming_around_other_weights_is_refused(tmp_path):
    """Mutant: drop `"params": fingerprint(theta)` from the settings. The file holds points
    around one model; a run around another model (another epoch's checkpoint, the same
    --out) merged the two grids into one landscape without a word."""
    (x, y), path = class_data(n=20, d=10), tmp_path / "run.npz"
    landscape(bn_cnn(seed=0), (x, y), 2, out=path, max_points=8, vectorize=False, **_RESUME)
    with pytest.raises(SharpscopeError, match=r"different settings \(params\)"):
        landscape(bn_cnn(seed=1), (x, y), 2, out=path, vectorize=False, **_RESUME)


def test_resuming_with_another_loss_is_refused(tmp_path):
    """Mutant: drop `"loss": loss_name(loss)` from the settings. Points of cross-entropy and
    of another loss merged into one grid."""
    net, (x, y), path = bn_cnn(), class_data(n=20, d=10), tmp_path / "run.npz"
    landscape(net, (x, y), 2, out=path, max_points=8, vectorize=False, **_RESUME)

    def margin(out, t):
        return nn.functional.multi_margin_loss(out, t)

    with pytest.raises(SharpscopeError, match=r"different settings \(loss\)"):
        landscape(net, (x, y), 2, out=path, loss=margin, vectorize=False, **_RESUME)


def test_resuming_on_other_data_is_refused(tmp_path):
    """The file's points are losses on one data set; other examples (another --samples,
    another split) must not be merged into the same grid."""
    net, path = bn_cnn(), tmp_path / "run.npz"
    landscape(net, class_data(n=20, d=10), 2, out=path, max_points=8, vectorize=False, **_RESUME)
    with pytest.raises(SharpscopeError, match=r"different settings \(data"):
        landscape(net, class_data(n=20, d=10, seed=2), 2, out=path, vectorize=False, **_RESUME)


# -- resume into a file of other directions (session 28, notes_out/s28/resume.md B1) ----------


@pytest.mark.parametrize("dims", [1, 2])
def test_resuming_an_interpolation_towards_another_model_is_refused(tmp_path, dims):
    """B1: the settings named the direction kind, not the second model, so an interpolation
    towards B, stopped, then run into the same file towards C resumed without a word: the
    file held B's points, C's BatchNorm statistics moved the new ones, and it said it was
    complete. The same second model (in float32, as checkpoints are) still resumes."""
    a, b, c = (bn_cnn(seed=s).float() for s in (0, 1, 2))
    x, y = class_data(n=20, d=10)
    x = x.float()
    kw = {"grid": 5, "chunk_size": 2, "vectorize": False, "save_every": 1e9}
    path = tmp_path / "run.npz"
    landscape(a, (x, y), dims, directions=b, out=path, max_points=2, **kw)
    with pytest.raises(SharpscopeError, match=r"along other directions \(another second model"):
        landscape(a, (x, y), dims, directions=c, out=path, **kw)
    assert int(LandscapeResult.load(path).computed.sum()) == 2  # the file is left as it was
    resumed = landscape(a, (x, y), dims, directions=copy.deepcopy(b), out=path, **kw)
    full = landscape(a, (x, y), dims, directions=b, **kw)
    assert resumed.complete and resumed.meta.extra["points_loaded"] == 2
    torch.testing.assert_close(resumed.loss, full.loss, rtol=0, atol=0)


def test_resuming_a_pca_of_another_trajectory_is_refused(tmp_path):
    """B1: with the same axes (given here; a CLI run's come from the trajectory and mostly
    differ too) a PCA of another trajectory resumed into the first one's file."""
    net, (x, y), path = mlp(seed=5), class_data(), tmp_path / "run.npz"
    t = torch.linspace(0, 1, 8, dtype=F64)
    coefs = torch.stack([3 * (1 - t) ** 2 + 0.2, 2 * torch.sin(3 * t)], dim=1)
    first, _ = planted_trajectory(net, coefs)
    other, _ = planted_trajectory(net, coefs.flip(1))
    kw = {"x": [-1.0, 0.0, 1.0], "y": [-1.0, 0.0, 1.0], "bias": "keep", "out": path}
    landscape(net, (x, y), 2, directions=first, max_points=3, chunk_size=3, **kw)
    with pytest.raises(SharpscopeError, match=r"along other directions \(another trajectory"):
        landscape(net, (x, y), 2, directions=other, **kw)
    assert landscape(net, (x, y), 2, directions=first, **kw).complete


def test_resuming_with_another_batch_size_names_the_batch_size(tmp_path):
    """B7: the data's fingerprint was taken batch by batch, so a resume with another batch
    size was refused as "different settings (data)", though the examples were the same.
    The batches round each mean loss differently, so it is still refused, naming the batch
    size; one batch of all the examples is the same as no batch size."""
    net, (x, y), path = bn_cnn(), class_data(n=20, d=10), tmp_path / "run.npz"
    landscape(net, (x, y), 2, out=path, batch_size=8, max_points=8, **_RESUME)
    with pytest.raises(SharpscopeError) as info:
        landscape(net, (x, y), 2, out=path, batch_size=5, **_RESUME)
    assert str(info.value) == (
        f"{path} holds a landscape computed in batches of 8 examples, not 5 (another batch "
        "size rounds each mean loss differently): resume it with batch size 8, or delete it "
        "or choose another output to start a new one"
    )
    assert landscape(net, (x, y), 2, out=path, batch_size=8, **_RESUME).complete
    whole = tmp_path / "whole.npz"
    landscape(net, (x, y), 2, out=whole, max_points=8, **_RESUME)
    assert landscape(net, (x, y), 2, out=whole, batch_size=20, **_RESUME).complete
    with pytest.raises(SharpscopeError, match=r"different settings \(data\)"):  # still data
        landscape(net, class_data(n=20, d=10, seed=2), 2, out=path, batch_size=8, **_RESUME)


def test_a_file_from_before_the_batch_size_setting_still_resumes(tmp_path):
    """B7: files of earlier versions fingerprinted the data batch by batch and held no
    batch size; they resume in the same batches, and are refused in others, as before."""
    import dataclasses

    from sharpscope.analysis._functional import fingerprint

    net, (x, y), path = bn_cnn(), class_data(n=20, d=10), tmp_path / "run.npz"
    part = landscape(net, (x, y), 2, out=path, batch_size=8, max_points=8, **_RESUME)
    settings = {k: v for k, v in part.settings.items() if k != "batch_size"}
    settings["data"] = fingerprint(x[:8], y[:8], x[8:16], y[8:16], x[16:], y[16:])
    dataclasses.replace(part, settings=settings).save(path)
    with pytest.raises(SharpscopeError, match=r"different settings \(batch_size, data\)"):
        landscape(net, (x, y), 2, out=path, batch_size=5, **_RESUME)
    resumed = landscape(net, (x, y), 2, out=path, batch_size=8, **_RESUME)
    assert resumed.complete and resumed.meta.extra["points_loaded"] == 8


def test_resuming_around_other_batchnorm_statistics_is_refused(tmp_path):
    """B1's kin: the settings fingerprinted the trainable weights alone, so a model with
    other BatchNorm running statistics (recalibrated, another checkpoint of the same
    weights), or an interpolation towards a model with the same weights but other
    statistics (states mode: said as other directions), resumed into the first one's file.
    Files of earlier versions, without the fingerprints, still resume."""
    import dataclasses

    (x, y), path = class_data(n=20, d=10), tmp_path / "run.npz"
    net = bn_cnn()
    landscape(net, (x, y), 2, out=path, max_points=8, vectorize=False, **_RESUME)
    recalibrated = copy.deepcopy(net)
    recalibrated[2].running_var.mul_(2.0)
    with pytest.raises(SharpscopeError, match=r"different settings \(buffers\)"):
        landscape(recalibrated, (x, y), 2, out=path, vectorize=False, **_RESUME)
    part = LandscapeResult.load(path)
    older = {k: v for k, v in part.settings.items() if k != "buffers"}
    dataclasses.replace(part, settings=older).save(path)
    assert landscape(net, (x, y), 2, out=path, vectorize=False, **_RESUME).complete

    other = bn_cnn(seed=1)
    restats = copy.deepcopy(other)
    restats[2].running_mean.add_(0.5)
    kw = {"grid": 5, "chunk_size": 2, "vectorize": False, "save_every": 1e9}
    towards = tmp_path / "towards.npz"
    landscape(net, (x, y), 1, directions=other, out=towards, max_points=2, **kw)
    with pytest.raises(SharpscopeError, match=r"along other directions \(another second model"):
        landscape(net, (x, y), 1, directions=restats, out=towards, **kw)


@pytest.mark.parametrize("vectorize", [False, True])
def test_a_loss_that_reads_the_weights_is_refused_as_by_the_other_analyses(vectorize):
    """CE + (λ/2)||θ||² over model.parameters(): the loop, which sets the weights in place,
    followed the term, while vmap and folded BatchNorm copies held it at the centre's
    weights, so the same loss gave two landscapes; it is refused, as the Hessian does."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = class_data(n=12, d=4)

    def regularised(out, t):
        return nn.functional.cross_entropy(out, t) + 0.1 * net[0].weight.square().sum()

    with pytest.raises(SharpscopeError, match="the loss reads the model's parameters"):
        landscape(net, (x, y), 1, grid=3, loss=regularised, vectorize=vectorize)
