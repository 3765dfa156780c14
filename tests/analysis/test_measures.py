"""Average-case sharpness, Keskar ε-sharpness and PAC-Bayes flatness against exact answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm as normal
from torch import nn

from sharpscope.analysis._functional import seeded_generator
from sharpscope.analysis.measures import (
    AverageSharpness,
    PacBayesFlatness,
    average_sharpness,
    epsilon_sharpness,
    keskar_subspace,
    pac_bayes_flatness,
)
from sharpscope.analysis.msharpness import m_sharpness
from sharpscope.errors import SharpscopeError

from cases import half_mse

torch.set_num_threads(1)
F64 = torch.float64


def mean_output(out, t):
    return out.mean()


def linear_regression(n=24, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=F64))
    x = torch.randn(n, d, generator=g, dtype=F64)
    y = torch.randn(n, generator=g, dtype=F64)
    return model, x, y


def bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).to(F64)
    with torch.no_grad():
        net[1].running_mean.uniform_(-0.3, 0.3)
        net[1].running_var.uniform_(0.5, 2.0)
    return net


def class_data(n=30, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=F64), torch.randint(0, 3, (n,), generator=g)


# --- average-case sharpness -----------------------------------------------------------------


@pytest.mark.parametrize(("adaptive", "eta"), [(False, 0.0), (True, 0.0), (True, 1.0)])
def test_average_sharpness_matches_gaussian_expectation(adaptive, eta):
    """E[gᵀδ + ½δᵀAδ] = ½ρ² tr(T A T); Var = ρ²‖Tg‖² + ½ρ⁴ tr((TAT)²) per draw."""
    model, x, y = linear_regression()
    m, rho, draws = 6, 0.3, 400
    kw = {"adaptive": adaptive, "eta": eta, "loss": half_mse, "seed": 3}
    r = average_sharpness(model, (x, y), rho=rho, m=m, num_draws=draws, **kw)
    w = model.weight.detach()[0]
    t = torch.diag(w.abs() + eta if adaptive else torch.ones_like(w))
    means, variances = [], []
    for j in range(len(y) // m):
        xj, yj = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
        g, a = xj.T @ (xj @ w - yj) / m, xj.T @ xj / m
        tat = t @ a @ t
        means.append(0.5 * rho**2 * torch.trace(tat))
        variances.append(rho**2 * (t @ g).pow(2).sum() + 0.5 * rho**4 * torch.trace(tat @ tat))
    exact = float(torch.stack(means).mean())
    exact_stderr = math.sqrt(float(torch.stack(variances).sum()) / draws) / len(means)
    assert abs(r.sharpness - exact) <= 4 * exact_stderr
    assert r.stderr == pytest.approx(exact_stderr, rel=0.3)
    assert r.num_subsets == 4 and r.num_draws == draws


def test_average_error_increase_matches_gaussian_expectation():
    """Linear classifier, δ ~ N(0, ρ²I): E err(w + δ) − err(w) in closed form, as
    :func:`expected_drop` (tolerance 0.005: 5 standard errors of 6 × 200 draws, 0.001)."""
    model, x, y = linear_classifier(n=600)
    rho = 0.5
    r = average_sharpness(model, (x, y), rho=rho, m=100, num_draws=200, seed=1)
    exact = expected_drop(model, x, y, rho, magnitude_aware=False)
    assert exact > 0.05
    assert r.error_increase == pytest.approx(exact, abs=0.005)


def test_average_sharpness_vectorized_equals_loop_and_saves(tmp_path):
    net = bn_net()
    x, y = class_data()
    kw = {"rho": 0.2, "m": 5, "num_draws": 3, "adaptive": True, "chunk_size": 4, "seed": 1}
    a = average_sharpness(net, (x, y), **kw)
    b = average_sharpness(net, (x, y), vectorize=False, **kw)
    torch.testing.assert_close(a.per_subset, b.per_subset, rtol=1e-10, atol=1e-12)
    assert a.error_increase == pytest.approx(b.error_increase, abs=1e-12)
    assert math.isfinite(a.sharpness) and a.sharpness != 0
    loaded = AverageSharpness.load(a.save(tmp_path / "avg.json"))
    assert loaded.sharpness == a.sharpness


def test_average_sharpness_bad_input():
    model, x, y = linear_regression()
    with pytest.raises(SharpscopeError, match="rho must be > 0"):
        average_sharpness(model, (x, y), rho=0.0, loss=half_mse)
    with pytest.raises(SharpscopeError, match="larger than the 24 examples"):
        average_sharpness(model, (x, y), rho=0.1, m=25, loss=half_mse)
    with pytest.raises(SharpscopeError, match="applies to adaptive sharpness only"):
        average_sharpness(model, (x, y), rho=0.1, eta=0.5, loss=half_mse)  # η was ignored


# --- Keskar ε-sharpness ---------------------------------------------------------------------


class SeparableQuadratic(nn.Module):
    """L(w) = ½ Σ a_i (w_i − c_i)², the same for every example."""

    def __init__(self, a, c, w):
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("c", c)
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        return (0.5 * (self.a * (self.w - self.c) ** 2).sum()).expand(len(x))


@pytest.mark.parametrize("batch_size", [None, 5])  # 5: batches of 5, 5, 5, 2 weigh n_b/N
def test_epsilon_sharpness_linear_loss_is_the_box_vertex(batch_size):
    model, x, _ = linear_regression(n=17, d=5, seed=2)
    with torch.no_grad():
        model.weight.abs_()
    x = x.abs()  # L(w) = x̄ᵀw > 0
    eps = 1e-3
    r = epsilon_sharpness(model, (x, torch.zeros(17)), eps, loss=mean_output, batch_size=batch_size)
    w, gbar = model.weight.detach()[0], x.mean(0)
    clean = float(gbar @ w)
    exact_max = clean + float((gbar.abs() * eps * (w.abs() + 1)).sum())
    assert r.clean_loss == pytest.approx(clean, rel=1e-12)
    assert r.max_loss == pytest.approx(exact_max, rel=1e-10)
    assert r.sharpness == pytest.approx(100 * (exact_max - clean) / (1 + clean), rel=1e-8)
    # regression: the optimizer's start point once shadowed the clock's, giving an array
    assert isinstance(r.seconds, float) and 0 <= r.seconds < 60


def test_epsilon_sharpness_separable_quadratic():
    g = torch.Generator().manual_seed(0)
    d = 6
    a = torch.rand(d, generator=g, dtype=F64) + 0.5
    c = torch.randn(d, generator=g, dtype=F64)
    w = c + torch.randn(d, generator=g, dtype=F64)
    model = SeparableQuadratic(a, c, w)
    eps = 5e-4
    r = epsilon_sharpness(
        model, (torch.zeros(4, 1, dtype=F64), torch.zeros(4)), eps, loss=mean_output
    )
    box = eps * (w.abs() + 1)
    per_coord = torch.maximum(0.5 * a * (w + box - c) ** 2, 0.5 * a * (w - box - c) ** 2)
    clean = float((0.5 * a * (w - c) ** 2).sum())
    assert r.max_loss == pytest.approx(float(per_coord.sum()), rel=1e-10)
    assert r.sharpness == pytest.approx(100 * (r.max_loss - clean) / (1 + clean), rel=1e-12)


def test_epsilon_sharpness_random_subspace_linear_loss():
    model, x, _ = linear_regression(n=12, d=8, seed=4)
    x = x.abs()
    with torch.no_grad():
        model.weight.abs_()
    eps, p = 1e-3, 3
    r = epsilon_sharpness(
        model, (x, torch.zeros(12)), eps, subspace_dim=p, seed=5, loss=mean_output
    )
    basis = keskar_subspace(8, p, 5)
    w, gbar = model.weight.detach()[0], x.mean(0)
    bound = eps * (torch.linalg.pinv(basis) @ w).abs() + eps
    exact_gain = float(((basis.T @ gbar).abs() * bound).sum())
    assert r.max_loss - r.clean_loss == pytest.approx(exact_gain, rel=1e-8)
    full = epsilon_sharpness(model, (x, torch.zeros(12)), eps, loss=mean_output)
    assert r.subspace_dim == p and 0 < r.sharpness < full.sharpness


class QuadraticBowl(nn.Module):
    """L(w) = L* + ½ (w − c)ᵀA(w − c), the same for every example."""

    def __init__(self, A, c, w, floor):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("c", c)
        self.floor = floor
        self.w = nn.Parameter(w.clone())

    def forward(self, x):
        r = self.w - self.c
        return (self.floor + 0.5 * r @ self.A @ r).expand(len(x))


def box_vertex_maximum(A, offset, box):
    """max over the box |z_i| <= box_i of ½(offset + z)ᵀA(offset + z), A positive definite:
    a convex function's maximum over a box is at a vertex, so enumerate the 2^P vertices."""
    signs = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=len(box))), dtype=F64)
    r = offset + signs * box
    return float((0.5 * ((r @ A) * r).sum(1)).max())


