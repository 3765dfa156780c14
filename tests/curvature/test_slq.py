"""Stochastic Lanczos quadrature against dense spectra (analysis.md §4, Validation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from sharpscope.curvature import (
    HessianOperator,
    dense_hessian,
    lanczos_top_k,
    slq,
    smooth_density,
)
from sharpscope.errors import SharpscopeError

F64 = torch.float64


def exact_density(grid: np.ndarray, eigenvalues: np.ndarray, sigma: float) -> np.ndarray:
    """phi_sigma(t) = (1/P) sum_i g_sigma(t - lambda_i), directly from the eigenvalues."""
    diff = grid[:, None] - eigenvalues[None, :]
    return np.exp(-(diff**2) / (2 * sigma**2)).mean(1) / np.sqrt(2 * np.pi * sigma**2)


def l1(grid: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(np.abs(a - b)) * (grid[1] - grid[0]))


@pytest.fixture(scope="module")
def digits_mlp():
    """MLP 64-8-10 (P = 610) after 200 seeded full-batch steps on 300 digits."""
    torch.manual_seed(0)
    digits = load_digits()
    x = torch.tensor(digits.data[:300], dtype=torch.float32) / 16
    y = torch.tensor(digits.target[:300])
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(model, (x, y))).numpy()
    return model, (x, y), eigenvalues


def test_mlp_density_matches_the_exact_smoothed_density(digits_mlp):
    model, data, eigenvalues = digits_mlp
    op = HessianOperator(model, data, dtype="float64")
    quad = slq(op, num_probes=10, num_steps=90, seed=0)
    assert op.hvp_count == 900
    grid, values, info = smooth_density(quad.nodes, quad.weights)  # Ghorbani's sigma
    exact = exact_density(grid, eigenvalues, info["sigma"])
    exact /= exact.sum() * (grid[1] - grid[0])  # same renormalization on the grid
    assert l1(grid, values, exact) <= 0.05
    # First moment: tr(H)/P within Monte-Carlo error.
    assert abs(quad.trace - eigenvalues.sum()) <= 4 * quad.trace_stderr


def test_papyan_outliers_beside_a_marchenko_pastur_bulk():
    # diag(5, 4, 3, 0, ...) + Z Z^T / n, n = 2000: three outliers beside a bulk on [0, 4].
    n = 2000
    gen = torch.Generator().manual_seed(0)
    Z = torch.randn(n, n, generator=gen, dtype=F64)
    A = Z @ Z.T / n
    A[0, 0] += 5
    A[1, 1] += 4
    A[2, 2] += 3
    eigenvalues = torch.linalg.eigvalsh(A).numpy()
    quad = slq(A, num_probes=10, num_steps=90, seed=1)
    for nodes in quad.nodes:  # every probe resolves the outliers exactly
        np.testing.assert_allclose(np.sort(nodes)[-3:], eigenvalues[-3:], rtol=1e-10)
    # Their quadrature mass is (vᵀu)² per outlier: 1/P on average (std ~ sqrt(2/n_v)/P each).
    outlier_mass = quad.weights[:, -3:].sum(1).mean()
    assert abs(outlier_mass - 3 / n) <= 4 * np.sqrt(2 * 3 / 10) / n
    grid, values, info = smooth_density(quad.nodes, quad.weights, kernel="papyan")
    assert l1(grid, values, exact_density(grid, eigenvalues, info["sigma"])) <= 0.1
    assert abs(quad.trace - eigenvalues.sum()) <= 4 * quad.trace_stderr


def test_weights_of_every_probe_sum_to_one(planted_matrix):
    A = planted_matrix(torch.linspace(-1, 3, 150, dtype=F64), seed=3)
    quad = slq(A, num_probes=4, num_steps=40, seed=2)
    np.testing.assert_allclose(quad.weights.sum(1), 1.0, atol=1e-12)
    assert quad.nodes.shape == (4, 40)


def test_few_distinct_eigenvalues_are_found_exactly():
    # 3 distinct values < m: the Krylov space closes after 3 steps; a normalized
    # Rademacher probe puts exactly multiplicity/P of its mass on each.
    d = torch.tensor([1.0] * 10 + [2.5] * 6 + [-4.0] * 4, dtype=F64)
    quad = slq(torch.diag(d), num_probes=3, num_steps=15, seed=4)
    assert quad.num_steps == [3, 3, 3]
    for nodes, weights in zip(quad.nodes, quad.weights):
        np.testing.assert_allclose(nodes, [-4.0, 1.0, 2.5], atol=1e-12)
        np.testing.assert_allclose(weights, [4 / 20, 10 / 20, 6 / 20], atol=1e-12)
    assert quad.negative_mass == pytest.approx(0.2, abs=1e-12)
    assert quad.trace == pytest.approx(float(d.sum()), abs=1e-10)


def test_deflation_removes_the_outliers_and_keeps_the_trace(planted_matrix):
    gen = torch.Generator().manual_seed(5)
    eig = torch.cat([torch.tensor([30.0, 20.0, 10.0], dtype=F64), torch.rand(197, generator=gen)])
    A = planted_matrix(eig, seed=6)
    top = lanczos_top_k(A, k=3, tol=1e-10, return_eigenvectors=True)
    quad = slq(A, num_probes=5, num_steps=60, seed=7, locked=top.eigenvectors)
    assert quad.dim == 197
    assert quad.nodes.max() < 1.0 + 1e-8 and quad.nodes.min() > -1e-8  # bulk only
    trace = quad.trace + float(top.eigenvalues.sum())
    assert abs(trace - float(eig.sum())) <= 4 * quad.trace_stderr


def test_kernels_have_unit_mass_and_log_units(planted_matrix):
    gen = torch.Generator().manual_seed(8)
    bulk = torch.rand(98, generator=gen, dtype=F64) * 1e-2 + 1e-3
    eig = torch.cat([torch.tensor([40.0, -0.5], dtype=F64), bulk])
    quad = slq(planted_matrix(eig, seed=8), num_probes=3, num_steps=60, seed=9)
    nodes, weights = quad.nodes, quad.weights
    for kernel, tol in (("ghorbani", 1e-12), ("papyan", 3e-3), ("log", 3e-3)):
        # Ghorbani's is renormalized on the grid; the others' grids reach past their tails
        grid, values, info = smooth_density(nodes, weights, kernel=kernel)
        assert abs(np.sum(values) * (grid[1] - grid[0]) - 1) < tol, kernel
    # few Lanczos steps make the kernel wide (κ = 1.04: width 2/(29·0.56) in [-1, 1] units)
    short = slq(planted_matrix(eig, seed=8), num_probes=2, num_steps=30, seed=9)
    for kernel in ("papyan", "log"):
        grid, values, _ = smooth_density(short.nodes, short.weights, kernel=kernel)
        assert abs(np.sum(values) * (grid[1] - grid[0]) - 1) < 3e-3, kernel
    _, _, info = smooth_density(nodes, weights, kernel="log")
    assert info["units"].startswith("log")
    assert info["kappa"] == 1.04
    grid, _, info = smooth_density(nodes, weights)
    assert len(grid) == 10_000
    assert info["sigma"] ** 2 == pytest.approx(1e-5 * (grid[-1] - grid[0]))
    with pytest.raises(SharpscopeError, match="kernel"):
        smooth_density(nodes, weights, kernel="parzen")


def test_papyan_width_and_grid_follow_the_closed_form():
    """Nodes [0, 1, 2, 4] (m = 4), κ = 3: bounds widened by 5% to [-0.2, 4.2], half-width
    2.2, σ = 2.2·2/(3√(8 ln 3)), and the grid starts 3σ below the widened bound."""
    nodes, weights = np.array([[0.0, 1.0, 2.0, 4.0]]), np.full((1, 4), 0.25)
    grid, _, info = smooth_density(nodes, weights, kernel="papyan")
    width = 2.0 / (3 * math.sqrt(8 * math.log(3.0)))  # in units of the half-width
    assert info["sigma"] == pytest.approx(2.2 * width, rel=1e-12)
    assert grid[0] == pytest.approx(2.0 - 2.2 * (1 + 3 * width), rel=1e-12)
    assert grid[-1] == pytest.approx(2.0 + 2.2 * (1 + 3 * width), rel=1e-12)


def test_ghorbani_grid_spans_the_probe_averaged_extreme_nodes():
    """Probes with nodes [0, 1, 3] and [-1, 1, 2]: the grid runs from the mean of the
    minima - 0.01 = -0.51 to the mean of the maxima + 0.01 = 2.51 (not -1.01 to 3.01)."""
    nodes, weights = np.array([[0.0, 1.0, 3.0], [-1.0, 1.0, 2.0]]), np.full((2, 3), 1 / 3)
    grid, _, _ = smooth_density(nodes, weights)
    assert grid[0] == pytest.approx(-0.51, rel=1e-12)
    assert grid[-1] == pytest.approx(2.51, rel=1e-12)


def test_lockstep_probes_give_the_same_quadrature_as_one_at_a_time(planted_matrix):
    gen = torch.Generator().manual_seed(8)
    A = planted_matrix(torch.cat([torch.tensor([12.0, 9.0]), torch.rand(148, generator=gen)]), 9)
    one = slq(A, num_probes=5, num_steps=40, seed=3, probe_block=1)
    together = slq(A, num_probes=5, num_steps=40, seed=3)  # default: all five at once
    some = slq(A, num_probes=5, num_steps=40, seed=3, probe_block=2)
    for quad in (together, some):
        np.testing.assert_allclose(quad.nodes, one.nodes, rtol=0, atol=1e-12)
        np.testing.assert_allclose(quad.weights, one.weights, rtol=0, atol=1e-12)
        assert quad.num_matvecs == one.num_matvecs == 200


def test_lockstep_probes_use_the_operators_block_products(digits_mlp):
    # with max_block_size 5 the five probes of a step go through one vmapped product
    model, data, _ = digits_mlp
    op = HessianOperator(model, data, dtype="float64", max_block_size=5)
    calls = []
    block = op.hvp_block
    op.hvp_block = lambda V: calls.append(V.shape[0]) or block(V)
    together = slq(op, num_probes=5, num_steps=12, seed=1)
    alone = slq(op, num_probes=5, num_steps=12, seed=1, probe_block=1)
    assert calls[:12] == [5] * 12 and op.hvp_count == 120
    np.testing.assert_allclose(together.nodes, alone.nodes, rtol=1e-9, atol=1e-9)


def test_rounding_zeros_of_a_rank_deficient_psd_matrix_are_not_negative_mass():
    """2XᵀX/N with N = 20 < P = 100: PSD, 80 zero eigenvalues whose Ritz values are ±1e-14."""
    from sharpscope.analysis.spectrum import Density

    X = torch.randn(20, 100, generator=torch.Generator().manual_seed(0), dtype=F64)
    quad = slq(2 * X.T @ X / 20, num_probes=4, num_steps=40)
    assert (quad.nodes < 0).any()  # rounding puts some zero nodes below 0
    assert quad.negative_mass == 0.0
    assert Density.from_quadrature(quad.nodes, quad.weights, dim=quad.dim).negative_mass == 0.0


@pytest.mark.parametrize("kernel", ["papyan", "log"])
@pytest.mark.parametrize("value", [0.0, 1e-3, 3.0, 1000.0])
def test_a_single_distinct_node_smooths_to_unit_mass(kernel, value):
    """One distinct value (H = c·I, a one-parameter model): a finite density of mass 1."""
    grid, values, _ = smooth_density(np.full((2, 3), value), np.full((2, 3), 1 / 3), kernel=kernel)
    assert np.isfinite(values).all()
    assert float(values.sum() * (grid[1] - grid[0])) == pytest.approx(1.0, abs=5e-3)


def test_the_ghorbani_grid_keeps_a_node_that_falls_between_grid_points():
    """Range 1e5 on 10,000 points: σ = 1 < the cell (10); each node keeps its 1/4."""
    nodes = np.array([[0.0, 1e5 / 3, 2e5 / 3 + 3.7, 1e5]])
    grid, values, _ = smooth_density(nodes, np.full((1, 4), 0.25))
    dx = grid[1] - grid[0]
    for node in nodes[0]:
        assert float(values[np.abs(grid - node) < 1e4].sum() * dx) == pytest.approx(0.25, abs=1e-3)


# -- mutation-testing gaps (session 24, notes_out/s24/mut_curv.md) ------------------------


def test_log_kernel_puts_a_zero_eigenvalue_at_log_1e_minus_5():
    """The log variant is in log(|λ| + 1e-5) (analysis.md §4): a zero eigenvalue peaks there."""
    grid, values, info = smooth_density(
        np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]]), kernel="log", sigma=0.05
    )
    low = grid < np.log(0.5)
    peak = grid[low][np.argmax(values[low])]
    assert peak == pytest.approx(math.log(1e-5), abs=3 * info["sigma"] + (grid[1] - grid[0]))


def test_an_exhausted_probe_does_not_widen_the_grid_with_its_padding():
    """A probe whose Krylov space runs out early is padded with its last node (weight 0),
    not with zeros, which would stretch the grid of a positive spectrum down to 0.
    A = (2I − 11ᵀ/3) ⊕ diag(3, 4): a probe with equal signs on the first block misses the
    eigenvalue 2, so the probes stop at two different lengths."""
    A = torch.zeros(5, 5, dtype=F64)
    A[:3, :3] = 2 * torch.eye(3, dtype=F64) - torch.ones(3, 3, dtype=F64) / 3
    A[3, 3], A[4, 4] = 3.0, 4.0
    q = slq(A, num_probes=8, num_steps=8)
    assert len(set(q.num_steps)) == 2
    grid, _, _ = smooth_density(q.nodes, q.weights)
    assert grid[0] == pytest.approx(0.99, abs=1e-8) and grid[-1] == pytest.approx(4.01, abs=1e-8)
    assert q.nodes.min() == pytest.approx(1.0, abs=1e-8)


def test_trace_standard_error_is_the_sample_std_over_root_n():
    """Per-probe traces 8 and 10: trace 9, standard error std(ddof=1)/√2 = 1, in the raw
    quadrature and in the Density built from it."""
    from sharpscope.analysis.spectrum import Density
    from sharpscope.curvature.slq import Quadrature

    nodes = np.array([[1.0, 3.0], [1.0, 3.0]])
    weights = np.array([[0.5, 0.5], [0.25, 0.75]])
    q = Quadrature(nodes=nodes, weights=weights, num_steps=[2, 2], num_matvecs=4, dim=4)
    assert (q.trace, q.trace_stderr) == pytest.approx((9.0, 1.0))
    d = Density.from_quadrature(nodes, weights, dim=4)
    assert (d.trace, d.trace_stderr) == pytest.approx((9.0, 1.0))


@pytest.mark.parametrize(
    "options, words",
    [
        ({"num_points": 1}, "num_points must be >= 2"),
        ({"num_points": 0}, "num_points must be >= 2"),
        ({"num_points": 2.5}, "num_points must be an integer"),
        ({"sigma": 0.0}, "sigma must be a finite number > 0"),
        ({"sigma": -1.0}, "sigma must be a finite number > 0"),
        ({"sigma": float("nan")}, "sigma must be a finite number > 0"),
        ({"sigma": float("inf")}, "sigma must be a finite number > 0"),
        ({"sigma": "0.1"}, "sigma must be a number"),
        ({"kernel": "papyan", "kappa": 1.0}, "kappa must be a finite number > 1"),
        ({"kernel": "papyan", "kappa": 0.5}, "kappa must be a finite number > 1"),
        ({"kernel": "log", "kappa": float("nan")}, "kappa must be a finite number > 1"),
    ],
)
def test_bad_smoothing_arguments_are_refused_in_one_line(options, words):
    # they gave IndexError (num_points=1), ZeroDivisionError (sigma=0, kappa=1), "math
    # domain error" (kappa<1) or, silently, an all-NaN density (sigma=nan) and a width of
    # |sigma| (sigma=-1)
    nodes, weights = np.array([[0.0, 2.0]]), np.array([[0.5, 0.5]])
    with pytest.raises(SharpscopeError, match=words) as info:
        smooth_density(nodes, weights, **options)
    assert "\n" not in str(info.value)


def test_a_two_point_grid_and_a_kappa_just_above_one_are_accepted():
    nodes, weights = np.array([[0.0, 2.0]]), np.array([[0.5, 0.5]])
    grid, values, _ = smooth_density(nodes, weights, num_points=2)
    assert grid.shape == values.shape == (2,)
    _, values, info = smooth_density(nodes, weights, kernel="papyan", kappa=1.0001)
    assert np.isfinite(values).all() and info["kappa"] == 1.0001
