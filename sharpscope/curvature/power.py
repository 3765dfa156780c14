"""Deflated power iteration with PyHessian's settings: a reference baseline, not a default.

analysis.md §2, "Reference baselines": Gaussian start, re-orthogonalize against the
eigenvectors already found at every step, stop when the relative change of the
Rayleigh quotient is below ``tol`` (1e-3), at most ``max_iter`` (100) products per
eigenvalue. This reproduces ``pyhessian.hessian.eigenvalues`` (Yao et al., 2020,
arXiv:1912.07145) on any operator, so its known failures can be tested: it converges
to the largest |λ| (possibly negative), stops early on clustered eigenvalues, and
deflation errors compound down the list.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SharpscopeError
from ._linear import F64, as_operator, check_finite_products, random_vector
from .lanczos import EigenPairs


def power_iteration_top_k(
    A: Any,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    dim: int | None = None,
) -> EigenPairs:
    r"""Top-``k`` eigenpairs by deflated power iteration (PyHessian's rule).

    For each pair: :math:`v \leftarrow` Gaussian, normalized; repeat
    :math:`v \leftarrow (I - VV^T)v/\|\cdot\|`, :math:`\lambda = v^T A v`,
    :math:`v \leftarrow Av/\|Av\|` until
    :math:`|\lambda - \lambda_{prev}| / (|\lambda_{prev}| + 10^{-6}) < tol`. Like
    PyHessian 0.1 (whose normalization divides by :math:`\|v\| + 10^{-6}` and whose
    deflation is one modified Gram-Schmidt pass) it then keeps :math:`\lambda_{prev}` and the new iterate
    :math:`Av/\|Av\|` (deflating the next eigenvalues against that vector); after
    ``max_iter`` products, the last quotient and the new iterate.

    Args:
        A: symmetric operator (dense, HessianOperator or callable with ``dim``).
        k: number of eigenpairs.
        tol: relative change of the Rayleigh quotient that stops an eigenvalue.
        max_iter: the most products per eigenvalue.
        seed: seed of the start vectors.
        dim: vector length when ``A`` is a callable.

    Returns:
        :class:`~sharpscope.curvature.lanczos.EigenPairs` in the order found (not
        sorted: the order is part of what this baseline shows), residuals
        ``||A v - θ v||`` of the last iterate and its quotient θ (no extra products:
        the last product is reused; the returned vector is one step further) and
        ``converged`` meaning the stopping rule fired.

    >>> A = torch.diag(torch.tensor([4.0, 1.0, 0.5], dtype=torch.float64))
    >>> round(power_iteration_top_k(A, k=1, tol=1e-10, max_iter=500).eigenvalues.item(), 4)
    4.0
    """
    op = as_operator(A, dim)
    if k < 1 or k > op.dim:
        raise SharpscopeError(f"k must be in 1..{op.dim}, got {k}")
    gen = torch.Generator().manual_seed(int(seed))
    found: list[torch.Tensor] = []
    values: list[float] = []
    residuals: list[float] = []
    converged: list[bool] = []
    matvecs = 0
    for _ in range(k):
        v = _normalized(random_vector(op.dim, gen).to(op.device))
        lam = None
        stopped = False
        res = float("nan")
        for _ in range(max_iter):
            for u in found:  # PyHessian's orthnormal: one modified Gram-Schmidt pass
                v = v - (v @ u) * u
            v = _normalized(v)
            Av = op.mv(v)
            matvecs += 1
            new = float(v @ Av)
            check_finite_products(new)
            res = float(torch.linalg.vector_norm(Av - new * v))
            v = _normalized(Av)
            if lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol:
                stopped = True  # PyHessian keeps the previous quotient
                break
            lam = new
        assert lam is not None
        values.append(lam)
        residuals.append(res)
        converged.append(stopped)
        found.append(v.to(F64))
    return EigenPairs(
        eigenvalues=torch.tensor(values, dtype=F64),
        residuals=torch.tensor(residuals, dtype=F64),
        converged=converged,
        num_matvecs=matvecs,
        num_steps=matvecs,
        eigenvectors=torch.stack(found).cpu(),
    )


def _normalized(v: torch.Tensor) -> torch.Tensor:
    """PyHessian's ``normalization``: ``v / (||v|| + 1e-6)``."""
    return v / (torch.linalg.vector_norm(v) + 1e-6)