@pytest.mark.parametrize("offset_scale", [1e-7, 1e-12])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_b3_epsilon_sharpness_at_a_minimum_is_the_box_vertex_maximum(offset_scale, seed):
    """Stress B3 (session 28): near a minimum (every |∂L/∂w_i| < 1e-5) scipy's default
    gtol ended L-BFGS-B before its first iteration, and ε-sharpness was exactly 0.

    L = 0.9 + ½(w − c)ᵀA(w − c), A = uuᵀ + diag(a) with u > 0 (its only locally maximal
    vertices are ±(b_1, ..., b_P)), at w = c + δ: |δ| ~ 1e-7 (∇L ~ 1e-6, which the fixed
    tolerance now lets L-BFGS-B follow) and |δ| ~ 1e-12 (∇L below the rounding of L: a
    seeded random start, as at a critical point). The maximum is the best vertex of the
    box, enumerated exactly.
    """
    g = torch.Generator().manual_seed(seed)
    d, eps, floor = 5, 1e-3, 0.9
    u = torch.rand(d, generator=g, dtype=F64) + 0.5
    A = torch.outer(u, u) + torch.diag(torch.rand(d, generator=g, dtype=F64) * 0.1 + 0.05)
    c = torch.randn(d, generator=g, dtype=F64)
    delta = offset_scale * torch.randn(d, generator=g, dtype=F64)
    model = QuadraticBowl(A, c, c + delta, floor)
    r = epsilon_sharpness(
        model, (torch.zeros(4, 1, dtype=F64), torch.zeros(4)), eps, loss=mean_output, seed=seed
    )
    box = eps * ((c + delta).abs() + 1)
    clean = floor + 0.5 * float(delta @ A @ delta)
    exact = floor + box_vertex_maximum(A, delta, box)
    assert r.clean_loss == pytest.approx(clean, rel=1e-14)
    assert r.max_loss == pytest.approx(exact, rel=1e-12)
    assert r.sharpness == pytest.approx(100 * (exact - clean) / (1 + clean), rel=1e-8)


