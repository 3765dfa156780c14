"""Gap tests for mutants of sharpscope/curvature/power.py that the suite let through
(session 25, mut_spec). Each compares every field of the result with an independent
transcription of PyHessian 0.1's deflated power iteration (analysis.md §2, "Reference
baselines") on a small float64 matrix."""

from __future__ import annotations

import torch

from sharpscope.curvature import power_iteration_top_k
from sharpscope.curvature._linear import random_vector

F64 = torch.float64


def spectrum_matrix() -> torch.Tensor:
    """A symmetric 60 x 60 matrix with eigenvalues 9, 6, 5, 4 and a bulk in [0, 1]."""
    gen = torch.Generator().manual_seed(11)
    eig = torch.cat(
        [torch.tensor([9.0, 6.0, 5.0, 4.0], dtype=F64), torch.rand(56, generator=gen, dtype=F64)]
    )
    Q, _ = torch.linalg.qr(torch.randn(60, 60, generator=gen, dtype=F64))
    return (Q * eig) @ Q.T


def reference(H, k, *, tol=1e-3, max_iter=100, seed=0):
    """PyHessian's loop, written out: (values, vectors, residuals, converged, products,
    quotients of the first eigenvalue's iterations)."""
    gen = torch.Generator().manual_seed(seed)
    values, vectors, residuals, converged, products, first = [], [], [], [], 0, []
    for i in range(k):
        v = random_vector(H.shape[0], gen)
        v = v / (v.norm() + 1e-6)
        lam, stopped, res = None, False, float("nan")
        for _ in range(max_iter):
            for u in vectors:
                v = v - (v @ u) * u
            v = v / (v.norm() + 1e-6)
            Hv = H @ v
            products += 1
            new = float(Hv @ v)
            if i == 0:
                first.append(new)
            res = float((Hv - new * v).norm())  # ||Hv - θv|| of the iterate the quotient is of
            v = Hv / (Hv.norm() + 1e-6)
            if lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol:
                stopped = True
                break
            lam = new
        values.append(lam)
        vectors.append(v)
        residuals.append(res)
        converged.append(stopped)
    return values, vectors, residuals, converged, products, first


def assert_matches(pairs, ref):
    values, vectors, residuals, converged, products, _ = ref
    torch.testing.assert_close(
        pairs.eigenvalues, torch.tensor(values, dtype=F64), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(pairs.eigenvectors, torch.stack(vectors), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        pairs.residuals, torch.tensor(residuals, dtype=F64), rtol=1e-9, atol=1e-12
    )
    assert pairs.converged == converged
    assert pairs.num_matvecs == products == pairs.num_steps


# P4: the residual ||Av - θv|| computed as ||Av + θv||
def test_residuals_are_those_of_the_last_iterate_and_its_quotient():
    H = spectrum_matrix()
    ref = reference(H, 3, tol=1e-6, max_iter=200)
    pairs = power_iteration_top_k(H, k=3, tol=1e-6, max_iter=200)
    assert_matches(pairs, ref)
    # converged pairs: the residual is small against λ, not ~2|λ|
    assert all(float(r) < 0.1 * float(v) for r, v in zip(pairs.residuals, pairs.eigenvalues))


# P5: every pair flagged converged; P6: num_matvecs short by k; P10: max_iter - 1 products
def test_max_iter_caps_the_products_and_leaves_the_pairs_unconverged():
    H = spectrum_matrix()
    ref = reference(H, 2, tol=1e-12, max_iter=4)
    pairs = power_iteration_top_k(H, k=2, tol=1e-12, max_iter=4)
    assert ref[3] == [False, False] and ref[4] == 8  # the cap, not the rule, stopped both
    assert_matches(pairs, ref)
    assert pairs.converged == [False, False] and pairs.num_matvecs == 8
    # once the rule does fire, the flag says so and the count is the products taken
    ref = reference(H, 2, tol=1e-3, max_iter=100)
    pairs = power_iteration_top_k(H, k=2, tol=1e-3, max_iter=100)
    assert ref[3] == [True, True] and ref[4] < 200
    assert_matches(pairs, ref)


# P8: the seed ignored (start vectors always from seed 0)
def test_the_seed_draws_the_start_vectors():
    H = spectrum_matrix()
    pairs = power_iteration_top_k(H, k=2, tol=1e-4, seed=7)
    assert_matches(pairs, reference(H, 2, tol=1e-4, seed=7))
    other = power_iteration_top_k(H, k=2, tol=1e-4, seed=0)
    assert not torch.equal(other.eigenvectors, pairs.eigenvectors)


# P11: the relative change divided by the new quotient instead of the previous one
def test_the_relative_change_is_relative_to_the_previous_quotient():
    H = spectrum_matrix()
    q = reference(H, 1, tol=0.0, max_iter=12)[5]  # the first eigenvalue's quotients
    # a tol between |Δ|/|q_prev| and |Δ|/|q_new| at some step j (quotients increase, so
    # |Δ|/|q_new| is the smaller): PyHessian's rule does not stop there, the other would
    j = next(
        j
        for j in range(2, len(q))
        if abs(q[j] - q[j - 1]) / (abs(q[j]) + 1e-6) < abs(q[j] - q[j - 1]) / (abs(q[j - 1]) + 1e-6)
        and all(
            abs(q[i] - q[i - 1]) / (abs(q[i - 1]) + 1e-6)
            > abs(q[j] - q[j - 1]) / (abs(q[j - 1]) + 1e-6)
            for i in range(1, j)
        )
    )
    lo = abs(q[j] - q[j - 1]) / (abs(q[j]) + 1e-6)
    hi = abs(q[j] - q[j - 1]) / (abs(q[j - 1]) + 1e-6)
    tol = (lo + hi) / 2
    ref = reference(H, 1, tol=tol, max_iter=100)
    assert ref[4] > j + 1  # the reference goes on past step j + 1
    assert_matches(power_iteration_top_k(H, k=1, tol=tol, max_iter=100), ref)
