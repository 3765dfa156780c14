r"""Thick-restart Lanczos: top-k eigenpairs with a basis of bounded size (analysis.md §2).

Plain Lanczos keeps every basis vector (m_max vectors of length P: 4.5 GB for a ResNet-18
at m_max = 100). Thick restarting (Wu and Simon, 2000, "Thick-restart Lanczos method for
large symmetric eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2), 602-616) caps the
basis at ``restart_size`` vectors: when it is full, the ``keep`` wanted Ritz vectors
:math:`y_i = V^T s_i` and the last residual direction :math:`v_{m+1}` become the new
basis, and the process continues from :math:`v_{m+1}`. The projected matrix is then no
longer tridiagonal but "arrowhead plus tridiagonal",

.. math:: T = \begin{pmatrix} \Theta & \beta_m s_m & \\ \beta_m s_m^T & \alpha & \ddots \\
          & \ddots & \ddots \end{pmatrix},

so every step here computes the whole column :math:`T_{:,j} = V A v_j` during the (twice
repeated, classical Gram-Schmidt, float64) full reorthogonalization, which is exactly the
arrowhead coupling after a restart and :math:`(\beta_{j-1}, \alpha_j)` otherwise. The
small symmetric T is solved densely. As in plain Lanczos, after step j the residual of
Ritz pair i is :math:`\beta_j |s_{j,i}|`: only the newest basis vector's image leaves the
basis. Defaults follow the spec: keep k Ritz vectors, restart at 2k + 10.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import SharpscopeError
from ._linear import (
    F64,
    as_operator,
    basis_combine_rows,
    basis_dot,
    check_finite_products,
    orthogonalize,
    random_vector,
)
from .lanczos import (
    RESTART,
    WHICH,
    EigenPairs,
    Which,
    _check_k,
    check_symmetric,
    empty_basis,
    lanczos_top_k,
    preference,
    products_dtype,
    products_rounding,
    ritz_pairs,
    select,
    symmetry_advice,
    top_k_verdict,
    unfinished_copy_search,
)

__all__ = ["thick_restart_lanczos_top_k", "default_restart_size"]


def default_restart_size(k: int) -> int:
    """The spec's restart point, 2k + 10 basis vectors."""
    return 2 * k + 10