def test_b4_epsilon_sharpness_with_a_non_finite_gradient_is_nan_with_a_warning():
    """Stress B4 (session 28): an inf input behind tanh (finite loss, NaN gradient) gave
    0.0 after 42 evaluations on NaN gradients."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    x[3, 2] = float("inf")
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with pytest.warns(RuntimeWarning, match="finite but its gradient is not") as w:
        r = epsilon_sharpness(net, (x, y))
    assert math.isnan(r.sharpness) and math.isnan(r.max_loss) and math.isfinite(r.clean_loss)
    assert r.num_function_evals == 1 and w[0].filename == __file__


def test_b4_epsilon_sharpness_with_a_loss_undefined_in_the_box_is_nan_with_a_warning():
    """A NaN loss inside the box lost every comparison (max(best, nan) is best), so the
    largest finite loss was reported; the maximum is NaN there, as in m_sharpness."""
    net = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(0.1)
    x, y = torch.ones(8, 4, dtype=F64), torch.zeros(8, dtype=F64)

    def root(out, t):  # defined while the mean output stays below 1, where ascent leads
        return -torch.sqrt(1 - out.mean())

    assert math.isfinite(epsilon_sharpness(net, (x, y), 0.01, loss=root).sharpness)
    with pytest.warns(RuntimeWarning, match="not finite at some point of the box"):
        r = epsilon_sharpness(net, (x, y), 1.0, loss=root)
    assert math.isnan(r.sharpness) and math.isnan(r.max_loss)


def test_epsilon_sharpness_bad_input():
    model, x, y = linear_regression()
    with pytest.raises(SharpscopeError, match="epsilon must be > 0"):
        epsilon_sharpness(model, (x, y), 0.0, loss=half_mse)


@pytest.mark.parametrize(
    "measure, value",
    [
        (lambda net, data: average_sharpness(net, data, rho=0.1), "sharpness"),
        (lambda net, data: epsilon_sharpness(net, data), "sharpness"),
        (lambda net, data: pac_bayes_flatness(net, data), "flatness"),
        (lambda net, data: m_sharpness(net, data, m=24, rho=0.1), "sharpness"),
    ],
    ids=["average", "epsilon", "pac_bayes", "m_sharpness"],
)
@pytest.mark.parametrize("where", ["weight", "input"])
def test_b5_a_non_finite_clean_loss_is_nan_with_a_warning_in_every_measure(measure, value, where):
    """Stress B5 (session 28): with a NaN weight, PAC-Bayes halved σ 15 times on NaN drops
    and reported 1/σ² = 2.7e8 ("extremely sharp"), average sharpness gave NaN without a
    word, and ε-sharpness said "needs L(w) > -1"; now each says what m_sharpness says."""
    torch.manual_seed(0)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    with torch.no_grad():
        if where == "weight":
            net[0].weight[0, 0] = float("nan")
        else:
            x[3, 2] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite at the model's own weights") as w:
        result = measure(net, (x, y))
    assert math.isnan(getattr(result, value))
    assert all(item.filename == __file__ for item in w)


def test_b5_pac_bayes_spends_no_draws_on_a_model_without_an_accuracy():
    torch.manual_seed(0)
    x, y = torch.randn(24, 6), torch.randint(0, 3, (24,))
    net = nn.Linear(6, 3)
    with torch.no_grad():
        net.bias[0] = float("nan")
    with pytest.warns(RuntimeWarning, match="PAC-Bayes flatness: the loss"):
        r = pac_bayes_flatness(net, (x, y))
    assert r.search == [] and r.num_halvings_used == 0 and not r.converged
    assert math.isnan(r.sigma) and math.isnan(r.accuracy) and math.isnan(r.accuracy_drop)


def test_b5_average_sharpness_says_when_a_noise_draw_makes_the_loss_undefined():
    net = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        net.weight.fill_(0.1)
    x, y = torch.ones(8, 4, dtype=F64), torch.zeros(8, dtype=F64)

    def root(out, t):  # defined while the mean output stays below 1
        return -torch.sqrt(1 - out.mean())

    with pytest.warns(RuntimeWarning, match=r"^1 of 1 subsets .* at some of its noise draws"):
        r = average_sharpness(net, (x, y), rho=2.0, loss=root)
    assert math.isnan(r.sharpness) and math.isfinite(r.clean_loss)


# --- PAC-Bayes flatness ---------------------------------------------------------------------


def linear_classifier(n=1000, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 2, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, d, generator=g, dtype=F64))
    x = torch.randn(n, d, generator=g, dtype=F64)
    diff = model.weight.detach()[1] - model.weight.detach()[0]
    y = ((x @ diff + 0.5 * torch.randn(n, generator=g, dtype=F64)) > 0).long()
    return model, x, y


def noise_std(model, sigma, magnitude_aware, eps=1e-3):
    w = model.weight.detach()
    return (sigma**2 * w**2 + eps**2).sqrt() if magnitude_aware else torch.full_like(w, sigma)


def expected_drop(model, x, y, sigma, magnitude_aware):
    """acc(w) − E acc(w + ξ): the logit gap (w1 − w0 + ξ1 − ξ0)ᵀx is Gaussian."""
    w = model.weight.detach()
    sign = 2.0 * y.double() - 1
    margin = sign * (x @ (w[1] - w[0]))
    var = noise_std(model, sigma, magnitude_aware).pow(2).sum(0)  # v1k + v0k
    tau = (x.pow(2) @ var).sqrt()
    clean = (margin > 0).double().mean()
    return float(clean - torch.as_tensor(normal.cdf((margin / tau).numpy())).mean())


def drop_std_per_draw(model, x, y, sigma, magnitude_aware, draws=400):
    g = torch.Generator().manual_seed(99)
    w = model.weight.detach()
    std = noise_std(model, sigma, magnitude_aware)
    accs = []
    for _ in range(draws):
        wn = w + std * torch.randn(w.shape, generator=g, dtype=F64)
        accs.append(float(((x @ wn.T).argmax(1) == y).double().mean()))
    return float(np.std(accs))


@pytest.mark.parametrize("magnitude_aware", [False, True])
def test_pac_bayes_sigma_hits_the_target_drop(magnitude_aware):
    model, x, y = linear_classifier()
    draws = 50
    r = pac_bayes_flatness(model, (x, y), magnitude_aware=magnitude_aware, num_draws=draws)
    assert r.converged and abs(r.accuracy_drop - 0.1) <= 0.01
    assert r.flatness == pytest.approx(1 / r.sigma**2)
    exact = expected_drop(model, x, y, r.sigma, magnitude_aware)
    slack = 4 * drop_std_per_draw(model, x, y, r.sigma, magnitude_aware) / math.sqrt(draws)
    assert abs(exact - 0.1) <= 0.01 + slack
    assert r.num_halvings_used == len(r.search) <= 15
    assert r.search[0][0] == 1.0  # the first midpoint of [0, 2]


def test_pac_bayes_first_step_reproduces_the_documented_draws():
    """Step 0 (σ = 1): the drop of the draws ξ from seeded_generator(seed, 0) with
    magnitude-aware std √(σ²w² + ε²), recomputed exactly (ε = 0.2, large enough to matter)."""
    model, x, y = linear_classifier(n=300)
    eps, draws, seed = 0.2, 6, 4
    kw = {"magnitude_aware": True, "num_draws": draws, "epsilon": eps, "seed": seed}
    r = pac_bayes_flatness(model, (x, y), num_halvings=1, **kw)
    w = model.weight.detach()
    xi = torch.randn(draws, *w.shape, generator=seeded_generator(seed, 0), dtype=F64)
    noisy = w + xi * noise_std(model, 1.0, magnitude_aware=True, eps=eps)
    accuracy = ((x @ w.T).argmax(1) == y).double().mean()
    noisy_accuracy = ((x @ noisy.transpose(1, 2)).argmax(-1) == y).double().mean()
    assert r.search[0][0] == 1.0
    assert r.search[0][1] == pytest.approx(float(accuracy - noisy_accuracy), abs=1e-12)


def test_pac_bayes_vectorized_equals_loop_and_roundtrip(tmp_path):
    net = bn_net()
    x, y = class_data(n=60)
    kw = {"num_draws": 4, "num_halvings": 3, "chunk_size": 3, "seed": 2}
    a = pac_bayes_flatness(net, (x, y), **kw)
    b = pac_bayes_flatness(net, (x, y), vectorize=False, **kw)
    np.testing.assert_allclose(np.array(a.search), np.array(b.search), rtol=0, atol=1e-12)
    assert a.sigma == b.sigma
    loaded = PacBayesFlatness.load(a.save(tmp_path / "pb.json"))
    assert loaded.flatness == a.flatness


def test_pac_bayes_needs_class_labels():
    model, x, y = linear_regression()
    with pytest.raises(SharpscopeError, match="class labels"):
        pac_bayes_flatness(model, (x, y), loss=half_mse)


def test_a_keskar_subspace_larger_than_the_parameters_is_refused():
    from sharpscope.analysis.measures import epsilon_sharpness

    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)  # 6 parameters
    data = (torch.randn(8, 2), torch.randint(0, 2, (8,)))
    with pytest.raises(SharpscopeError, match="subspace_dim 100 is larger than the model's 6"):
        epsilon_sharpness(model, data, 1e-3, subspace_dim=100)


def test_keskar_at_a_critical_point_leaves_the_start_and_finds_the_box_maximum():
    """L(δ) = (δ1² + δ2²)/2 at w = 0, where ∇L = 0: the box |δ| ≤ ε has its maximum ε² at
    the corners; L-BFGS-B started at 0 never moved (sharpness 0)."""
    from sharpscope.analysis.measures import epsilon_sharpness

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    data = (torch.eye(2), torch.zeros(2, 1))
    result = epsilon_sharpness(model, data, 1e-3, loss="mse")
    assert result.max_loss == pytest.approx(1e-6, rel=1e-6)
    assert result.sharpness == pytest.approx(100 * 1e-6, rel=1e-6)


@pytest.mark.parametrize(
    "measure",
    [
        lambda net, data: average_sharpness(net, data, rho=0.05, num_draws=2),
        lambda net, data: epsilon_sharpness(net, data, 1e-3),
        lambda net, data: pac_bayes_flatness(net, data, num_halvings=2, num_draws=2),
    ],
    ids=["average", "epsilon", "pac_bayes"],
)
@pytest.mark.parametrize(
    "width, labels", [(5, 3), (4, 7)], ids=["wrong input width", "labels beyond the outputs"]
)
def test_a_model_or_loss_that_does_not_fit_the_data_is_one_line(measure, width, labels):
    """Regression (acceptance report, session 15): these three raised raw tracebacks where
    the spectrum functions and m-sharpness give one line."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randint(0, labels, (16,))
    with pytest.raises(SharpscopeError, match="failed on the data") as info:
        measure(nn.Linear(width, 3), (x, y))
    assert "\n" not in str(info.value)


