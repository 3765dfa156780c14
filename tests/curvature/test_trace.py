"""Hutchinson and Hutch++ against exact traces (analysis.md §3, Validation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sharpscope.curvature import HessianOperator, hutchinson, hutchpp
from sharpscope.errors import SharpscopeError

F64 = torch.float64
SEEDS = range(24)


@pytest.fixture(scope="module")
def low_rank_plus_noise(planted_matrix):
    """Ten dominant eigenvalues (10..50) over a small bulk: a trained network's shape."""
    gen = torch.Generator().manual_seed(0)
    eig = torch.cat(
        [torch.linspace(50, 10, 10, dtype=F64), 0.05 * torch.rand(290, generator=gen, dtype=F64)]
    )
    return planted_matrix(eig, seed=1), float(eig.sum())


def rademacher_variance(A: torch.Tensor) -> float:
    return 2 * float((A**2).sum() - (torch.diagonal(A) ** 2).sum())


def test_hutchpp_beats_hutchinson_at_equal_budget(low_rank_plus_noise):
    A, exact = low_rank_plus_noise
    err_h = [hutchinson(A, 99, seed=s).trace - exact for s in SEEDS]
    err_pp = [hutchpp(A, 99, seed=s).trace - exact for s in SEEDS]
    rms_h, rms_pp = np.sqrt(np.mean(np.square(err_h))), np.sqrt(np.mean(np.square(err_pp)))
    assert rms_pp < rms_h / 10


def test_averaged_hutchpp_converges_to_the_exact_trace(low_rank_plus_noise):
    A, exact = low_rank_plus_noise
    mean = np.mean([hutchpp(A, 99, seed=s).trace for s in SEEDS])
    assert abs(mean - exact) / exact <= 1e-3


def test_averaged_hutchinson_within_its_variance(low_rank_plus_noise):
    A, exact = low_rank_plus_noise
    s, runs = 100, len(SEEDS)
    mean = np.mean([hutchinson(A, s, seed=seed).trace for seed in SEEDS])
    assert abs(mean - exact) <= 4 * math.sqrt(rademacher_variance(A) / (s * runs))


def test_standard_errors_are_calibrated(low_rank_plus_noise):
    A, exact = low_rank_plus_noise
    for method in (hutchinson, hutchpp):
        z = [(e.trace - exact) / e.stderr for e in (method(A, 99, seed=s) for s in SEEDS)]
        assert 0.5 < np.std(z) < 1.6, method.__name__


def test_standard_error_is_the_sample_std_over_the_root_of_the_probe_count(low_rank_plus_noise):
    """stderr = std(samples, ddof=1) / sqrt(s) exactly, for Hutchinson and Hutch++."""
    A, _ = low_rank_plus_noise
    for est in (hutchinson(A, 30, seed=1), hutchpp(A, 30, seed=1)):
        expected = np.std(est.samples, ddof=1) / math.sqrt(len(est.samples))
        assert est.stderr == pytest.approx(expected, rel=1e-12), est.method


def test_hutchpp_projects_its_probes_before_applying_the_matrix(low_rank_plus_noise):
    """The last s/3 products must be of probes orthogonal to orth(A S), S the first s/3
    (projecting only A G afterwards is still unbiased, so the statistical tests miss it)."""
    A, _ = low_rank_plus_noise
    applied = []

    def recording(v):
        applied.append(v.clone())
        return A @ v

    hutchpp(recording, 12, dim=A.shape[0], block_size=1)
    assert len(applied) == 12
    Q = torch.linalg.qr((torch.stack(applied[:4]) @ A).T).Q  # orth(A S), (P, 4)
    G = torch.stack(applied[-4:])
    assert float((G @ Q).abs().max()) <= 1e-10


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_per_probe_variance_formula(low_rank_plus_noise, distribution):
    A, _ = low_rank_plus_noise
    est = hutchinson(A, 2000, distribution=distribution, seed=3, block_size=500)
    expected = rademacher_variance(A) if distribution == "rademacher" else 2 * float((A**2).sum())
    # Sample variance of 2000 draws: relative std ~ sqrt(2/2000)·(tail factor) < 5%.
    assert abs(np.var(est.samples, ddof=1) / expected - 1) < 0.15
    assert abs(est.frobenius_sq / float((A**2).sum()) - 1) < 0.05


def test_rademacher_is_exact_on_a_diagonal_matrix():
    d = torch.tensor([1.0, -2.0, 3.5, 4.0], dtype=F64)
    est = hutchinson(torch.diag(d), 5, return_diagonal=True)
    assert est.trace == pytest.approx(float(d.sum()), abs=1e-12)
    assert est.stderr == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(est.diagonal, d)


def test_adaptive_stop_waits_for_min_probes_and_averages_the_diagonal_over_them():
    """Rademacher probes of a diagonal matrix give stderr 0 at once: the adaptive run must
    still take exactly min_probes = 10 and return the exact diagonal (sum / 10, not / 50)."""
    d = torch.tensor([1.0, -2.0, 3.5, 4.0], dtype=F64)
    est = hutchinson(
        torch.diag(d), 50, adaptive=True, block_size=1, min_probes=10, return_diagonal=True
    )
    assert est.num_probes == 10
    torch.testing.assert_close(est.diagonal, d)


def test_hutchpp_is_exact_when_the_sketch_holds_the_range(planted_matrix):
    eig = torch.cat([torch.arange(1.0, 11.0, dtype=F64), torch.zeros(90, dtype=F64)])
    est = hutchpp(planted_matrix(eig, seed=5), 33)
    assert est.trace == pytest.approx(55.0, rel=1e-10)
    assert est.num_matvecs == 33


