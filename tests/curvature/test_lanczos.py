"""Lanczos top-k against dense eigendecompositions (analysis.md §2, Validation)."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch import nn

from sharpscope.analysis.spectrum import top_eigenvalues
from sharpscope.curvature import (
    HessianOperator,
    _linear,
    block_lanczos_top_k,
    hutchinson,
    hutchpp,
    lanczos,
    lanczos_top_k,
    power_iteration_top_k,
    slq,
)
from sharpscope.curvature.thick_restart import thick_restart_lanczos_top_k
from sharpscope.errors import SharpscopeError

from cases import bulk, rel_err

F64 = torch.float64


@pytest.mark.parametrize(
    "outliers",
    [
        pytest.param([50.0, 30.0, 20.0, 12.0, 8.0], id="separated"),
        pytest.param([24.0, 22.0, 21.0, 20.5, 20.0], id="clustered"),
    ],
)
def test_planted_outliers(planted_matrix, outliers):
    eig = torch.cat([torch.tensor(outliers, dtype=F64), bulk(395, 0.0, 1.0, seed=1)])
    A = planted_matrix(eig, seed=2)
    result = lanczos_top_k(A, k=5, tol=1e-8)
    assert all(result.converged)
    assert rel_err(result.eigenvalues, torch.tensor(outliers, dtype=F64)) <= 1e-8
    assert result.num_steps < 100


def test_negative_eigenvalues_with_which_sa_and_lm(planted_matrix):
    eig = torch.cat([torch.tensor([-9.0, -7.0, -4.0, 6.0, 5.0], dtype=F64), bulk(195, -1, 1, 3)])
    A = planted_matrix(eig, seed=4)
    exact = torch.linalg.eigvalsh(A)
    sa = lanczos_top_k(A, k=3, which="SA", tol=1e-8)
    assert rel_err(sa.eigenvalues, exact[:3].flip(0)) <= 1e-8  # descending: -4, -7, -9
    la = lanczos_top_k(A, k=2, which="LA", tol=1e-8)
    assert rel_err(la.eigenvalues, torch.tensor([6.0, 5.0], dtype=F64)) <= 1e-8
    lm = lanczos_top_k(A, k=3, which="LM", tol=1e-8)
    assert rel_err(lm.eigenvalues, torch.tensor([6.0, -7.0, -9.0], dtype=F64)) <= 1e-8


def test_a_block_wider_than_the_operator_is_one_line(planted_matrix):
    """Session 27: a block_size of 1e30 was a TypeError from torch.randn."""
    A = planted_matrix(torch.arange(10, 0, -1, dtype=F64), seed=1)
    with pytest.raises(SharpscopeError, match=r"block_size 11 is larger than the number of"):
        block_lanczos_top_k(A, k=2, block_size=11)
    with pytest.raises(SharpscopeError, match="larger than the number of parameters"):
        block_lanczos_top_k(A, k=2, block_size=10**30)


def test_repeated_eigenvalue_needs_the_block_variant(planted_matrix):
    eig = torch.cat([torch.tensor([10.0, 10.0, 8.0, 7.0, 6.0], dtype=F64), bulk(195, 0, 1, 5)])
    A = planted_matrix(eig, seed=6)
    block = block_lanczos_top_k(A, k=5, block_size=2, tol=1e-8)
    assert all(block.converged)
    assert rel_err(block.eigenvalues, eig[:5]) <= 1e-8
    single = lanczos_top_k(A, k=5, tol=1e-8)
    # One start vector sees one copy in exact arithmetic; whatever it returns is a set of
    # true eigenvalues, and the top one is right.
    assert abs(float(single.eigenvalues[0]) - 10.0) <= 1e-8
    for value in single.eigenvalues:
        assert float(torch.min((eig - value).abs())) <= 1e-6


def test_rank_deficient_matrix_restarts_and_finds_the_zeros(planted_matrix):
    eig = torch.cat([torch.tensor([3.0, 2.0, 1.0], dtype=F64), torch.zeros(97, dtype=F64)])
    A = planted_matrix(eig, seed=7)
    result = lanczos_top_k(A, k=5, tol=1e-8)
    assert result.restarts >= 1  # the Krylov space of one vector has dimension 4
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor([3.0, 2.0, 1.0, 0.0, 0.0], dtype=F64), atol=1e-10, rtol=0
    )


MULTIPLICITY_CASES = [
    pytest.param([5.0, 5.0, 5.0, 3.0, 1.0], 95, "LA", 5, [5, 5, 5, 3, 1], id="triple-top"),
    pytest.param([5.0, 5.0, 4.0, 3.0, 2.0, 1.0], 94, "LA", 5, [5, 5, 4, 3, 2], id="double-top"),
    pytest.param([-5.0, -5.0, -5.0, 3.0, 1.0], 95, "SA", 3, [-5, -5, -5], id="triple-bottom"),
    pytest.param([-5.0, -5.0, -5.0, 3.0, 1.0], 95, "LM", 4, [3, -5, -5, -5], id="magnitude"),
    pytest.param([], 60, "LA", 5, [0, 0, 0, 0, 0], id="zero"),
]


@pytest.mark.parametrize("method", ["plain", "thick"])
@pytest.mark.parametrize(("values", "zeros", "which", "k", "expected"), MULTIPLICITY_CASES)
def test_an_exhausted_krylov_space_restarts_until_every_wanted_copy_is_found(
    planted_matrix, method, values, zeros, which, k, expected
):
    # analysis.md §2: few distinct eigenvalues exhaust the Krylov space of one vector in a
    # few steps, where every residual is zero; the run must restart, not stop, and look
    # for more copies until a fresh block adds nothing wanted.
    eig = torch.cat([torch.tensor(values, dtype=F64), torch.zeros(zeros, dtype=F64)])
    A = planted_matrix(eig, seed=11)
    if method == "plain":
        result = lanczos_top_k(A, k=k, which=which, tol=1e-10, return_eigenvectors=True)
    else:
        result = thick_restart_lanczos_top_k(
            A, k=k, which=which, tol=1e-10, restart_size=2 * k + 2, return_eigenvectors=True
        )
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor(expected, dtype=F64), atol=1e-9, rtol=0
    )
    assert all(result.converged)
    assert result.restarts >= 1 or method == "thick"  # (thick counts its thick restarts)
    assert result.num_matvecs <= 20 + k  # a handful of short blocks, not a full run
    # the reported residuals bound the true ones (restarts leave nothing out silently)
    assert torch.all(result.true_residuals <= result.residuals + 1e-12)


@pytest.mark.parametrize("method", ["plain", "thick"])
@pytest.mark.parametrize("spread", [0.0, 1e-8, 1e-7, 1e-6])
@pytest.mark.parametrize("seed", range(4))
def test_reported_residuals_bound_the_true_ones_after_restarts(
    planted_matrix, method, spread, seed
):
    """A cluster {5, 5+d, 5+2d} at tol 1e-6 restarts on blocks invariant to the tolerance;
    the beta left out there also couples the later blocks to the earlier one (Q^T A Q is
    not block diagonal), so their reported residuals were 6e-15 against true 6.4e-7."""
    values = [5.0, 5.0 + spread, 5.0 + 2 * spread, 3.0, 1.0]
    A = planted_matrix(
        torch.cat([torch.tensor(values, dtype=F64), torch.zeros(95, dtype=F64)]), seed=11 + seed
    )
    if method == "plain":
        result = lanczos_top_k(A, k=3, tol=1e-6, return_eigenvectors=True)
    else:
        result = thick_restart_lanczos_top_k(
            A, k=3, tol=1e-6, restart_size=8, return_eigenvectors=True
        )
    torch.testing.assert_close(
        result.eigenvalues, torch.full((3,), 5.0, dtype=F64), atol=1e-5, rtol=0
    )
    assert torch.all(result.true_residuals <= result.residuals * (1 + 1e-9) + 1e-13)


def test_a_later_block_is_judged_on_its_own_block_of_t(planted_matrix, monkeypatch):
    """After a restart the stop rule's block_eigh(lo, hi) must be the eigensystem of
    T[lo:hi, lo:hi] (one with beta shifted by one left the final eigenvalues unchanged)."""
    module = importlib.import_module("sharpscope.curvature.lanczos")
    verdict, checked = module.top_k_verdict, []

    def checking_verdict(theta, S, *args, block_start=0, block_eigh=None, **kwargs):
        if block_start:
            T = (S * theta) @ S.T
            np.testing.assert_allclose(
                block_eigh(block_start, theta.size)[0],
                np.linalg.eigvalsh(T[block_start:, block_start:]),
                atol=1e-12,
            )
            checked.append(theta.size - block_start)
        return verdict(theta, S, *args, block_start=block_start, block_eigh=block_eigh, **kwargs)

    monkeypatch.setattr(module, "top_k_verdict", checking_verdict)
    eig = torch.cat(
        [torch.tensor([5.0, 5.0, 5.0, 4.0, 1.0], dtype=F64), torch.zeros(60, dtype=F64)]
    )
    lanczos_top_k(planted_matrix(eig, seed=3), k=4, tol=1e-10)
    assert max(checked) >= 2  # a later block of more than one row was checked


@pytest.mark.parametrize("method", ["plain", "thick"])
def test_a_narrow_bulk_does_not_count_as_an_exhausted_krylov_space(planted_matrix, method):
    # Outliers beside a bulk of width 0.1 at tol 1e-3 (0.01 of |theta_1|): every Ritz pair
    # of the first block has b|s| below the tolerance while b itself (0.014) is not. That
    # block is not invariant; restarting there dropped b and ran to max_steps.
    bulk_values = torch.rand(36, generator=torch.Generator().manual_seed(0), dtype=F64) * 0.1
    eig = torch.cat([torch.tensor([-10.0, -7.0, -5.0, -3.0], dtype=F64), bulk_values])
    A = planted_matrix(eig, seed=0)
    kw = {"k": 5, "which": "LA", "tol": 1e-3, "max_steps": 200}
    if method == "plain":
        result = lanczos_top_k(A, **kw)
    else:
        result = thick_restart_lanczos_top_k(A, restart_size=12, **kw)
    assert all(result.converged) and result.num_matvecs <= 20
    # the five largest lie in the bulk (to the residual tolerance, 1e-3 * 10)
    assert float(result.eigenvalues.min()) >= -0.01 and float(result.eigenvalues.max()) <= 0.11


@pytest.mark.parametrize("restart_size", [None, 12])
def test_mean_mse_over_outputs_reports_each_eigenvalue_with_its_multiplicity(restart_size):
    # analysis.md §1(c): H = (2/(NC)) I_C (x) X^T X, every eigenvalue C times; nearly
    # exhausted blocks (beta ~ 1e-8 |theta_1|, not 1e-10) must also restart.
    gen = torch.Generator().manual_seed(3)
    N, d, C = 40, 6, 3
    X = torch.randn(N, d, generator=gen, dtype=F64) * torch.linspace(0.3, 2.0, d, dtype=F64)
    Y = torch.randn(N, C, generator=gen, dtype=F64)
    model = nn.Linear(d, C, bias=False).double()
    H = torch.kron(torch.eye(C, dtype=F64), X.T @ X) * 2 / (N * C)
    exact = torch.linalg.eigvalsh(H).flip(0)[:5]  # e1, e1, e1, e2, e2
    result = top_eigenvalues(model, (X, Y), k=5, loss="mse", tol=1e-8, restart_size=restart_size)
    assert rel_err(result.eigenvalues, exact) <= 1e-7
    assert result.ratio == pytest.approx(float(exact[0] / exact[4]), rel=1e-7)
    assert all(result.converged)


def test_full_run_reproduces_eigvalsh_and_keeps_an_orthonormal_basis(planted_matrix):
    A = planted_matrix(bulk(120, -2.0, 5.0, seed=8), seed=9)
    run = lanczos(A, 120)
    Q = run.basis
    assert float((Q @ Q.T - torch.eye(120, dtype=F64)).abs().max()) <= 1e-12
    np.testing.assert_allclose(run.ritz()[0], torch.linalg.eigvalsh(A).numpy(), atol=1e-11)


def test_no_ghost_copies_of_a_converged_eigenvalue(planted_matrix):
    # analysis.md §2 pitfall: without reorthogonalization λ1 = 24 reappears 3-15 times.
    eig = torch.cat([torch.tensor([24.0], dtype=F64), bulk(2999, 0.0, 2.0, seed=10)])

    def A(v):  # Lanczos is rotation invariant: a diagonal operator is as good a test
        return eig * v

    theta, _ = lanczos(A, 90, dim=3000).ritz()
    assert int(np.sum(np.abs(theta - 24.0) < 1e-3)) == 1
    top = lanczos_top_k(A, k=5, tol=1e-6, max_steps=200, dim=3000)
    assert top.eigenvalues[1] < 2.0  # λ2 is in the bulk, not a ghost of λ1


def test_agrees_with_scipy_eigsh(planted_matrix):
    A = planted_matrix(torch.cat([torch.tensor([9.0, 7.0, 6.5]), bulk(197, 0, 3, 12)]), 13)
    ours = lanczos_top_k(A, k=5, tol=1e-10).eigenvalues.numpy()
    op = scipy.sparse.linalg.aslinearoperator(A.numpy())
    ref = np.sort(scipy.sparse.linalg.eigsh(op, k=5, which="LA", tol=1e-12)[0])[::-1]
    np.testing.assert_allclose(ours, ref, rtol=1e-6)


def test_unconverged_pairs_are_flagged(planted_matrix):
    A = planted_matrix(bulk(300, 0.0, 1.0, seed=14), seed=15)  # no gap: slow
    result = lanczos_top_k(A, k=5, tol=1e-12, max_steps=8)
    assert result.num_steps == 8
    assert not all(result.converged)


def test_eigenvectors_and_true_residuals(planted_matrix):
    eig = torch.cat([torch.tensor([5.0, 4.0], dtype=F64), bulk(98, 0, 1, 16)])
    A = planted_matrix(eig, seed=17)
    result = lanczos_top_k(A, k=2, tol=1e-10, return_eigenvectors=True)
    Y = result.eigenvectors
    assert Y.shape == (2, 100)
    torch.testing.assert_close(Y @ Y.T, torch.eye(2, dtype=F64), atol=1e-10, rtol=0)
    residual = torch.linalg.vector_norm(Y @ A - result.eigenvalues[:, None] * Y, dim=1)
    torch.testing.assert_close(result.true_residuals, residual, atol=1e-12, rtol=0)
    assert float(residual.max()) <= 1e-8


def test_float32_basis_and_operator(planted_matrix):
    eig = torch.cat([torch.tensor([5.0, 4.0, 3.0], dtype=F64), bulk(197, 0, 1, 18)])
    A = planted_matrix(eig, seed=19).float()
    result = lanczos_top_k(A, k=3, tol=1e-5)
    assert rel_err(result.eigenvalues, eig[:3]) <= 1e-5


def test_chunked_float32_basis_products_match_the_direct_ones(monkeypatch):
    """A float32 basis is read in column chunks (rows x P > 2^24 elements); with 64-column
    chunks basis_dot, basis_combine and basis_combine_rows must equal the float64 products."""
    gen = torch.Generator().manual_seed(20)
    Q = torch.randn(7, 1000, generator=gen)
    w = torch.randn(1000, generator=gen, dtype=F64)
    c = torch.randn(7, generator=gen, dtype=F64)
    monkeypatch.setattr(_linear, "_CHUNK_ELEMENTS", 7 * 64)
    torch.testing.assert_close(_linear.basis_dot(Q, w), Q.double() @ w)
    torch.testing.assert_close(_linear.basis_combine(Q, c), c @ Q.double())
    torch.testing.assert_close(_linear.basis_combine_rows(Q, c[None]), c[None] @ Q.double())


def test_bad_arguments():
    A = torch.eye(4, dtype=F64)
    with pytest.raises(SharpscopeError, match="larger than the number of parameters"):
        lanczos_top_k(A, k=5)
    with pytest.raises(SharpscopeError, match="which"):
        lanczos_top_k(A, k=1, which="BE")
    with pytest.raises(SharpscopeError, match="max_steps"):
        lanczos_top_k(A, k=3, max_steps=2)


@pytest.mark.parametrize("dtype, tol, bound", [(None, 1e-5, 1e-3), ("float64", 1e-8, 1e-8)])
def test_top5_of_network_hessians(case, dtype, tol, bound):
    op = HessianOperator(case.model, case.data, dtype=dtype)
    result = lanczos_top_k(op, k=5, tol=tol)
    assert all(result.converged)
    assert rel_err(result.eigenvalues, case.top(5)) <= bound
    assert op.hvp_count == result.num_matvecs <= 100


def test_most_negative_eigenvalues_of_a_network_hessian(mlp_case):
    op = HessianOperator(mlp_case.model, mlp_case.data, dtype="float64")
    exact = mlp_case.eigenvalues[:2].flip(0)
    assert exact[-1] < 0  # the fixture sits at a point with negative curvature
    result = lanczos_top_k(op, k=2, which="SA", tol=1e-8, max_steps=184)
    assert rel_err(result.eigenvalues, exact) <= 1e-8


@pytest.mark.parametrize("restart_size", [None, 11])
def test_a_step_budget_that_ends_a_copy_search_flags_the_values_a_copy_would_displace(
    planted_matrix, restart_size
):
    """λ = 5 (x6), 1 (x6); at 8 steps only four copies of 5 are found: the fifth value (1) is
    not certainly among the top 5 and must not be flagged converged."""
    A = planted_matrix(torch.tensor([5.0] * 6 + [1.0] * 6, dtype=F64))
    if restart_size is None:
        pairs = lanczos_top_k(A, k=5, max_steps=8)
    else:
        pairs = thick_restart_lanczos_top_k(A, k=5, max_steps=8, restart_size=restart_size)
    assert not all(pairs.converged)
    for value, converged in zip(pairs.eigenvalues.tolist(), pairs.converged):
        assert not converged or abs(value - 5.0) < 1e-8
    assert lanczos_top_k(A, k=5).converged == [True] * 5


def _slightly_asymmetric(n=30, skew=0.05):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(n, n, generator=gen, dtype=F64)
    return A + A.T, A + A.T + skew * A  # symmetric, and 5% off symmetric


@pytest.mark.parametrize(
    "run",
    [
        lambda M: lanczos_top_k(M, k=3),
        lambda M: thick_restart_lanczos_top_k(M, k=3, restart_size=8),
        lambda M: slq(M, num_probes=2, num_steps=10),
        lambda M: hutchpp(M, 9),
    ],
    ids=["lanczos", "thick-restart", "slq", "hutchpp"],
)
def test_a_non_symmetric_operator_is_refused_from_the_products_already_made(run):
    """A wrong double backward makes 'Hessian' products non-symmetric; Lanczos (q_{j-1}ᵀAq_j
    against β_{j-1}) and Hutch++ (its two sketches) check it without extra products."""
    symmetric, skewed = _slightly_asymmetric()
    run(symmetric)
    with pytest.raises(SharpscopeError, match="not symmetric"):
        run(skewed)


def test_weight_norm_models_get_the_true_hessian_or_a_clear_error():
    """PyTorch's double backward of weight_norm (torch 2.x) is not symmetric: sharpscope
    then refuses, as its dense reference does; a PyTorch that fixes it must match it."""
    from sharpscope.analysis.spectrum import hessian_trace
    from sharpscope.curvature import dense_hessian

    class WeightNormed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.utils.parametrizations.weight_norm(nn.Linear(4, 5))
            self.b = nn.Linear(5, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    torch.manual_seed(0)
    model = WeightNormed().double()
    data = (torch.randn(16, 4, dtype=F64), torch.randint(0, 3, (16,)))
    try:
        H = dense_hessian(model, data)
    except SharpscopeError as exc:
        assert "not symmetric" in str(exc)
        for analysis in (
            lambda: top_eigenvalues(model, data, k=3),
            lambda: hessian_trace(model, data),
        ):
            with pytest.raises(SharpscopeError, match="not symmetric"):
                analysis()
    else:
        exact = torch.linalg.eigvalsh(H).flip(0)[:3]
        found = top_eigenvalues(model, data, k=3, tol=1e-10).eigenvalues
        torch.testing.assert_close(found, exact, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("tol", [float("nan"), -1.0, 0.0])
def test_a_tolerance_that_no_residual_can_meet_is_refused(tol):
    with pytest.raises(SharpscopeError, match="tol must be a number > 0"):
        lanczos_top_k(torch.eye(4, dtype=F64), k=2, tol=tol)


def test_thick_restart_with_a_basis_of_every_dimension_runs_plain_lanczos():
    """k = P = 12 with restart_size 14: no restart is ever needed (was an error quoting a
    restart_size of 12 the user never gave)."""
    A = torch.diag(torch.arange(1.0, 13.0, dtype=F64))
    pairs = thick_restart_lanczos_top_k(A, k=12, restart_size=14)
    torch.testing.assert_close(pairs.eigenvalues, torch.arange(12.0, 0.0, -1.0, dtype=F64))


@pytest.mark.parametrize("restart_size", [None, 14])
def test_a_step_budget_that_ends_a_copy_search_inside_a_later_block_flags_it_too(
    planted_matrix, restart_size
):
    """λ = 5 (x4), 0.5 (x15): every max_steps, the values flagged converged are the exact
    top-5 ones, also when max_steps falls inside a block after a restart (not at its end)."""
    exact = [5.0] * 4 + [0.5]
    A = planted_matrix(torch.tensor([5.0] * 4 + [0.5] * 15, dtype=F64))
    for max_steps in range(5, 13):
        if restart_size is None:
            pairs = lanczos_top_k(A, k=5, max_steps=max_steps)
        else:
            pairs = thick_restart_lanczos_top_k(
                A, k=5, max_steps=max_steps, restart_size=restart_size
            )
        for value, want, converged in zip(pairs.eigenvalues.tolist(), exact, pairs.converged):
            assert not converged or abs(value - want) < 1e-8, (max_steps, pairs)


def test_a_symmetric_float32_matvec_callable_is_not_refused():
    """A callable's vectors are float64 but its products may be float32 (a hand-written
    HVP): the symmetry check must allow their rounding."""
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(2000, 2000, generator=gen)
    M = (B + B.T) / 2

    def f(v):
        return (M @ v.float()).double()

    lanczos_top_k(f, 5, dim=2000, max_steps=60)
    hutchpp(f, dim=2000, num_probes=30)
    slq(f, dim=2000, num_probes=1, num_steps=30)


def test_converged_flags_are_the_reported_residual_rule(planted_matrix):
    """Mutation gap (session 24): a flag is set exactly when the reported residual is
    within tol·|λ1|; over a sweep of step budgets some residuals fall between tol and
    100·tol, where a looser rule would call unconverged values converged."""
    eig = torch.cat([torch.linspace(10, 6, 5, dtype=F64), torch.linspace(0, 5, 195, dtype=F64)])
    A = planted_matrix(eig, 3)
    seen_band = False
    for steps in range(5, 60):
        pairs = lanczos_top_k(A, 5, tol=1e-6, max_steps=steps)
        scale = float(pairs.eigenvalues[0])  # positive semi-definite: the top Ritz value
        assert pairs.converged == [bool(r <= 1e-6 * scale) for r in pairs.residuals], steps
        seen_band |= any(1e-6 * scale < float(r) <= 1e-4 * scale for r in pairs.residuals)
    assert seen_band


@pytest.mark.parametrize("tiny, steps", [(1e-8, 2), (1e-12, 1)])
def test_breakdown_is_beta_below_1e_10_of_theta_1(tiny, steps):
    """analysis.md §2: the Krylov space counts as exhausted when β_j < 1e-10·|θ1|. From
    e1 + tiny·e2 of diag(3, 2, 1, 0.5), β1 = tiny: 1e-8 goes on to the eigenvalue 2 (a
    looser threshold would stop there), 1e-12 stops after one step."""
    from sharpscope.curvature.lanczos import lanczos

    A = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64))
    run = lanczos(A, 4, start=torch.tensor([1.0, tiny, 0.0, 0.0], dtype=F64), restart=False)
    assert run.exhausted and len(run.alpha) == steps
    np.testing.assert_allclose(run.alpha, [3.0, 2.0][:steps], rtol=1e-12)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize(
    "kernel",
    [
        lambda A: lanczos_top_k(A, k=2),
        lambda A: lanczos_top_k(A, k=2, which="SA"),
        lambda A: block_lanczos_top_k(A, k=2, block_size=2),
        lambda A: thick_restart_lanczos_top_k(A, k=2, restart_size=6),
        lambda A: power_iteration_top_k(A, k=1),
        lambda A: slq(A, num_probes=2, num_steps=8),
        lambda A: hutchinson(A, 10),
        lambda A: hutchinson(A, 40),  # P <= probes: the exact trace from unit vectors
        lambda A: hutchpp(A, 9),
        lambda A: hutchpp(A, 30),
    ],
    ids=[
        "lanczos",
        "lanczos-SA",
        "block",
        "thick-restart",
        "power",
        "slq",
        "hutchinson",
        "exact-trace",
        "hutchpp",
        "hutchpp-exact",
    ],
)
def test_b1_every_kernel_refuses_a_non_finite_product(kernel, bad):
    """Stress B1 (session 28): an inf or NaN product reached LAPACK (a LinAlgError
    traceback), read as an asymmetry, or gave a NaN trace; now one line, from the scalars
    the kernels compute anyway (Lanczos' α, a probe's vᵀAv)."""
    A = torch.diag(torch.linspace(1.0, 3.0, 30, dtype=F64))
    A[4, 4] = bad
    with pytest.raises(SharpscopeError, match="Hessian-vector product is not finite"):
        kernel(A)


def _kronecker_mse_hessian(N, d, C, seed):
    """Mean MSE over C outputs: H = (2/(NC)) I_C (x) XᵀX, N distinct non-zero eigenvalues
    (for N < d), each C times, and zeros."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, d, generator=gen, dtype=F64) * torch.linspace(0.3, 2.0, d, dtype=F64)
    return torch.kron(torch.eye(C, dtype=F64), X.T @ X) * (2 / (N * C))


