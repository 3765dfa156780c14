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


def test_the_basis_never_exceeds_the_restart_size(planted_matrix, monkeypatch):
    eig = torch.cat([torch.tensor([9.0, 8.0, 7.5], dtype=F64), bulk(297, 0.0, 5.0, seed=3)])
    A = planted_matrix(eig, seed=4)
    allocated = []
    empty = torch.empty

    def recording_empty(*shape, **kw):
        allocated.append(tuple(shape[0]) if isinstance(shape[0], tuple) else shape)
        return empty(*shape, **kw)

    monkeypatch.setattr(torch, "empty", recording_empty)
    result = thick_restart_lanczos_top_k(A, k=3, restart_size=9, tol=1e-9, max_steps=500)
    monkeypatch.undo()
    assert allocated == [(9, 300)]  # the only P-sized storage: 9 basis vectors
    assert result.restarts >= 2 and all(result.converged)
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
    with pytest.raises(SharpscopeError, match="k <= keep < restart_size"):
        thick_restart_lanczos_top_k(A, k=5, restart_size=5)
    with pytest.raises(SharpscopeError, match="k <= keep < restart_size"):
        thick_restart_lanczos_top_k(A, k=5, keep=3)
