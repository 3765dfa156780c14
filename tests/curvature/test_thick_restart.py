"""Thick-restart Lanczos against dense eigendecompositions, with a bounded basis."""

from __future__ import annotations

import pytest
import torch

from sharpscope.analysis.spectrum import top_eigenvalues
from sharpscope.curvature import lanczos_top_k
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
def test_planted_outliers_with_an_8_vector_basis(planted_matrix, outliers):
    eig = torch.cat([torch.tensor(outliers, dtype=F64), bulk(395, 0.0, 1.0, seed=1)])
    A = planted_matrix(eig, seed=2)
    result = thick_restart_lanczos_top_k(A, k=5, restart_size=8, tol=1e-9, max_steps=400)
    assert all(result.converged)
    assert rel_err(result.eigenvalues, torch.tensor(outliers, dtype=F64)) <= 1e-8
    assert result.restarts >= 1


def test_many_thick_restarts_on_an_evenly_spaced_spectrum(planted_matrix):
    """Eigenvalues 1..100 at tol 1e-10 with 8 vectors (~30 thick restarts): 100 and 99 to
    1e-10; with one Gram-Schmidt pass (no three-term step precedes it here) the basis lost
    orthogonality and the top value came out as 102.7."""
    A = planted_matrix(torch.arange(1.0, 101.0, dtype=F64), seed=0)
    result = thick_restart_lanczos_top_k(
        A, k=2, restart_size=8, tol=1e-10, return_eigenvectors=True
    )
    assert result.restarts >= 10 and all(result.converged)
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor([100.0, 99.0], dtype=F64), atol=1e-10, rtol=0
    )
    assert float(result.true_residuals.max()) <= 1e-10 * 100


@pytest.mark.parametrize(
    ("restart_size", "rows", "restarts"),
    [(9, 9, 2), pytest.param(None, 16, 1, id="default-2k+10")],
)
def test_the_basis_never_exceeds_the_restart_size(
    planted_matrix, monkeypatch, restart_size, rows, restarts
):
    eig = torch.cat([torch.tensor([9.0, 8.0, 7.5], dtype=F64), bulk(297, 0.0, 5.0, seed=3)])
    A = planted_matrix(eig, seed=4)
    allocated = []
    empty = torch.empty

    def recording_empty(*shape, **kw):
        allocated.append(tuple(shape[0]) if isinstance(shape[0], tuple) else shape)
        return empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", recording_empty)
    result = thick_restart_lanczos_top_k(A, k=3, restart_size=restart_size, tol=1e-9, max_steps=500)
    monkeypatch.undo()
    assert allocated == [(rows, 300)]  # the only P-sized storage: the basis vectors
    assert result.restarts >= restarts and all(result.converged)
    exact = torch.linalg.eigvalsh(A).flip(0)[:3]
    assert rel_err(result.eigenvalues, exact) <= 1e-8


def test_negative_eigenvalues_and_largest_magnitude(planted_matrix):
    eig = torch.cat([torch.tensor([-9.0, -7.0, -4.0, 6.0, 5.0], dtype=F64), bulk(195, -1, 1, 3)])
    A = planted_matrix(eig, seed=4)
    exact = torch.linalg.eigvalsh(A)
    sa = thick_restart_lanczos_top_k(A, k=3, which="SA", tol=1e-9, max_steps=300)
    assert rel_err(sa.eigenvalues, exact[:3].flip(0)) <= 1e-8
    lm = thick_restart_lanczos_top_k(A, k=3, which="LM", tol=1e-9, max_steps=300)
    assert rel_err(lm.eigenvalues, torch.tensor([6.0, -7.0, -9.0], dtype=F64)) <= 1e-8


@pytest.mark.parametrize("method", ["plain", "thick"])
def test_smallest_eigenvalues_are_the_largest_of_the_negated_matrix(planted_matrix, method):
    """which="SA" on A must be exactly -(which="LA" on -A), at the same cost (a thick restart
    that kept the LA Ritz vectors whatever `which` was still converged, in more steps)."""
    eig = torch.cat([torch.tensor([-9.0, -7.0, -4.0, 6.0, 5.0], dtype=F64), bulk(195, -1, 1, 3)])
    A = planted_matrix(eig, seed=4)

    def top3(M, which):
        if method == "plain":
            return lanczos_top_k(M, k=3, which=which, tol=1e-9)
        return thick_restart_lanczos_top_k(M, k=3, which=which, tol=1e-9, max_steps=300)

    sa, la = top3(A, "SA"), top3(-A, "LA")  # -4, -7, -9 and 9, 7, 4
    torch.testing.assert_close(sa.eigenvalues, -la.eigenvalues.flip(0), rtol=1e-10, atol=0)
    assert sa.num_matvecs == la.num_matvecs


