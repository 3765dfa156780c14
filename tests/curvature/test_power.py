"""The PyHessian-style power-iteration baseline and the pitfalls it shows (analysis.md §2)."""

from __future__ import annotations

import torch

from sharpscope.curvature import lanczos_top_k, power_iteration_top_k

F64 = torch.float64


def bulk(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_separated_eigenvalues_are_found(planted_matrix):
    eig = torch.cat([torch.tensor([40.0, 20.0, 10.0], dtype=F64), bulk(97, 1)])
    pairs = power_iteration_top_k(planted_matrix(eig, seed=2), k=3, tol=1e-10, max_iter=500)
    torch.testing.assert_close(pairs.eigenvalues, eig[:3], rtol=1e-6, atol=0)
    assert all(pairs.converged)


def test_clustered_eigenvalues_defeat_the_relative_change_rule(planted_matrix):
    # λ = 24, 22, 21, 20.5, 20: PyHessian's rule (tol 1e-3) stops early; Lanczos does not.
    eig = torch.cat([torch.tensor([24.0, 22.0, 21.0, 20.5, 20.0], dtype=F64), bulk(395, 3)])
    A = planted_matrix(eig, seed=4)
    power = power_iteration_top_k(A, k=5)
    power_err = float(((power.eigenvalues - eig[:5]).abs() / eig[:5]).max())
    lanczos = lanczos_top_k(A, k=5, tol=1e-8)
    lanczos_err = float(((lanczos.eigenvalues - eig[:5]).abs() / eig[:5]).max())
    assert power_err > 1e-3
    assert lanczos_err < 1e-8
    assert lanczos.num_matvecs < power.num_matvecs


def test_power_iteration_converges_to_the_largest_magnitude(planted_matrix):
    eig = torch.cat([torch.tensor([-30.0, 10.0], dtype=F64), bulk(98, 5)])
    pairs = power_iteration_top_k(planted_matrix(eig, seed=6), k=1, tol=1e-10, max_iter=500)
    assert abs(float(pairs.eigenvalues[0]) + 30.0) < 1e-6  # negative, not λmax = 10