def test_average_sharpness_and_pac_bayes_fall_back_to_the_loop_for_a_recurrent_model():
    from cases import RecurrentClassifier

    torch.manual_seed(0)
    model, x, y = RecurrentClassifier(nn.LSTM), torch.randn(16, 5, 2), torch.randint(0, 3, (16,))
    for measure, kw, value in (
        (average_sharpness, {"rho": 0.05, "num_draws": 2}, "sharpness"),
        (pac_bayes_flatness, {"num_halvings": 2, "num_draws": 2}, "flatness"),
    ):
        with pytest.raises(SharpscopeError, match="vmap cannot run this model"):
            measure(model, (x, y), vectorize=True, **kw)
        with pytest.warns(RuntimeWarning, match="the loop instead"):
            default = measure(model, (x, y), **kw)
        looped = measure(model, (x, y), vectorize=False, **kw)
        assert default.meta.extra["vectorized"] is False
        assert getattr(default, value) == getattr(looped, value)  # the same computation


def test_a_single_logit_binary_classifier_is_scored_by_its_sign():
    """Regression (acceptance report, session 15): the argmax of one output is always 0, so
    accuracy was the share of label 0 and the 0-1 error increase always 0."""
    import sharpscope as ss

    torch.manual_seed(0)
    x = torch.randn(16, 4, dtype=torch.float64)
    w = torch.randn(4, dtype=torch.float64)
    y = (x @ w > 0).long()
    assert 0 < int(y.sum()) < 16
    net = nn.Linear(4, 1).double()
    with torch.no_grad():
        net.weight.copy_(w)
        net.bias.zero_()

    def bce(out, t):
        return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), t.double())

    land = ss.landscape(net, (x, y), dims=1, grid=3, loss=bce)
    assert land.accuracy[1].item() == 1.0  # the model itself separates the data
    sharp = ss.m_sharpness(net, (x, y), 8, 0.05, loss=bce)
    assert sharp.clean_error == 0.0
    flat = ss.pac_bayes_flatness(net, (x, y), loss=bce, num_halvings=3, num_draws=4)
    assert flat.accuracy == 1.0
    flipped = ss.m_sharpness(net, (x, 1 - y), 8, 0.05, loss=bce)
    assert flipped.clean_error == 1.0


