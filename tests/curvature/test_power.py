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
    # PyHessian's normalization v / (||v|| + 1e-6) biases the quotient by ~2e-6 relative
    torch.testing.assert_close(pairs.eigenvalues, eig[:3], rtol=1e-5, atol=0)
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
    assert abs(float(pairs.eigenvalues[0]) + 30.0) < 1e-4  # negative, not λmax = 10


def test_the_stopping_step_keeps_what_pyhessian_keeps():
    # PyHessian 0.1's loop: on the stopping step it keeps the *previous* quotient and the
    # *next* iterate Hv/||Hv||, and deflates later eigenvalues against that vector.
    from sharpscope.curvature._linear import random_vector

    eig = torch.cat([torch.tensor([24.0, 22.0, 21.0, 20.5, 20.0], dtype=F64), bulk(495, 7)])
    H = torch.diag(eig)
    gen = torch.Generator().manual_seed(0)
    values, vectors = [], []
    for _ in range(5):
        v = random_vector(500, gen)
        v = v / (v.norm() + 1e-6)  # normalization()
        eigenvalue = None
        for _ in range(100):
            for u in vectors:  # orthnormal(v, eigenvectors)
                v = v - (v @ u) * u
            v = v / (v.norm() + 1e-6)
            Hv = H @ v
            tmp = float(Hv @ v)
            v = Hv / (Hv.norm() + 1e-6)
            if eigenvalue is not None and abs(eigenvalue - tmp) / (abs(eigenvalue) + 1e-6) < 1e-3:
                break
            eigenvalue = tmp
        values.append(eigenvalue)
        vectors.append(v)
    pairs = power_iteration_top_k(H, k=5)
    torch.testing.assert_close(pairs.eigenvalues, torch.tensor(values, dtype=F64))
    torch.testing.assert_close(pairs.eigenvectors, torch.stack(vectors))