def test_eigenvectors_and_true_residuals_agree_with_plain_lanczos(planted_matrix):
    eig = torch.cat([torch.tensor([12.0, 9.0, 7.0], dtype=F64), bulk(197, 0.0, 2.0, seed=5)])
    A = planted_matrix(eig, seed=6)
    thick = thick_restart_lanczos_top_k(
        A, k=3, restart_size=10, tol=1e-10, max_steps=300, return_eigenvectors=True
    )
    plain = lanczos_top_k(A, k=3, tol=1e-10, return_eigenvectors=True)
    torch.testing.assert_close(thick.eigenvalues, plain.eigenvalues, rtol=1e-10, atol=0)
    assert float(thick.true_residuals.max()) <= 1e-7 * 12
    overlap = (thick.eigenvectors @ plain.eigenvectors.T).abs().diagonal()
    assert float(overlap.min()) >= 1 - 1e-10


def test_unconverged_pairs_are_flagged(planted_matrix):
    """The thick twin of test_lanczos's: a gapless bulk stopped at max_steps must report
    nonzero residuals and unconverged pairs (not a final residual norm of 0)."""
    A = planted_matrix(bulk(300, 0.0, 1.0, seed=14), seed=15)
    result = thick_restart_lanczos_top_k(A, k=5, tol=1e-12, max_steps=20, restart_size=12)
    assert result.num_steps == 20 and result.restarts >= 1
    assert not all(result.converged)
    assert float(result.residuals.min()) > 0


@pytest.mark.parametrize("seed", range(4))
def test_residuals_left_out_at_a_restart_are_kept_through_a_thick_restart(planted_matrix, seed):
    """{5, 5+3e-6, 5+6e-6} beside 4.9 and 4.8 at tol 1e-6 with 7 vectors: a restart at the
    tolerance, then a thick restart; the kept Ritz vectors must carry the beta left out, or
    their residuals read 1e-12 against a true 1e-6 (test_lanczos has the restart alone)."""
    values = [5.0, 5.0 + 3e-6, 5.0 + 6e-6, 4.9, 4.8, 3.0, 1.0]
    A = planted_matrix(
        torch.cat([torch.tensor(values, dtype=F64), torch.zeros(93, dtype=F64)]), seed=11 + seed
    )
    result = thick_restart_lanczos_top_k(A, k=3, tol=1e-6, restart_size=7, return_eigenvectors=True)
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor(values[2::-1], dtype=F64), atol=1e-10, rtol=0
    )
    assert result.restarts >= 1
    assert torch.all(result.true_residuals <= result.residuals * (1 + 1e-9) + 1e-13)


def test_exhausted_krylov_space_continues_with_a_fresh_direction():
    # rank 4: the start vector's Krylov space closes after 4 steps; the zeros are found too
    gen = torch.Generator().manual_seed(7)
    U, _ = torch.linalg.qr(torch.randn(60, 4, generator=gen, dtype=F64))
    A = U @ torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0], dtype=F64)) @ U.T
    result = thick_restart_lanczos_top_k(A, k=5, restart_size=12, tol=1e-10, max_steps=100)
    torch.testing.assert_close(
        result.eigenvalues, torch.tensor([5.0, 4.0, 3.0, 2.0, 0.0], dtype=F64), atol=1e-9, rtol=0
    )


def test_hessian_top5_through_the_analysis_api(mlp_case):
    result = top_eigenvalues(
        mlp_case.model,
        mlp_case.data,
        k=5,
        dtype="float64",
        tol=1e-10,
        max_steps=400,
        restart_size=15,
    )
    assert rel_err(result.eigenvalues, mlp_case.top(5)) <= 1e-8
    assert result.meta.extra["restart_size"] == 15 and result.meta.extra["restarts"] >= 1


def test_bad_restart_settings_raise_one_clear_error():
    A = torch.eye(30, dtype=F64)
    with pytest.raises(SharpscopeError, match="restart_size must be > k"):
        thick_restart_lanczos_top_k(A, k=5, restart_size=5)
    with pytest.raises(SharpscopeError, match="k <= keep < restart_size"):
        thick_restart_lanczos_top_k(A, k=5, keep=3)


def test_a_triple_top_eigenvalue_is_found_three_times_through_thick_restarts(planted_matrix):
    """Mutation gap (session 24): the copy search keeps the leading Ritz vector of a later
    Krylov block at a restart, ahead of the current block's; without either part this
    run stopped with all three values flagged unconverged."""
    A = planted_matrix(torch.arange(10, 0, -1, dtype=F64).repeat_interleave(3), 0)
    pairs = thick_restart_lanczos_top_k(A, 3, restart_size=12, tol=1e-8, max_steps=400, seed=0)
    assert pairs.eigenvalues.tolist() == pytest.approx([10.0] * 3, abs=1e-8)
    assert all(pairs.converged)


def test_a_restart_size_not_above_k_names_only_restart_size(planted_matrix):
    # the message named keep, which top_eigenvalues does not take
    A = planted_matrix(torch.arange(30, 0, -1, dtype=torch.float64), seed=2)
    for size in (5, 3):
        with pytest.raises(SharpscopeError, match=r"^restart_size must be > k .*got k=5, ") as info:
            thick_restart_lanczos_top_k(A, k=5, restart_size=size)
        assert "keep=" not in str(info.value) and "keep <" not in str(info.value)
    with pytest.raises(SharpscopeError, match="k <= keep < restart_size"):
        thick_restart_lanczos_top_k(A, k=5, keep=7, restart_size=7)