class _Augmented(torch.utils.data.Dataset):
    """Inputs with fresh random noise at every read: random augmentation."""

    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 6, generator=generator)
        self.y = torch.randint(0, 3, (64,), generator=generator)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i] + 0.5 * torch.randn(6), self.y[i]


@pytest.mark.parametrize(
    ("measure", "why"),
    [
        ("landscape", " and a landscape evaluates one fixed data set at every point"),
        ("epsilon_sharpness", " and epsilon-sharpness maximizes over one fixed data set"),
        ("pac_bayes_flatness", " and PAC-Bayes flatness compares one fixed data set"),
        ("average_sharpness", " and average sharpness cuts its subsets"),
        ("m_sharpness", " and m-sharpness cuts its subsets"),
        ("top_eigenvalues", ""),
    ],
)
def test_every_analysis_refuses_data_that_changes_between_reads(measure, why):
    """Python API acceptance, session 21: landscape, epsilon_sharpness and pac_bayes_flatness
    analysed a fresh random augmentation at every call (README: such data is refused);
    average_sharpness's refusal named m-sharpness."""
    import sharpscope as ss

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    options = {
        "landscape": {"dims": 1, "grid": 3},
        "epsilon_sharpness": {"iterations": 1},
        "pac_bayes_flatness": {},
        "average_sharpness": {"rho": 0.01},
        "m_sharpness": {"m": 16, "rho": 0.05},
        "top_eigenvalues": {"k": 1},
    }[measure]
    with pytest.raises(SharpscopeError) as info:
        getattr(ss, measure)(model, _Augmented(), **options)
    assert str(info.value).startswith(
        f"the data changed between two reads (shuffling or random augmentation){why}"
    )
    fixed = torch.utils.data.TensorDataset(_Augmented().x, _Augmented().y)
    getattr(ss, measure)(model, fixed, **options)  # the same data, read alike: accepted


