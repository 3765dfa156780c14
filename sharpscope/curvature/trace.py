"""Stochastic trace estimation: Hutchinson and Hutch++ (analysis.md §3).

References:
    M. F. Hutchinson (1989), "A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines", Commun. Stat. Simul. Comput. 18.
    R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff (2021), "Hutch++: Optimal
    stochastic trace estimation", SOSA, arXiv:2010.09649.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from ..errors import SharpscopeError
from ._linear import F64, LinearOperator, as_operator, check_finite_products, random_vector
from .lanczos import check_symmetric, products_dtype, symmetry_advice

Distribution = Literal["rademacher", "gaussian"]


@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate.

    Attributes:
        trace: the estimate of tr(A).
        stderr: standard error (sample std / sqrt(probes) of the Hutchinson term; 0 for
            the exact trace from the P unit vectors, taken when P <= the budget).
        num_matvecs: operator applications.
        num_probes: probes of the Hutchinson term.
        samples: the per-probe quadratic forms of the Hutchinson term.
        low_rank_part: tr(Q^T A Q) for Hutch++, 0 for Hutchinson.
        frobenius_sq: an estimate of tr(A^2) = ||A||_F^2 = E||Av||^2 (Hutchinson only,
            NaN for Hutch++), at no extra cost.
        diagonal: estimate of diag(A), E[v * Av], when requested.
    """

    trace: float
    stderr: float
    num_matvecs: int
    num_probes: int
    samples: np.ndarray
    method: str
    low_rank_part: float = 0.0
    frobenius_sq: float = float("nan")
    diagonal: Tensor | None = None


def check_trace_budget(method: str, num_probes: int) -> None:
    """Refuse a probe budget the estimator cannot use, before any product is spent.

    Hutchinson needs at least 2 probes (for a standard error); Hutch++ splits its budget
    s into three equal parts, so s must be a multiple of 3, at least 6.

    >>> check_trace_budget("hutchpp", 99)
    """
    if method == "hutchinson" and num_probes < 2:
        raise SharpscopeError(f"Hutchinson needs at least 2 probes, got {num_probes}")
    if method == "hutchpp" and (num_probes < 6 or num_probes % 3):
        raise SharpscopeError(f"Hutch++ needs a multiple of 3 probes (>= 6), got {num_probes}")


def _probes(op: LinearOperator, gen: torch.Generator, rows: int, distribution: str) -> Tensor:
    return random_vector(op.dim, gen, distribution, rows=rows).to(op.device)


def _stderr(samples: np.ndarray) -> float:
    return (
        float(np.std(samples, ddof=1) / math.sqrt(len(samples))) if len(samples) > 1 else math.inf
    )