@pytest.mark.parametrize("method", ["plain", "thick"])
@pytest.mark.parametrize("N, d, C, k", [(8, 12, 6, 9), (5, 30, 10, 5)])
@pytest.mark.parametrize("seed", range(8))
def test_b2_float32_products_never_flag_a_wrong_multiplicity_converged(method, N, d, C, k, seed):
    """Stress B2 (session 28): with float32 products the exhausted Krylov space left
    b ~ 1e-4 |θ1| (not 1e-10), no restart was recorded, rounding found a chance number of
    copies and the first-block rule flagged them converged (8 of 8 seeds wrong at
    (8, 12, 6), e.g. three copies of λ1 where there are six). Converged copies in one
    block now set off the copy search; no value flagged converged may be wrong."""
    H = _kronecker_mse_hessian(N, d, C, seed)
    exact = torch.linalg.eigvalsh(H).flip(0)[:k]
    A = H.float()  # float32 products
    if method == "plain":
        result = lanczos_top_k(A, k=k, seed=seed)
    else:
        result = thick_restart_lanczos_top_k(A, k=k, seed=seed)
    error = (result.eigenvalues - exact).abs() / exact[0]
    wrong = [i for i, (e, c) in enumerate(zip(error, result.converged)) if c and e > 1e-5]
    assert not wrong, (result.eigenvalues, exact, result.converged)
    assert result.restarts > 0  # the copy search ran