def thick_restart_lanczos_top_k(
    A: Any,
    k: int = 5,
    *,
    which: Which = "LA",
    tol: float = 1e-5,
    max_steps: int = 300,
    restart_size: int | None = None,
    keep: int | None = None,
    seed: int = 0,
    dim: int | None = None,
    return_eigenvectors: bool = False,
    true_residuals: bool | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    start: torch.Tensor | None = None,
) -> EigenPairs:
    """The ``k`` wanted eigenpairs with at most ``restart_size`` basis vectors.

    Args:
        A: dense symmetric matrix, HessianOperator, or callable (with ``dim``).
        k: number of eigenpairs.
        which: "LA" (default), "SA" or "LM".
        tol: stop when the k wanted residuals are <= tol * max |theta|.
        max_steps: the most operator applications in all (restarts included).
        restart_size: basis vectors kept at most (default 2k + 10; > keep).
        keep: Ritz vectors kept at a restart (default k).
        seed, dim, return_eigenvectors, true_residuals, basis_dtype, basis_device, start:
            as in :func:`~sharpscope.curvature.lanczos.lanczos_top_k`.

    Returns:
        :class:`~sharpscope.curvature.lanczos.EigenPairs`; ``num_steps`` counts every step
        and ``restarts`` the thick restarts.

    >>> A = torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64))
    >>> pairs = thick_restart_lanczos_top_k(A, k=2, restart_size=8, tol=1e-10)
    >>> pairs.eigenvalues.round(decimals=8).tolist(), pairs.restarts > 0
    ([100.0, 99.0], True)
    """
    if which not in WHICH:
        raise SharpscopeError(f"unknown which='{which}'; choose one of {', '.join(WHICH)}")
    op = as_operator(A, dim)
    n = op.dim
    _check_k(k, n, max_steps, tol)
    keep = k if keep is None else int(keep)
    size = min(default_restart_size(k) if restart_size is None else int(restart_size), n)
    if size == n:  # a basis of every dimension never restarts: plain Lanczos, exact
        return lanczos_top_k(
            op,
            k,
            which=which,
            tol=tol,
            max_steps=max_steps,
            seed=seed,
            return_eigenvectors=return_eigenvectors,
            true_residuals=true_residuals,
            basis_dtype=basis_dtype,
            basis_device=basis_device,
            start=start,
        )
    if keep == k and size <= k:  # the default keep: name only what top_eigenvalues takes
        raise SharpscopeError(
            f"restart_size must be > k (thick restarts keep the k wanted Ritz vectors and "
            f"add at least one), got k={k}, restart_size={size}"
        )
    if not k <= keep < size:
        raise SharpscopeError(
            f"thick restarts need k <= keep < restart_size, got k={k}, keep={keep}, "
            f"restart_size={size}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    rounding = products_rounding(op)
    bdtype = basis_dtype if basis_dtype is not None else op.dtype
    bdev = torch.device(basis_device) if basis_device is not None else op.device
    V = empty_basis(size, n, bdtype, bdev)
    T = np.zeros((size, size))
    dropped = np.zeros(size)  # residual norms left out of T by restarts, per row

    q = random_vector(n, gen) if start is None else start.detach().to("cpu", F64).reshape(-1)
    q = q.to(op.device)
    q = q / torch.linalg.vector_norm(q)
    j = 0  # vectors in the basis
    steps = restarts = block_start = 0
    b = 0.0
    theta = S = idx = None
    searched = None  # eigenvalues of the block whose copy set off a search for more
    expected = None  # b of the step before, when V[j] = its w / b: then V[j-1]ᵀ A V[j] = b
    while True:
        V[j] = q.to(bdev, bdtype)
        v = V[j].to(op.device, F64)
        w = op.mv(v)
        steps += 1
        # the whole column V A v (two classical Gram-Schmidt passes, float64)
        h = basis_dot(V[: j + 1], w)
        check_finite_products(h[j])  # vᵀAv: before NaN reaches the symmetry check or LAPACK
        if expected is not None:
            scale = max(float(np.abs(T[:j, :j]).max()), abs(float(h[j])), expected)
            check_symmetric(
                float(h[j - 1]),
                expected,
                scale,
                (products_dtype(op), bdtype),
                symmetry_advice(op),
            )
        expected = None
        w = w - basis_combine_rows(V[: j + 1], h.unsqueeze(0), op.device)[0]
        h2 = basis_dot(V[: j + 1], w)
        w = w - basis_combine_rows(V[: j + 1], h2.unsqueeze(0), op.device)[0]
        column = (h + h2).cpu().numpy()
        T[: j + 1, j] = column
        T[j, : j + 1] = column
        b = float(torch.linalg.vector_norm(w))
        j += 1
        theta, S = np.linalg.eigh(T[:j, :j])
        idx = select(theta, min(k, j), which)
        verdict = top_k_verdict(
            theta,
            S,
            b,
            k,
            which,
            tol,
            block_start=block_start,
            block_eigh=lambda lo, hi: np.linalg.eigh(T[lo:hi, lo:hi]),
            rounding=rounding,
        )
        if verdict == RESTART:  # a copy search goes on from a fresh vector
            searched = np.linalg.eigvalsh(T[block_start:j, block_start:j])
        if verdict is True or steps >= max_steps or j >= n:
            break
        if verdict == RESTART:  # the block is invariant: continue in a fresh direction
            w = orthogonalize(random_vector(n, gen).to(op.device), V[:j])
            b_next = float(torch.linalg.vector_norm(w))
            if b_next < 1e-8 * np.sqrt(n):
                break
            dropped[j - 1] = b
            q, b = w / b_next, 0.0
            block_start = j  # T is block diagonal from here (the subspace was invariant)
        else:
            q, expected = w / b, b
        if j == size:  # thick restart: keep the wanted Ritz vectors and q
            wanted = select(theta, keep, which)
            in_block = (S[block_start:j] ** 2).sum(axis=0) > 0.5 if block_start else None
            if block_start and b != 0.0 and in_block.any():
                # a later block: its leading Ritz vector stays too
                lead = int(np.flatnonzero(in_block)[np.argmax(preference(theta[in_block], which))])
                if lead not in wanted and len(wanted) + 1 < size:
                    wanted = np.append(wanted, lead)
            # each kept Ritz vector lies in one block (T is block diagonal): the earlier
            # blocks' go first, so the current block stays the trailing one
            current = (S[block_start:j, wanted] ** 2).sum(axis=0) > 0.5
            wanted = np.concatenate([wanted[~current], wanted[current]])
            kept = len(wanted)
            block_start = kept if b == 0.0 else int((~current).sum()) if block_start else 0
            coeffs = torch.from_numpy(np.ascontiguousarray(S[:, wanted].T))
            V[:kept] = basis_combine_rows(V[:j], coeffs, bdev).to(bdtype)
            dropped[:kept] = dropped[:j] @ np.abs(S[:, wanted])  # their left-out residuals
            dropped[kept:] = 0.0
            T[:] = 0.0
            T[range(kept), range(kept)] = theta[wanted]
            # the next step's column V A q holds the coupling b * S[j - 1, wanted]
            j = kept
            restarts += 1
            expected = None  # V[j - 1] is now a kept Ritz vector

    assert theta is not None and S is not None and idx is not None
    pairs = ritz_pairs(
        op,
        theta,
        S,
        idx,
        residual_norm=b,
        dropped=dropped[:j],
        basis=V[:j],
        tol=tol,
        return_eigenvectors=return_eigenvectors,
        true_residuals=true_residuals,
        num_matvecs=steps,
        num_steps=steps,
        restarts=restarts,
    )
    if searched is not None and verdict is not True and steps >= max_steps and j < n:
        # m_max ended a copy search (at the RESTART or in a later block)
        pairs = unfinished_copy_search(pairs, theta, idx, searched, which, tol)
    return pairs