def hutchinson(
    A: Any,
    num_probes: int = 100,
    *,
    distribution: Distribution = "rademacher",
    seed: int = 0,
    block_size: int = 10,
    adaptive: bool = False,
    rel_tol: float = 1e-2,
    min_probes: int = 10,
    return_diagonal: bool = False,
    dim: int | None = None,
) -> TraceEstimate:
    r"""Hutchinson's estimator :math:`\hat t = \frac1s \sum_j v_j^T A v_j`.

    Per-probe variance is :math:`2(\|A\|_F^2 - \sum_i A_{ii}^2)` for Rademacher probes and
    :math:`2\|A\|_F^2` for Gaussian ones; the reported standard error is the sample
    std / :math:`\sqrt s`. Default s = 100 (analysis.md §3). With ``adaptive`` the run
    stops once stderr <= ``rel_tol`` |t̂| after at least ``min_probes`` probes (never on
    two agreeing running means, PyHessian's rule). When P <= s (and no diagonal is
    asked for) the P unit vectors give the exact trace instead (stderr 0, P products;
    they also show whether A is symmetric, and a non-symmetric A is refused).

    Args:
        A: symmetric operator (dense, HessianOperator, or callable with ``dim``).
        num_probes: s, the number of probes (the most, when adaptive).
        distribution: "rademacher" (default) or "gaussian".
        seed: seed of the probes.
        block_size: probes per (vmapped) block product.
        adaptive: stop early on a small relative standard error.
        rel_tol: that relative standard error.
        min_probes: never stop before this many probes.
        return_diagonal: also estimate diag(A) by E[v * Av].
        dim: vector length when ``A`` is a callable.

    >>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    >>> hutchinson(A, 10).trace  # Rademacher probes are exact on a diagonal matrix
    6.0
    """
    check_trace_budget("hutchinson", num_probes)
    op = as_operator(A, dim)
    if op.dim <= num_probes and not return_diagonal:
        # (with P = 2 two Rademacher probes can agree: an estimate ± 0 that is wrong)
        return _exact_trace(op, block_size, "hutchinson")
    gen = torch.Generator().manual_seed(int(seed))
    samples: list[float] = []
    norms_sq: list[float] = []
    diagonal = torch.zeros(op.dim, dtype=F64, device=op.device) if return_diagonal else None
    while len(samples) < num_probes:
        rows = min(block_size, num_probes - len(samples))
        V = _probes(op, gen, rows, distribution)
        AV = op.mm(V.to(op.dtype))
        quadratic = (V * AV).sum(1).tolist()
        check_finite_products(quadratic)
        samples.extend(quadratic)
        norms_sq.extend((AV * AV).sum(1).tolist())
        if diagonal is not None:
            diagonal += (V * AV).sum(0)
        if adaptive and len(samples) >= min_probes:
            mean = float(np.mean(samples))
            if _stderr(np.asarray(samples)) <= rel_tol * abs(mean):
                break
    s = np.asarray(samples)
    return TraceEstimate(
        trace=float(s.mean()),
        stderr=_stderr(s),
        num_matvecs=len(s),
        num_probes=len(s),
        samples=s,
        method="hutchinson",
        frobenius_sq=float(np.mean(norms_sq)),
        diagonal=None if diagonal is None else (diagonal / len(s)).cpu(),
    )


def _exact_trace(op: LinearOperator, block_size: int, method: str) -> TraceEstimate:
    """tr(A) from the P unit vectors, for a budget of at least P products: exact, stderr 0.

    ``samples`` are P·A_ii (their mean is the trace), ``frobenius_sq`` is ‖A‖_F²
    (Hutchinson only, as its estimate is), and A E must be symmetric: the free check
    that Hutch++'s sketches and Lanczos make, so the shortcut refuses what they refuse.
    """
    E = torch.eye(op.dim, dtype=F64, device=op.device)
    AE = _blocked(op, E, block_size)
    check_finite_products(AE)  # before inf reads as an asymmetry
    worst = int(torch.argmax((AE - AE.T).abs()))
    i, j = divmod(worst, op.dim)
    scale = float(torch.linalg.vector_norm(AE, dim=1).max())  # bounds every |A_ij|
    check_symmetric(
        float(AE[i, j]), float(AE[j, i]), scale, (products_dtype(op),), symmetry_advice(op)
    )
    diag = torch.diagonal(AE).cpu().numpy().copy()
    return TraceEstimate(
        trace=float(diag.sum()),
        stderr=0.0,
        num_matvecs=op.dim,
        num_probes=op.dim,
        samples=diag * op.dim,
        method=method,
        frobenius_sq=float((AE * AE).sum()) if method == "hutchinson" else float("nan"),
    )


def _blocked(op: LinearOperator, V: Tensor, block_size: int) -> Tensor:
    """``A`` applied to the rows of ``V`` in blocks."""
    return torch.cat(
        [op.mm(V[i : i + block_size].to(op.dtype)) for i in range(0, len(V), block_size)]
    )