def test_epsilon_sharpness_runs_inside_no_grad_and_names_inference_mode():
    """Python API acceptance, session 21: inside torch.no_grad() (a common notebook cell)
    it failed with "the model or loss failed on the data", unlike the other analyses."""
    import sharpscope as ss

    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    data = torch.randn(32, 6), torch.randint(0, 3, (32,))
    plain = ss.epsilon_sharpness(model, data, iterations=2)
    with torch.no_grad():
        inside = ss.epsilon_sharpness(model, data, iterations=2)
    assert inside.sharpness == plain.sharpness > 0
    with torch.inference_mode(), pytest.raises(SharpscopeError) as info:
        ss.epsilon_sharpness(model, data, iterations=2)
    assert str(info.value).startswith("called inside torch.inference_mode(): epsilon-sharpness")


class _TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(x), x  # logits and features, as many research models return


@pytest.mark.parametrize("measure", ["top_eigenvalues", "m_sharpness", "landscape"])
def test_a_model_returning_a_tuple_is_named_as_such(measure):
    """Python API acceptance, session 21: the one line was torch's inner error only
    ("argument 'input' must be Tensor, not tuple")."""
    import sharpscope as ss

    options = {"top_eigenvalues": {"k": 1}, "m_sharpness": {"m": 8, "rho": 0.05}}
    options["landscape"] = {"dims": 1, "grid": 3}
    data = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with pytest.raises(SharpscopeError) as info:
        getattr(ss, measure)(_TupleOut(), data, **options[measure])
    assert str(info.value).startswith("the model or loss failed on the data: ")
    assert str(info.value).endswith(
        "(did the model, or a layer in it, return a tuple? the analyses and the loss take one "
        "tensor of outputs: wrap the model so that it returns the logits)"
    )


@pytest.mark.parametrize(
    "measure",
    ["m_sharpness", "landscape", "epsilon_sharpness", "average_sharpness", "pac_bayes_flatness"],
)
def test_a_half_precision_model_is_analysed_with_a_warning(measure):
    """Python API acceptance, session 21: a float16 model ran m-sharpness and landscapes at
    float16 resolution without a word, while the Hessian analyses refuse it."""
    import sharpscope as ss

    options = {"m_sharpness": {"m": 8, "rho": 0.05}, "landscape": {"dims": 1, "grid": 3}}
    options["epsilon_sharpness"] = {"iterations": 1}
    options["average_sharpness"] = {"rho": 0.01}
    options["pac_bayes_flatness"] = {"num_draws": 2}
    torch.manual_seed(0)
    data = torch.randn(16, 6), torch.randint(0, 3, (16,))
    with pytest.warns(RuntimeWarning, match=r"^the model is bfloat16: .* at its resolution") as w:
        getattr(ss, measure)(nn.Linear(6, 3).bfloat16(), data, **options[measure])
    (warning,) = [item for item in w if "bfloat16" in str(item.message)]
    assert warning.filename == __file__  # the caller's line, not sharpscope's (review)