@pytest.mark.parametrize("sign", [1, -1])
def test_adaptive_hutchinson_stops_on_its_relative_error(low_rank_plus_noise, sign):
    # sign -1: a negative trace must stop on stderr <= rel_tol·|t| too (PyHessian's rule,
    # stderr <= rel_tol·t, stops at once). A budget under P = 300: with P <= probes the
    # exact unit-vector shortcut answers and the rule never runs (it did, until session 24)
    A, _ = low_rank_plus_noise
    est = hutchinson(sign * A, 200, adaptive=True, rel_tol=0.05, seed=7)
    assert 10 <= est.num_probes < 200
    assert est.stderr <= 0.05 * abs(est.trace)


def test_budget_must_be_a_multiple_of_three():
    with pytest.raises(SharpscopeError, match="multiple of 3"):
        hutchpp(torch.eye(5, dtype=F64), 10)


def test_network_trace_within_error_bars(case):
    op = HessianOperator(case.model, case.data, dtype="float64")
    exact = float(torch.trace(case.H))
    est = hutchpp(op, 99, seed=0)
    assert abs(est.trace - exact) <= 4 * est.stderr + 1e-9 * abs(exact)
    assert op.hvp_count == 99


def test_hutchinson_with_no_more_parameters_than_probes_is_exact(planted_matrix):
    """P = 2: two Rademacher probes can agree (an estimate ± 0 that is wrong); the P unit
    vectors give the exact trace for no more products."""
    A = planted_matrix(torch.tensor([3.0, -1.0], dtype=F64))
    est = hutchinson(A, 2)
    assert est.trace == pytest.approx(2.0, abs=1e-12) and est.stderr == 0.0
    assert est.num_matvecs == 2


def test_hutchpp_with_no_more_parameters_than_probes_is_exact(planted_matrix):
    """odd_models finding 10: Hutch++ (the default) estimated a P = 43 trace with 99
    products (1.92154 ± 0.0038 for 1.92035) where the P unit vectors give it exactly;
    now both estimators take that shortcut and report it the same way."""
    eig = torch.linspace(-1.0, 3.0, 43, dtype=F64)
    A = planted_matrix(eig, seed=2)
    pp, h = hutchpp(A, 99), hutchinson(A, 100)
    assert pp.trace == pytest.approx(float(eig.sum()), abs=1e-12) and pp.stderr == 0.0
    assert pp.num_matvecs == pp.num_probes == 43 and pp.method == "hutchpp"
    assert pp.low_rank_part == 0.0 and math.isnan(pp.frobenius_sq)
    assert (pp.trace, pp.stderr, pp.num_probes) == (h.trace, h.stderr, h.num_probes)
    np.testing.assert_array_equal(pp.samples, h.samples)
    assert hutchpp(A, 42).num_matvecs == 42  # P > s: the estimator


def test_hutchpp_on_a_small_network_is_its_exact_trace():
    """P = 43 <= 99 probes: hessian_trace's default equals the dense float64 trace."""
    from sharpscope.analysis import hessian_trace
    from sharpscope.curvature import dense_hessian

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(0)
    data = (torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    result = hessian_trace(model, data, dtype="float64")
    exact = float(torch.trace(dense_hessian(model, data)))
    assert result.trace == pytest.approx(exact, rel=1e-12)
    assert result.stderr == 0.0 and result.method == "hutchpp"
    assert result.num_probes == result.hvp_count == 43


@pytest.mark.parametrize("method", [hutchinson, hutchpp])
def test_the_exact_shortcut_refuses_a_non_symmetric_operator(method):
    """The P-unit-vector trace checks A E against its transpose for free, as Hutch++'s
    sketches and Lanczos do (a weight_norm model must not get a trace there either)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(6, 6, generator=gen, dtype=F64)
    method(A + A.T, 6)
    with pytest.raises(SharpscopeError, match="not symmetric"):
        method(A + A.T + 0.05 * A, 6)


# -- mutation-testing gaps (session 24, notes_out/s24/mut_curv.md) ------------------------


def test_frobenius_of_a_diagonal_matrix_is_exact_with_rademacher_probes():
    """‖Dv‖² = Σ d² for every ±1 probe v: the tr(H²) estimate is exact, here with P = 50
    > 20 probes (no exact shortcut)."""
    d = torch.linspace(-3, 5, 50, dtype=F64)
    est = hutchinson(torch.diag(d), 20, seed=3)
    assert est.frobenius_sq == pytest.approx(float((d**2).sum()), rel=1e-12)


def test_hutchpp_is_unbiased_where_the_residual_term_dominates(planted_matrix):
    """A flat spectrum puts little of the trace in the sketch, so the second term must be
    the unbiased Hutchinson mean of the residual: trace = low-rank part + mean(samples),
    and over 400 seeds the mean is the exact 450 to within 4 standard errors."""
    A = planted_matrix(torch.linspace(1.0, 2.0, 300, dtype=F64), 2)
    estimates = [hutchpp(A, 6, seed=s) for s in range(400)]
    for e in estimates[:5]:
        assert e.trace == pytest.approx(e.low_rank_part + float(np.mean(e.samples)), rel=1e-12)
    t = np.array([e.trace for e in estimates])
    assert abs(t.mean() - 450.0) <= 4 * t.std(ddof=1) / math.sqrt(len(t))