def test_a_basis_larger_than_the_free_memory_is_one_line(monkeypatch, planted_matrix):
    """A density with --lanczos-steps 1e8 allocated a P x P basis: an allocator traceback,
    or, where the kernel promised the bytes, the process killed once they were written."""
    from sharpscope import device_memory

    A = planted_matrix(torch.linspace(1.0, 5.0, 40))
    monkeypatch.setattr(device_memory, "available_memory_bytes", lambda: 40 * 20 * 8 - 1)
    with pytest.raises(SharpscopeError, match=r"basis of 20 vectors of 40 parameters needs"):
        lanczos(A, 20)
    with pytest.raises(SharpscopeError, match="--restart-size"):
        thick_restart_lanczos_top_k(A, 2, restart_size=20, max_steps=60)
    assert len(lanczos(A, 19).alpha) == 19  # what fits is taken


def _mlp_hessian() -> torch.Tensor:
    """The dense float64 Hessian of a small MLP's cross-entropy (P = 38)."""
    from sharpscope.curvature import dense_hessian

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    data = (torch.randn(20, 3, dtype=F64), torch.randint(0, 3, (20,)))
    return dense_hessian(model, data)


@pytest.mark.parametrize(("k", "block_size"), [(38, 3), (37, 3), (38, 5), (30, 7), (38, 4)])
def test_block_lanczos_returns_k_values_when_the_blocks_do_not_fill_the_budget(k, block_size):
    # only whole blocks ran (min(max_steps, P) // b of them), so k = P with b = 3 gave 36
    # values, silently (TopEigs.k smaller than asked, lambda_5 and ratio null)
    H = _mlp_hessian()
    exact = torch.linalg.eigvalsh(H).flip(0)
    pairs = block_lanczos_top_k(H, k=k, block_size=block_size, tol=1e-8, max_steps=100)
    assert len(pairs.eigenvalues) == len(pairs.converged) == len(pairs.residuals) == k
    assert all(pairs.converged) and pairs.num_matvecs == 38  # the whole space: exact
    torch.testing.assert_close(pairs.eigenvalues, exact[:k], rtol=0, atol=1e-12)