def test_data_that_can_be_read_only_once_is_named_as_such():
    """Review, session 21: an iterable that streams once got "the data iterable produced
    no batches" at its second read."""
    import sharpscope as ss

    class Once:
        def __init__(self):
            self.batches = iter([(torch.randn(8, 6), torch.randint(0, 3, (8,)))])

        def __iter__(self):
            return self.batches  # a fresh iterator object, but the same stream

    with pytest.raises(SharpscopeError) as info:
        ss.landscape(nn.Linear(6, 3), Once(), dims=1, grid=3)
    assert str(info.value).startswith("the data can be read only once (")
    assert str(info.value).endswith(": pass tensors or a list of batches")


# -- mutation-testing gaps (session 24) ---------------------------------------------------


def test_keskar_subspace_entries_are_n_0_1_over_p():
    """A's scale sets the subspace box |y| ≤ ε(|A⁺w| + 1): its entries are N(0, 1/p)."""
    a = keskar_subspace(20000, 100, 0)
    assert float(a.var()) * 100 == pytest.approx(1.0, abs=0.02)
    assert float(a.mean()) == pytest.approx(0.0, abs=0.01)


def test_pac_bayes_every_step_uses_its_documented_draws():
    """Step i of the σ search draws ξ from seeded_generator(seed, i): each step's accuracy
    drop, recomputed by hand, for a linear classifier."""
    g = torch.Generator().manual_seed(0)
    model = nn.Linear(5, 2, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 5, generator=g, dtype=F64))
    x = torch.randn(300, 5, generator=g, dtype=F64)
    w = model.weight.detach()
    y = ((x @ (w[1] - w[0]) + 0.5 * torch.randn(300, generator=g, dtype=F64)) > 0).long()
    draws, seed = 6, 4
    r = pac_bayes_flatness(
        model, (x, y), num_draws=draws, seed=seed, tolerance=1e-9, num_halvings=6
    )
    acc = ((x @ w.T).argmax(1) == y).double().mean()
    assert len(r.search) >= 3
    for step, (sigma, drop) in enumerate(r.search):
        xi = torch.randn(draws, *w.shape, generator=seeded_generator(seed, step), dtype=F64)
        noisy_acc = ((x @ (w + sigma * xi).transpose(1, 2)).argmax(-1) == y).double().mean()
        assert drop == pytest.approx(float(acc - noisy_acc), abs=1e-12), step


def _linear_regression_case(n=12, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=F64))
    return model, torch.randn(n, d, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)


def test_average_sharpness_subset_j_uses_draws_seeded_j():
    """Subset j's value is the mean, over the draws from seeded_generator(seed, j), of the
    exact quadratic increase gⱼᵀδ + ½δᵀHⱼδ (linear model, half MSE): independent subsets,
    as the reported standard error assumes."""
    model, x, y = _linear_regression_case()
    m, draws, rho, seed = 4, 5, 0.3, 7
    r = average_sharpness(model, (x, y), rho, m=m, num_draws=draws, loss=half_mse, seed=seed)
    w = model.weight.detach()[0]
    for j in range(3):
        xj, yj = x[j * m : (j + 1) * m], y[j * m : (j + 1) * m]
        g, h = xj.T @ (xj @ w - yj) / m, xj.T @ xj / m
        d = rho * torch.randn(draws, 4, generator=seeded_generator(seed, j), dtype=F64)
        exact = (d @ g + 0.5 * ((d @ h) * d).sum(-1)).mean()
        assert float(r.per_subset[j]) == pytest.approx(float(exact), abs=1e-12), j


def test_keskar_uses_exactly_the_given_lbfgsb_iterations():
    """iterations=k is scipy's L-BFGS-B with maxiter=k (and no tolerance) on the same
    objective (a non-separable quadratic, where one iteration does not reach the box
    maximum)."""
    from scipy.optimize import minimize

    model, x, y = _linear_regression_case(n=6, d=4, seed=3)
    eps = 0.3
    w = model.weight.detach()[0]

    def negative_loss(z):
        r = x @ (w + torch.as_tensor(z, dtype=F64)) - y
        return -float(0.5 * (r**2).mean()), -(x.T @ r / len(y)).numpy()

    b = (eps * (w.abs() + 1)).numpy()
    for iterations in (1, 2):
        ref = minimize(
            negative_loss,
            np.zeros(4),
            jac=True,
            method="L-BFGS-B",
            bounds=np.stack([-b, b], 1),
            options={"maxiter": iterations, "gtol": 0.0, "ftol": 0.0},  # only maxiter stops
        )
        r = epsilon_sharpness(model, (x, y), eps, iterations=iterations, loss=half_mse)
        assert r.num_function_evals == ref.nfev + 1, iterations  # + the clean evaluation