def hutchpp(
    A: Any,
    num_probes: int = 99,
    *,
    distribution: Distribution = "rademacher",
    seed: int = 0,
    block_size: int = 11,
    dim: int | None = None,
) -> TraceEstimate:
    r"""Hutch++ (Meyer et al., 2021): exact trace on a sketched subspace plus Hutchinson.

    With budget s (divisible by 3): draw :math:`S \in R^{P\times s/3}`,
    :math:`Q = \mathrm{orth}(AS)` (QR), and
    :math:`\hat t = \mathrm{tr}(Q^TAQ) + \frac3s\sum_j g_j^T(I-QQ^T)A(I-QQ^T)g_j` over s/3
    fresh probes. The error decays like 1/s instead of 1/√s when a few eigenvalues
    dominate, as they do for trained networks. The reported stderr is that of the
    second (Hutchinson) term. Default s = 99 (analysis.md §3). Stores 2s/3 vectors.
    When P <= s the P unit vectors give the exact trace instead (stderr 0, P
    products), as in :func:`hutchinson`.

    Args:
        A: symmetric operator (dense, HessianOperator, or callable with ``dim``).
        num_probes: total budget s of products, a multiple of 3.
        distribution: probes, "rademacher" (default) or "gaussian".
        seed: seed of the probes.
        block_size: vectors per (vmapped) block product.
        dim: vector length when ``A`` is a callable.

    Raises:
        SharpscopeError: when ``num_probes`` is not a positive multiple of 3.

    >>> U = torch.linalg.qr(torch.randn(50, 2, dtype=torch.float64))[0]
    >>> A = U @ torch.diag(torch.tensor([7.0, 3.0], dtype=torch.float64)) @ U.T
    >>> round(hutchpp(A, 6).trace, 8)  # rank 2 <= s/3: the sketch captures it exactly
    10.0
    """
    check_trace_budget("hutchpp", num_probes)
    op = as_operator(A, dim)
    if op.dim <= num_probes:
        return _exact_trace(op, block_size, "hutchpp")
    r = num_probes // 3
    gen = torch.Generator().manual_seed(int(seed))
    S = _probes(op, gen, r, distribution)
    AS = _blocked(op, S, block_size)
    check_finite_products(AS)  # before QR (one pass over AS; the QR costs s/3 of them)
    Q = torch.linalg.qr(AS.T).Q.T.contiguous()  # (min(r, P), P), orthonormal rows
    AQ = _blocked(op, Q, block_size)
    _check_sketches_symmetric(op, S, AS, Q, AQ)
    low_rank = float((Q * AQ).sum())
    G = _probes(op, gen, r, distribution)
    G = G - (G @ Q.T) @ Q
    AG = _blocked(op, G, block_size)
    AG = AG - (AG @ Q.T) @ Q  # (I-QQ^T) A (I-QQ^T) g
    samples = (G * AG).sum(1).cpu().numpy()
    check_finite_products(low_rank, samples)
    return TraceEstimate(
        trace=low_rank + float(samples.mean()),
        stderr=_stderr(samples),
        num_matvecs=2 * r + Q.shape[0],
        num_probes=r,
        samples=samples,
        method="hutchpp",
        low_rank_part=low_rank,
    )


def _check_sketches_symmetric(op: Any, S: Tensor, AS: Tensor, Q: Tensor, AQ: Tensor) -> None:
    """For symmetric A, (AQ) Sᵀ = Q (AS)ᵀ: Hutch++'s two sketches check it for free."""
    left, right = AQ @ S.T, Q @ AS.T
    worst = int(torch.argmax((left - right).abs()))
    i, j = divmod(worst, right.shape[1])
    norm = torch.linalg.vector_norm
    # Cauchy-Schwarz bounds of both sides' entries: what their rounding scales with
    scale = max(float(norm(AQ, dim=1).max() * norm(S, dim=1).max()), float(norm(AS, dim=1).max()))
    dtypes = (products_dtype(op),)
    check_symmetric(float(left[i, j]), float(right[i, j]), scale, dtypes, symmetry_advice(op))
