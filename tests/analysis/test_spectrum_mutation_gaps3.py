"""Gap tests for mutants of sharpscope/analysis/spectrum.py that the suite let through
(session 25, mut_spec). Exact answers: a model whose Hessian is diagonal and known in
closed form, the public functions called with the seeds spectrum() documents, and
TopEigs built by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.analysis import TopEigs, hessian_trace, spectral_density, spectrum, top_eigenvalues
from sharpscope.curvature import dense_hessian

from cases import three_class_blobs

F64 = torch.float64


def diagonal_regression(d: int = 20):
    """nn.Linear(d, 1, bias=False), inputs diag(1..d), mean MSE: H = (2/d)·diag(i²)."""
    model = nn.Linear(d, 1, bias=False).double()
    x = torch.diag(torch.arange(1.0, d + 1, dtype=F64))
    y = torch.zeros(d, 1, dtype=F64)
    exact = 2.0 / d * torch.arange(1.0, d + 1, dtype=F64) ** 2
    return model, (x, y), exact


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    x, y = three_class_blobs(40)
    model = nn.Sequential(nn.Linear(8, 10), nn.Tanh(), nn.Linear(10, 3)).double()
    x = x.double()
    return model, (x, y)


def top(eigenvalues, residuals, tol=1e-5, **kw):
    return TopEigs(
        eigenvalues=torch.tensor(eigenvalues, dtype=F64),
        residuals=torch.tensor(residuals, dtype=F64),
        converged=[True] * len(eigenvalues),
        tol=tol,
        **kw,
    )


# S3: the ratio's floor without its tol·|λ1| term (λ5 below the tolerance gave 4e6)
def test_ratio_is_null_when_lambda_5_is_below_tol_times_lambda_max():
    assert top([4.0, 3.0, 2.0, 1.0, 1e-6], [0.0] * 5, tol=1e-5).ratio is None  # 1e-6 < 4e-5
    assert top([4.0, 3.0, 2.0, 1.0, 1e-6], [0.0] * 5, tol=1e-8).ratio == pytest.approx(4e6)


# S4: the floor read from λ1's residual instead of λ5's
def test_ratio_floor_is_lambda_5s_own_residual():
    assert top([4.0, 3.0, 2.0, 1.0, 0.5], [1.0, 0, 0, 0, 0], tol=1e-12).ratio == pytest.approx(8.0)
    assert top([4.0, 3.0, 2.0, 1.0, 0.5], [0, 0, 0, 0, 1.0], tol=1e-12).ratio is None


# S29: the pyhessian backend's negative fifth value taken as λ5 (and λ1 likewise)
def test_a_negative_pyhessian_value_is_not_lambda_max():
    values = [-3.0, 2.0, 1.5, 1.0, 0.5]
    theirs = top(values, [0.0] * 5, backend="pyhessian")
    assert theirs.lambda_max is None and theirs.ratio is None and theirs.lambda_5 == 0.5


# S12: hessian_trace's default distribution not Rademacher. With Rademacher probes every
# Hutchinson sample of a diagonal H is vᵀHv = Σ H_ii v_i² = tr(H) exactly.
def test_hessian_traces_default_probes_are_rademacher():
    model, data, exact = diagonal_regression()
    est = hessian_trace(model, data, "mse", method="hutchinson", num_probes=10)
    assert est.meta.extra["trace_distribution"] == "rademacher"
    np.testing.assert_allclose(est.samples.numpy(), float(exact.sum()), rtol=1e-12)
    assert est.trace == pytest.approx(float(exact.sum()), rel=1e-12) and est.stderr <= 1e-12


# S11: spectrum()'s trace drawn with Gaussian probes
def test_spectrums_trace_uses_rademacher_probes():
    model, data, exact = diagonal_regression()
    result = spectrum(
        model, data, 2, "mse", trace_method="hutchinson", trace_probes=10, skip=("density",)
    )
    assert result.trace == pytest.approx(float(exact.sum()), rel=1e-12)
    assert result.trace_stderr <= 1e-12
    torch.testing.assert_close(result.eigenvalues, exact.flip(0)[:2], rtol=1e-10, atol=0)


# S9: the trace drawn with the top-k's seed; S10: the density with the top-k's seed
def test_the_parts_draw_with_the_documented_seeds(mlp):
    model, data = mlp
    result = spectrum(model, data, k=2, seed=3, trace_probes=9, num_probes=2, num_lanczos_steps=8)
    trace = hessian_trace(model, data, num_probes=9, seed=4)
    assert result.trace == trace.trace and result.trace_stderr == trace.stderr
    density = spectral_density(model, data, num_probes=2, num_lanczos_steps=8, seed=5)
    torch.testing.assert_close(result.density.nodes, density.nodes, rtol=0, atol=0)
    torch.testing.assert_close(result.density.weights, density.weights, rtol=0, atol=0)


# S16: the stderr as the population std (ddof 0) instead of the sample std / √s
def test_trace_stderr_is_the_sample_std_over_root_s(mlp):
    model, data = mlp
    est = hessian_trace(model, data, method="hutchinson", num_probes=12, seed=2)
    samples = est.samples.numpy()
    assert len(samples) == 12
    assert est.stderr == pytest.approx(float(np.std(samples, ddof=1) / math.sqrt(12)), rel=1e-12)
    assert est.trace == pytest.approx(float(samples.mean()), rel=1e-12)


# S30: Hutch++'s low-rank part dropped from the reported trace
def test_hutchpp_trace_is_low_rank_part_plus_the_hutchinson_term(mlp):
    model, data = mlp
    exact = float(torch.trace(dense_hessian(model, data)))
    est = hessian_trace(model, data, num_probes=30, seed=0)
    assert est.method == "hutchpp" and est.low_rank_part != 0
    assert est.trace == pytest.approx(est.low_rank_part + float(est.samples.mean()), rel=1e-12)
    assert abs(est.trace - exact) <= 5 * est.stderr + 1e-9 * abs(exact)


# S17: top_eigenvalues' default tol (analysis.md §2: 1e-5)
def test_default_tolerance_is_1e_5(mlp):
    model, data = mlp
    result = top_eigenvalues(model, data, k=1)
    assert result.tol == 1e-5
    scale = float(result.eigenvalues.abs().max())
    assert result.converged == [bool(r <= 1e-5 * scale) for r in result.residuals]


# S18: spectrum()'s default m (90); S19: spectral_density's default n_v (10)
def test_density_defaults_are_ghorbanis_m_90_and_n_v_10(mlp):
    model, data = mlp  # P = 123 > 90
    result = spectrum(model, data, k=1, num_probes=1, skip=("trace",))
    assert result.density.num_lanczos_steps == 90 and result.density.num_probes == 1
    density = spectral_density(model, data, num_lanczos_steps=2)
    assert density.num_probes == 10 and density.nodes.shape == (10, 2)


# S7: the pyhessian backend's pairs left with its placeholder flags (all False); the
# suite only tried tol 1e-12, where every flag is False either way
def test_pyhessian_pairs_at_a_loose_tol_are_flagged_converged(mlp):
    pytest.importorskip("pyhessian")
    model, data = mlp
    result = top_eigenvalues(model, data, k=2, backend="pyhessian", tol=0.5)
    scale = float(result.eigenvalues.abs().max())
    assert result.converged == [bool(r <= 0.5 * scale) for r in result.residuals]
    assert all(result.converged)


# S26: the reused top-k deflated with the wrong vectors (the last `deflate` of the k
# instead of the first): the values reported apart were right, the bulk was not deflated
def test_spectrum_deflates_the_bulk_with_the_top_vectors(mlp):
    model, data = mlp
    exact = torch.linalg.eigvalsh(dense_hessian(model, data)).flip(0)
    result = spectrum(
        model,
        data,
        k=5,
        deflate=2,
        num_probes=2,
        num_lanczos_steps=40,
        tol=1e-10,
        skip=("trace",),
    )
    torch.testing.assert_close(result.density.deflated, exact[:2], rtol=1e-8, atol=0)
    # λ1 and λ2 are gone from the quadrature: its largest node is λ3
    assert float(result.density.nodes.max()) == pytest.approx(float(exact[2]), rel=1e-6)


# S27: the pyhessian flags scaled by max λ instead of max |λ| (a concave loss: all λ < 0)
def test_pyhessian_flags_scale_with_the_largest_magnitude():
    pytest.importorskip("pyhessian")
    model, data, exact = diagonal_regression(8)

    def concave(out, target):
        return -nn.functional.mse_loss(out, target)

    result = top_eigenvalues(model, data, k=2, loss=concave, backend="pyhessian", tol=0.5)
    assert float(result.eigenvalues.max()) < 0
    scale = float(result.eigenvalues.abs().max())
    assert result.converged == [bool(r <= 0.5 * scale) for r in result.residuals]
    assert all(result.converged)
    # the file says which eigenvalues these are (which stays LA, as asked), and the
    # negative ones are not passed off as the largest algebraic
    assert result.which == "LA" and result.lambda_max is None
    assert result.meta.extra["eigenvalues_by"].startswith("largest magnitude")


# S28: the Hutchinson estimate of tr(H²) dropped from the Trace (None)
def test_hutchinson_reports_its_frobenius_estimate():
    model, data, exact = diagonal_regression()
    est = hessian_trace(model, data, "mse", method="hutchinson", num_probes=10)
    # Rademacher v and diagonal H: ||Hv||² = Σ H_ii² for every probe
    assert est.frobenius_sq == pytest.approx(float((exact**2).sum()), rel=1e-12)