def test_uint8_class_labels_give_the_int64_labels_results():
    """m-sharpness, average-case sharpness and PAC-Bayes flatness failed inside gather()
    on uint8 labels, which the spectrum and the landscape took (session 26)."""
    import sharpscope as ss

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    calls = [
        (ss.m_sharpness, {"m": 16, "rho": 0.05}),
        (ss.average_sharpness, {"m": 16, "rho": 0.05}),
        (ss.pac_bayes_flatness, {}),
    ]
    for function, options in calls:
        wide, narrow = (function(model, (x, t), **options).to_dict() for t in (y, y.byte()))
        for part in (wide, narrow):
            part.pop("meta"), part.pop("seconds", None)
        assert wide == narrow, function.__name__


class _RandomInEval(torch.nn.Module):
    """Dropout forced on: random even in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.linear(torch.nn.functional.dropout(x, 0.5, training=True))


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("m_sharpness", {"m": 16, "rho": 0.05}),
        ("m_sharpness", {"m": 16, "rho": 0.05, "vectorize": False}),
        ("average_sharpness", {"m": 16, "rho": 0.05}),
        ("pac_bayes_flatness", {}),
        ("epsilon_sharpness", {}),
        ("landscape", {"dims": 1, "grid": 3}),
    ],
)
def test_a_model_random_in_eval_mode_is_refused(name, options):
    """The spectrum refused it; these gave another value at every call, without a word,
    or a vmap error that did not name the cause (session 26)."""
    import sharpscope as ss

    torch.manual_seed(0)
    model, x, y = _RandomInEval(), torch.randn(64, 5), torch.randint(0, 3, (64,))
    with pytest.raises(SharpscopeError, match="^two forward passes over the same examples"):
        getattr(ss, name)(model, (x, y), **options)


class _CountingCalls(torch.nn.Module):
    """A forward that writes to its own buffer even in eval mode: in place, or by
    assigning a new tensor."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.linear, self.in_place = torch.nn.Linear(4, 3), in_place
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.in_place:
            self.calls += 1
        else:
            self.calls = self.calls + 1
        return self.linear(x)


@pytest.mark.parametrize("in_place", [True, False], ids=["in place", "new tensor"])
def test_the_analyses_leave_buffers_the_models_forward_writes_as_they_were(in_place):
    """README: the analyses never touch a model's buffers. A call counter came back
    advanced (spectrum +5, landscape +5, ...), and m-sharpness's default failed inside
    torch.func instead of falling back to its loop (session 26)."""
    import sharpscope as ss

    torch.manual_seed(0)
    model, x, y = _CountingCalls(in_place), torch.randn(32, 4), torch.randint(0, 3, (32,))
    buffer = model.calls
    calls = [
        (ss.top_eigenvalues, {"k": 1}),
        (ss.spectrum, {"k": 1, "skip": ("trace", "density")}),
        (ss.hessian_trace, {"num_probes": 6}),
        (ss.landscape, {"dims": 1, "grid": 3}),
        (ss.average_sharpness, {"m": 8, "rho": 0.05}),
        (ss.epsilon_sharpness, {}),
        (ss.pac_bayes_flatness, {}),
        (ss.m_sharpness, {"m": 8, "rho": 0.05, "vectorize": False}),
    ]
    for function, options in calls:
        function(model, (x, y), **options)
        assert model.calls is buffer and float(buffer) == 0.0, function.__name__
    loop = ss.m_sharpness(model, (x, y), m=8, rho=0.05, vectorize=False).sharpness
    if in_place:  # torch.func refuses the in-place write: the loop, with a warning
        with pytest.warns(RuntimeWarning, match="vmap cannot run this model.*the loop instead"):
            default = ss.m_sharpness(model, (x, y), m=8, rho=0.05).sharpness
    else:
        default = ss.m_sharpness(model, (x, y), m=8, rho=0.05).sharpness
    assert default == pytest.approx(loop, rel=1e-6) and float(buffer) == 0.0


@pytest.mark.parametrize(
    ("name", "words"), [("m_sharpness", "m-sharpness"), ("average_sharpness", "average sharpness")]
)
def test_empty_data_is_named_as_such(name, words):
    """It said 'm = 1 is larger than the 0 examples of the data; choose m <= 0' (session 26)."""
    import sharpscope as ss

    empty = (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    with pytest.raises(SharpscopeError, match=f"^the data is empty: {words} needs at least one"):
        getattr(ss, name)(torch.nn.Linear(4, 3), empty, m=1, rho=0.05)