def test_block_lanczos_takes_a_partial_last_block_from_max_steps():
    A = torch.diag(torch.arange(7.0, 0.0, -1.0, dtype=F64))
    pairs = block_lanczos_top_k(A, k=7, block_size=2)  # it gave 6 values: 6.99, 5.88, ...
    torch.testing.assert_close(pairs.eigenvalues, torch.arange(7.0, 0.0, -1.0, dtype=F64))
    assert all(pairs.converged) and pairs.num_matvecs == 7
    H = _mlp_hessian()
    exact = torch.linalg.eigvalsh(H).flip(0)
    cut = block_lanczos_top_k(H, k=5, block_size=2, max_steps=5)  # it gave 4 values
    assert len(cut.eigenvalues) == 5 and cut.num_matvecs == 5
    for value, residual, ok in zip(cut.eigenvalues, cut.residuals, cut.converged):
        # every value is within its residual bound of a true eigenvalue
        assert float((exact - value).abs().min()) <= float(residual) + 1e-12
        assert not ok or abs(float(value) - float(exact[0])) <= 1e-5 * float(exact.abs().max())


def _kron_hessian(copies: int = 10) -> torch.Tensor:
    """Mean MSE of nn.Linear(2, C): (2/(NC)) I_C ⊗ [X 1]ᵀ[X 1], 3 values, each C times."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(40, 2, dtype=F64), torch.ones(40, 1, dtype=F64)], dim=1)
    return torch.kron(torch.eye(copies, dtype=F64), 2 * x.T @ x / (40 * copies))


@pytest.mark.parametrize("block_size", [1, 2, 3, 5, 10])
def test_block_lanczos_finds_more_copies_than_its_block_when_its_space_runs_out(block_size):
    # once the block Krylov space was invariant every residual was 0, so the convergence
    # test stopped the run before the exhaustion branch: block_size=2 returned
    # [λ1, λ1, λ2, λ2, λ3], all flagged converged, where λ1 is 10 times repeated
    H = _kron_hessian()
    exact = torch.linalg.eigvalsh(H).flip(0)
    pairs = block_lanczos_top_k(H, k=5, block_size=block_size, tol=1e-8, max_steps=300)
    torch.testing.assert_close(pairs.eigenvalues, exact[:5], rtol=1e-10, atol=0)
    assert all(pairs.converged)
    sa = block_lanczos_top_k(H, k=12, block_size=block_size, which="SA", tol=1e-8, max_steps=300)
    torch.testing.assert_close(sa.eigenvalues, exact.flip(0)[:12].flip(0), rtol=1e-10, atol=0)


@pytest.mark.parametrize("block_size", [2, 3, 4])
def test_block_lanczos_on_two_thirtyfold_values(planted_matrix, block_size):
    A = planted_matrix(torch.cat([torch.full((30,), 2.0), torch.full((30,), -2.0)]), seed=4)
    pairs = block_lanczos_top_k(A, k=5, block_size=block_size, tol=1e-8)  # gave -2 among them
    torch.testing.assert_close(pairs.eigenvalues, torch.full((5,), 2.0, dtype=F64))
    assert all(pairs.converged)


def test_a_budget_that_ends_the_block_copy_search_flags_what_a_copy_would_displace():
    # b = 2 from a space of 3 values, each 10 times: 3 blocks (6 products) reach an
    # invariant space holding 2 copies of each; max_steps = 6 ends the run there
    H = _kron_hessian()
    exact = torch.linalg.eigvalsh(H).flip(0)
    pairs = block_lanczos_top_k(H, k=5, block_size=2, tol=1e-8, max_steps=6)
    assert pairs.num_matvecs == 6 and len(pairs.eigenvalues) == 5
    top = abs(pairs.eigenvalues - exact[0]) <= 1e-10
    assert top.tolist() == [True, True, False, False, False]
    assert pairs.converged == top.tolist()  # only λ1's copies are certainly wanted
