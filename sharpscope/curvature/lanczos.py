"""Lanczos with full reorthogonalization, and top-k eigenpairs from it.

Spec: analysis.md section 2. The kernel :func:`lanczos` builds the tridiagonal
``T_m = Q_m^T A Q_m`` of a symmetric operator; :func:`lanczos_top_k` stops it when the
wanted Ritz pairs have converged; :func:`block_lanczos_top_k` is the block variant
used to check repeated eigenvalues, which a single start vector cannot see twice.

References:
    C. Lanczos (1950), J. Res. Nat. Bur. Standards 45, 255-282.
    B. N. Parlett, *The Symmetric Eigenvalue Problem* (1998), ch. 13 (full
    reorthogonalization, Ritz residuals ``beta_j |s_{j,i}|``).
    G. H. Golub and R. Underwood (1977), block Lanczos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from ..errors import SharpscopeError, check_numbers
from ._linear import (
    F64,
    as_operator,
    basis_combine_rows,
    check_finite_products,
    orthogonalize,
    random_vector,
)

Which = Literal["LA", "SA", "LM"]
WHICH = ("LA", "SA", "LM")

# beta_j below this fraction of |theta_1| means the Krylov space is exhausted (spec §2).
BREAKDOWN = 1e-10
F64_EPS = float(np.finfo(np.float64).eps)


def empty_basis(rows: int, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Room for ``rows`` Lanczos vectors of length ``n``, refused in one line where it
    cannot fit: more bytes than the host has free (a basis in host memory; ``torch.empty``
    would take them and the kernel end the process once they are written) or an
    allocation that fails (an accelerator)."""
    from ..device_memory import available_memory_bytes, free_memory_note, is_out_of_memory

    need = rows * n * dtype.itemsize
    advice = (
        f"the Lanczos basis of {rows} vectors of {n} parameters needs {need / 2**30:.3g} GiB "
        f"({str(dtype).replace('torch.', '')}, on {device})"
    )
    fix = (
        "take fewer Lanczos steps (--max-steps / max_steps for the top eigenvalues, "
        "--lanczos-steps / num_lanczos_steps for the density) or, for the top "
        "eigenvalues, thick restarts (--restart-size / restart_size)"
    )
    free = available_memory_bytes() if device.type == "cpu" else None
    if free is not None and need > free:
        raise SharpscopeError(
            f"{advice}, more than the {free / 2**30:.3g} GiB free{free_memory_note(free)}; {fix}"
        )
    try:
        return torch.empty((rows, n), dtype=dtype, device=device)
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        where = "" if device.type == "cpu" else ", or keep it in host memory (--basis-device cpu)"
        raise SharpscopeError(f"{advice}, which does not fit; {fix}{where}") from None


def check_symmetric(
    coupling: float,
    beta: float,
    scale: float,
    dtypes: tuple[torch.dtype, ...],
    advice: str | None = None,
) -> None:
    """A free symmetry check: ``coupling`` = uᵀAv must equal ``beta`` = vᵀAu, to 1e-8 of
    ``scale`` (about |θ_1| ‖u‖ ‖v‖) in float64, 1e-4 otherwise. In Lanczos, uᵀAv =
    q_{j-1}ᵀ A q_j comes from the product of step j and vᵀAu = β_{j-1} is the norm of
    step j-1; Hutch++ compares its two sketches.

    A Hessian is symmetric; products through an operation whose double backward (or
    forward-mode derivative) PyTorch gets wrong are not, and Lanczos would return
    "converged" values of a matrix that is not the Hessian
    (``torch.nn.utils.parametrizations.weight_norm``: λ1 14% low, trace 6x low).
    ``advice`` is the remedy the error names (:func:`symmetry_advice`; by default the
    other hvp_mode).

    >>> check_symmetric(2.0, 2.0 + 1e-12, 5.0, (torch.float64,))
    >>> check_symmetric(2.0, 2.1, 5.0, (torch.float32,))
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: the operator is not symmetric: uᵀHv = 2 but vᵀHu = 2.1, \
a difference of 0.02 of the scale 5 (tolerance 1e-4 in float32); for a Hessian, an operation \
in the model has a wrong second derivative in PyTorch (e.g. \
torch.nn.utils.parametrizations.weight_norm): try the other hvp_mode, or write that layer with \
plain tensor operations
    """
    rtol = 1e-8 if all(d == F64 for d in dtypes) else 1e-4
    if abs(coupling - beta) > rtol * scale:
        rounded = next((d for d in dtypes if d != F64), F64)
        raise SharpscopeError(
            f"the operator is not symmetric: uᵀHv = {coupling:.6g} but vᵀHu = {beta:.6g}, "
            f"a difference of {abs(coupling - beta) / scale:.2g} of the scale {scale:.3g} "
            f"(tolerance {f'{rtol:.0e}'.replace('e-0', 'e-')} in {str(rounded).removeprefix('torch.')}); for a Hessian, an "
            "operation in the model has a wrong second derivative in PyTorch (e.g. "
            "torch.nn.utils.parametrizations.weight_norm): "
            + (advice or "try the other hvp_mode, or write that layer with plain tensor operations")
        )


def products_dtype(op: Any) -> torch.dtype:
    """The precision ``op``'s products are computed in, for :func:`check_symmetric`."""
    return getattr(op, "products_dtype", None) or getattr(op, "dtype", F64)


def symmetry_advice(op: Any) -> str | None:
    """The remedy ``op`` offers for products that are not symmetric (a HessianOperator's
    names the other hvp_mode only when it was not already tried and rejected), for
    :func:`check_symmetric`; None: the generic one."""
    return getattr(op, "symmetry_advice", None)


def tridiagonal_eigh(alpha: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal (alpha, beta).

    A symmetric solver (LAPACK stemr through scipy), never a general one.

    >>> theta, S = tridiagonal_eigh(np.array([2.0, 2.0]), np.array([1.0]))
    >>> theta.round(12).tolist()
    [1.0, 3.0]
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    beta = np.asarray(beta, dtype=np.float64)
    if alpha.size == 1:
        return alpha.copy(), np.ones((1, 1))
    try:
        return scipy.linalg.eigh_tridiagonal(alpha, beta)
    except (np.linalg.LinAlgError, ValueError):
        T = np.diag(alpha) + np.diag(beta, 1) + np.diag(beta, -1)
        return np.linalg.eigh(T)


def select(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """Indices of the ``k`` wanted values of ``theta``, in descending algebraic order.

    >>> select(np.array([-7.0, 1.0, 3.0, 5.0]), 2, "LM").tolist()
    [3, 0]
    """
    if which not in WHICH:
        raise SharpscopeError(f"unknown which='{which}'; choose one of {', '.join(WHICH)}")
    idx = np.argsort(-preference(theta, which), kind="stable")[:k]
    return idx[np.argsort(-theta[idx], kind="stable")]


@dataclass(frozen=True)
class LanczosRun:
    """The output of :func:`lanczos`.

    Attributes:
        alpha: diagonal of T, ``(m,)``.
        beta: off-diagonal of T, ``(m-1,)``; zero where the run restarted.
        residual_norm: ``beta_m``, the norm of the last residual vector.
        basis: the Lanczos vectors as rows, ``(m, dim)``, or None.
        num_matvecs: operator applications.
        restarts: how often the Krylov space was exhausted and a fresh vector taken.
        exhausted: the run stopped because the Krylov space was exhausted.
        dropped: ``(m,)``, the residual norm left out of T at each row where a block
            ended in a restart (0 elsewhere); with it :func:`ritz_pairs` bounds the true
            Ritz residuals of that block and of the blocks after it.
    """

    alpha: np.ndarray
    beta: np.ndarray
    residual_norm: float
    basis: Tensor | None
    num_matvecs: int
    restarts: int = 0
    exhausted: bool = False
    dropped: np.ndarray | None = None

    @property
    def num_steps(self) -> int:
        """m, the size of T."""
        return int(self.alpha.size)

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Ritz values (ascending) and the eigenvectors ``S`` of T (columns)."""
        return tridiagonal_eigh(self.alpha, self.beta)


#: ``stop(alpha, beta, beta_j)`` after every step: True to stop, False to go on,
#: :data:`RESTART` to continue from a fresh vector (the current block is invariant).
StopRule = Callable[[np.ndarray, np.ndarray, float], "bool | str"]
RESTART = "restart"


def lanczos(
    A: Any,
    num_steps: int,
    *,
    dim: int | None = None,
    start: Tensor | None = None,
    seed: int = 0,
    generator: torch.Generator | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    restart: bool = True,
    locked: Tensor | None = None,
    stop: StopRule | None = None,
    return_basis: bool = True,
) -> LanczosRun:
    r"""Run the Lanczos process with full reorthogonalization.

    Step j: :math:`w = A q_j - \beta_{j-1} q_{j-1}`, :math:`\alpha_j = q_j^T w`,
    :math:`w \mathrel{-}= \alpha_j q_j`, then :math:`w` is reorthogonalized against all
    previous :math:`q`'s twice (classical Gram-Schmidt, float64 coefficients),
    :math:`\beta_j = \|w\|`, :math:`q_{j+1} = w/\beta_j`. Without the reorthogonalization
    converged Ritz values come back as "ghost" copies (analysis.md §2, Pitfalls).

    If :math:`\beta_j < 10^{-10} |\theta_1|` the Krylov space is exhausted: with
    ``restart`` a fresh random vector orthogonal to the basis continues the run
    (T becomes block diagonal); without, the run stops (exact Gauss quadrature for SLQ).
    A ``stop`` rule may also ask for that restart (returning :data:`RESTART`) when the
    block is invariant to its tolerance; the left-out :math:`\beta_j` is kept in
    ``dropped``.

    Args:
        A: symmetric operator (see :func:`~sharpscope.curvature._linear.as_operator`).
        num_steps: the most steps m (capped at the dimension).
        dim: vector length when ``A`` is a callable.
        start: start vector (normalized here); default a seeded Gaussian.
        seed: seed of the start and restart vectors (own generator).
        generator: use this generator instead of ``seed``.
        basis_dtype: storage dtype of the basis (default: the operator's). Scalars are
            float64 regardless.
        basis_device: where the basis lives (``"cpu"`` for models whose
            ``m x P`` basis does not fit on the accelerator).
        restart: restart on an exhausted Krylov space instead of stopping.
        locked: rows (orthonormal) to stay orthogonal to, e.g. deflated eigenvectors.
        stop: a :data:`StopRule`, called after every step.
        return_basis: keep the basis in the result.

    Returns:
        A :class:`LanczosRun`.

    >>> A = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    >>> run = lanczos(A, 5)
    >>> np.round(run.ritz()[0], 10).tolist()
    [1.0, 2.0, 3.0, 4.0, 5.0]
    """
    op = as_operator(A, dim)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    process = LanczosProcess(
        op,
        num_steps,
        start=start,
        generator=gen,
        basis_dtype=basis_dtype,
        basis_device=basis_device,
        restart=restart,
        locked=locked,
        stop=stop,
    )
    while not process.done:
        process.advance(op.mv(process.vector()))
    return process.result(return_basis)


class LanczosProcess:
    """One Lanczos run, advanced one product at a time (the body of :func:`lanczos`).

    ``vector()`` is the next basis vector :math:`q_j` (float64, on the operator's device);
    ``advance(w)`` takes :math:`w = A q_j` and does the rest of step j. Several processes
    can share block products (stochastic Lanczos quadrature runs its probes in lockstep).
    """

    def __init__(
        self,
        op: Any,
        num_steps: int,
        *,
        start: Tensor | None,
        generator: torch.Generator,
        basis_dtype: torch.dtype | None = None,
        basis_device: torch.device | str | None = None,
        restart: bool = True,
        locked: Tensor | None = None,
        stop: StopRule | None = None,
    ) -> None:
        n = op.dim
        self.n, self.device, self.gen = n, op.device, generator
        self.locked = None if locked is None else locked.to(op.device, F64)
        free = n - (0 if self.locked is None else self.locked.shape[0])
        self.m = min(int(num_steps), free)
        if self.m < 1:
            raise SharpscopeError(f"Lanczos needs at least one step, got num_steps={num_steps}")
        self.bdtype = basis_dtype if basis_dtype is not None else op.dtype
        self.dtypes = (products_dtype(op), self.bdtype)
        self.advice = symmetry_advice(op)
        self.bdev = torch.device(basis_device) if basis_device is not None else op.device
        self.Q = empty_basis(self.m, n, self.bdtype, self.bdev)
        self.restart, self.stop = restart, stop
        q = random_vector(n, generator) if start is None else start.detach().to("cpu", F64)
        q = q.reshape(-1).to(op.device)
        if self.locked is not None:
            q = orthogonalize(q, self.locked)
        self._store(0, q / torch.linalg.vector_norm(q))
        self.alpha: list[float] = []
        self.beta: list[float] = []
        self.beta_last = 0.0
        self.restarts = 0
        self.dropped = np.zeros(self.m)
        self.exhausted = False
        self.matvecs = 0
        self.done = False

    def _store(self, j: int, q: Tensor) -> None:
        self.Q[j] = q.to(self.bdev, self.bdtype)

    def vector(self) -> Tensor:
        """q_j as stored (possibly rounded): the stored vector defines T."""
        return self.Q[len(self.alpha)].to(self.device, F64)

    def advance(self, w: Tensor) -> None:
        """Step j given ``w = A q_j``: alpha_j, reorthogonalization, beta_j, q_{j+1}."""
        j = len(self.alpha)
        qj = self.vector()
        self.matvecs += 1
        a = float(qj @ w)
        check_finite_products(a)  # before NaN reaches the symmetry check or LAPACK
        w = w - a * qj
        if j > 0 and self.beta[-1] != 0.0:
            previous = self.Q[j - 1].to(self.device, F64)
            scale = max(abs(a), *np.abs(self.alpha), *self.beta)
            check_symmetric(float(previous @ w), self.beta[-1], scale, self.dtypes, self.advice)
            w = w - self.beta[-1] * previous
        w = orthogonalize(w, self.Q[: j + 1], self.locked)
        b = float(torch.linalg.vector_norm(w))
        self.alpha.append(a)
        self.beta_last = b
        verdict = False
        if self.stop is not None:
            verdict = self.stop(np.asarray(self.alpha), np.asarray(self.beta), b)
        if verdict is True:
            self.done = True
        elif j == self.m - 1:
            self.done = True
        elif verdict == RESTART or _exhausted(self.alpha, self.beta, b):
            if not self.restart:
                self.exhausted = self.done = True
                return
            fresh = random_vector(self.n, self.gen).to(self.device)
            fresh = orthogonalize(fresh, self.Q[: j + 1], self.locked)
            norm = float(torch.linalg.vector_norm(fresh))
            if norm < 1e-8 * np.sqrt(self.n):  # nothing left to explore
                self.exhausted = self.done = True
                return
            self.restarts += 1
            self.dropped[j] = b
            self.beta.append(0.0)
            self._store(j + 1, fresh / norm)
        else:
            self.beta.append(b)
            self._store(j + 1, w / b)

    def result(self, return_basis: bool = True) -> LanczosRun:
        used = len(self.alpha)
        return LanczosRun(
            alpha=np.asarray(self.alpha),
            beta=np.asarray(self.beta[: used - 1]),
            residual_norm=self.beta_last,
            basis=self.Q[:used] if return_basis else None,
            num_matvecs=self.matvecs,
            restarts=self.restarts,
            exhausted=self.exhausted,
            dropped=self.dropped[:used].copy(),
        )


def _exhausted(alpha: list[float], beta: list[float], b: float) -> bool:
    """Whether ``b`` is below 1e-10 |theta_1| of the current T."""
    a = np.abs(np.asarray(alpha))
    bound = float(a.max() + 2 * (max(beta) if beta else 0.0))  # Gershgorin >= |theta_1|
    if b > BREAKDOWN * bound:
        return False
    theta, _ = tridiagonal_eigh(np.asarray(alpha), np.asarray(beta))
    return b <= BREAKDOWN * max(float(np.abs(theta).max()), np.finfo(float).tiny)


@dataclass(frozen=True)
class EigenPairs:
    """Wanted eigenpairs of a symmetric operator (descending eigenvalues).

    Attributes:
        eigenvalues: ``(k,)`` float64, descending.
        residuals: Ritz residual estimates ``beta_m |s_{m,i}|`` (``||B_m S_i||`` for blocks).
        converged: residual <= tol * max |theta|.
        num_matvecs: operator applications, including the true-residual checks.
        num_steps: Lanczos steps taken.
        eigenvectors: ``(k, dim)`` float64 Ritz vectors, or None.
        true_residuals: ``||A y - theta y||`` of the Ritz vectors, or None.
        restarts: Krylov restarts.
    """

    eigenvalues: Tensor
    residuals: Tensor
    converged: list[bool]
    num_matvecs: int
    num_steps: int
    eigenvectors: Tensor | None = None
    true_residuals: Tensor | None = None
    restarts: int = 0


def preference(theta: np.ndarray, which: str) -> np.ndarray:
    """How wanted each value is (larger: more), the order :func:`select` takes."""
    return {"LA": theta, "SA": -theta, "LM": np.abs(theta)}[which]


def top_k_verdict(
    theta: np.ndarray,
    S: np.ndarray,
    b: float,
    k: int,
    which: str,
    tol: float,
    *,
    block_start: int = 0,
    block_eigh: Callable[[int, int], tuple[np.ndarray, np.ndarray]] | None = None,
    rounding: float = F64_EPS,
) -> bool | str:
    r"""The stop rule of the top-k runs: True (stop), False (go on) or :data:`RESTART`.

    ``theta, S``: eigenpairs of the projected matrix (j x j); ``b``: the newest residual
    norm; ``block_start``: the first row of the current Krylov block (0 before any
    restart; the projected matrix is block diagonal across restarts); ``block_eigh(lo,
    hi)``: the eigenpairs of its diagonal block ``[lo, hi)``; ``rounding``: the machine
    epsilon of the products (:func:`products_rounding`).

    The k wanted Ritz residuals :math:`b |s_{j,i}|` must be :math:`\le` ``tol``
    :math:`\max|\theta|` (analysis.md §2). But one Krylov block holds one copy of each
    eigenvalue, and once it is invariant (:math:`b <` 1e-10 :math:`|\theta_1|`, or to the
    tolerance: :math:`b \le` ``tol`` :math:`\max|\theta|`, so that every Ritz pair of the
    block has converged) its residuals prove nothing about copies outside it, so the run
    restarts from a fresh vector (spec §2: "restart"); the :math:`b` left out is then at
    most the tolerance, and is kept in the reported residuals (:func:`ritz_pairs`). And:

    * a later block ends when it is invariant, or when the k wanted values and its own
      most wanted value have converged (the earlier blocks' values have no residual
      there). If it holds a value wanted more than the k-th (another copy), the run
      restarts to look for more copies (a block holds one copy of each eigenvalue);
      else it stops (an invariant block holds every distinct eigenvalue of the space
      it started in: a random start has a component in each eigenspace).
    * the first block's Ritz values are distinct (T is unreduced), so when its k wanted
      values have converged with two of them equal to rounding (:func:`_has_copies`),
      rounding went on from an exhausted space that :math:`b` did not show (float32
      products: :math:`b \approx` 1e-4 :math:`|\theta_1|` there, where float64 shows
      1e-10) and the copies found are as many as chance gave: the run restarts to
      search for copies as above. Distinct values never set this off, at no cost.
    """
    j = theta.size
    scale = max(float(np.abs(theta).max()), np.finfo(float).tiny)
    threshold = tol * scale
    later = block_start > 0
    assert block_eigh is not None or not later
    current, vectors = block_eigh(block_start, j) if later else (theta, S)
    invariant = b <= max(BREAKDOWN * scale, threshold)
    if j < k:
        return RESTART if invariant else False
    if not later:
        if invariant:
            return RESTART
        if not _converged(theta, S, b, k, which, threshold):
            return False
        copies = _has_copies(theta[select(theta, k, which)], scale, tol, rounding)
        return RESTART if copies else True
    wanted_by = preference(current, which)
    kth = float(preference(theta[select(theta, k, which)], which).min())
    adds = bool(np.any(wanted_by > kth + threshold))  # another copy of a wanted value
    if invariant:
        return RESTART if adds else True
    best = int(np.argmax(wanted_by))  # the earlier blocks' values have no residual here
    if b * abs(vectors[-1, best]) > threshold:
        return False
    if not _converged(theta, S, b, k, which, threshold):
        return False
    return RESTART if adds else True


def _has_copies(values: np.ndarray, scale: float, tol: float, rounding: float) -> bool:
    """Whether two converged Ritz values are copies of one eigenvalue: equal to within
    2·scale·(tol² + 100·rounding), the error of a Ritz value whose residual is tol·scale
    (about residual²/gap, the gap taken as scale) plus the products' rounding. Copies
    that rounding found agree far closer (float32 products: 1e-8 of scale); distinct
    eigenvalues (a bulk narrower than the tolerance) that close are as good as copies.

    >>> eps32 = float(np.finfo(np.float32).eps)
    >>> _has_copies(np.array([5.0, 5.0 + 1e-7, 2.0]), 5.0, 1e-5, eps32)
    True
    >>> _has_copies(np.array([5.0, 5.0 - 1e-3, 2.0]), 5.0, 1e-5, eps32)
    False
    """
    window = 2 * scale * (tol * tol + 100 * rounding)
    return bool(np.any(np.diff(np.sort(values)) <= window))


def products_rounding(op: Any) -> float:
    """The machine epsilon of ``op``'s products (:func:`products_dtype`)."""
    return float(torch.finfo(products_dtype(op)).eps)


def _converged(
    theta: np.ndarray,
    S: np.ndarray,
    b: float,
    k: int,
    which: str,
    threshold: float,
) -> bool:
    """Whether the k wanted Ritz residuals ``b |S[-1, i]|`` are <= threshold."""
    return bool(np.all(b * np.abs(S[-1, select(theta, k, which)]) <= threshold))


def check_tol(tol: float) -> None:
    """Refuse a residual tolerance that is not in (0, 1).

    >>> check_tol(float("inf"))
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: tol must be < 1 (Ritz residuals relative to the \
largest |Ritz value|; default 1e-5), got inf
    """
    check_numbers(tol=tol)  # "1e-3" is one line
    if not tol > 0:  # also NaN: every residual test would be False, silently
        raise SharpscopeError(f"tol must be a number > 0, got {tol}")
    if not tol < 1:  # tol=inf flagged the first Ritz value converged (5% of λ1)
        raise SharpscopeError(
            "tol must be < 1 (Ritz residuals relative to the largest |Ritz value|; default "
            f"1e-5), got {tol}"
        )


def _check_k(k: int, n: int, max_steps: int, tol: float = 1e-5) -> None:
    check_tol(tol)
    if k < 1:
        raise SharpscopeError(f"k must be >= 1, got {k}")
    if k > n:
        raise SharpscopeError(f"k={k} is larger than the number of parameters ({n}); use k <= {n}")
    if max_steps < k:
        raise SharpscopeError(f"max_steps={max_steps} must be >= k={k}")


def lanczos_top_k(
    A: Any,
    k: int = 5,
    *,
    which: Which = "LA",
    tol: float = 1e-5,
    max_steps: int = 100,
    seed: int = 0,
    dim: int | None = None,
    return_eigenvectors: bool = False,
    true_residuals: bool | None = None,
    basis_dtype: torch.dtype | None = None,
    basis_device: torch.device | str | None = None,
    start: Tensor | None = None,
) -> EigenPairs:
    r"""The ``k`` wanted eigenvalues of a symmetric operator by Lanczos (analysis.md §2).

    After every step :math:`j \ge k` the tridiagonal :math:`T_j = S \Theta S^T` gives Ritz
    values :math:`\theta_i` with residuals :math:`\beta_j |s_{j,i}|`; the run stops when the
    ``k`` wanted residuals are :math:`\le` ``tol`` :math:`\cdot \max_i |\theta_i|`, or at
    ``max_steps`` (capped at the dimension; a full run is exact). Unconverged pairs are
    flagged, never hidden. A single start vector finds one copy of an exactly repeated
    eigenvalue. When its Krylov space runs out (few distinct eigenvalues: a small or
    Kronecker-structured Hessian) the run restarts from fresh vectors until they add no
    wanted copy (:func:`top_k_verdict`); beside a bulk of distinct eigenvalues that does
    not happen, so use :func:`block_lanczos_top_k` to check multiplicities.

    Args:
        A: dense symmetric matrix, HessianOperator, or callable (with ``dim``).
        k: number of eigenpairs (default 5: λ1..λ5 for the SAM paper's λmax/λ5).
        which: "LA" largest algebraic (default), "SA" most negative, "LM" largest |λ|.
        tol: relative residual tolerance; 1e-5 default (fp32 HVPs have a noise floor
            near 1e-6 λ1), 1e-8 for float64 validation.
        max_steps: the most Lanczos steps m_max (default 100).
        seed: seed of the Gaussian start vector.
        dim: vector length when ``A`` is a callable.
        return_eigenvectors: also return the Ritz vectors ``Q^T s_i``.
        true_residuals: compute ``||A y - θ y||`` (k extra products; default: with
            eigenvectors).
        basis_dtype, basis_device: storage of the basis (see :func:`lanczos`).
        start: start vector instead of a seeded Gaussian.

    Returns:
        :class:`EigenPairs` with eigenvalues in descending order.

    Raises:
        SharpscopeError: k < 1, k > dim, max_steps < k or an unknown ``which``.

    >>> A = torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64))
    >>> round(lanczos_top_k(A, k=1).eigenvalues.item(), 8)
    3.0
    """
    if which not in WHICH:
        raise SharpscopeError(f"unknown which='{which}'; choose one of {', '.join(WHICH)}")
    op = as_operator(A, dim)
    _check_k(k, op.dim, max_steps, tol)

    last: list[bool | str] = [False]
    searched: list[np.ndarray | None] = [None]  # the block whose copy set off the search
    rounding = products_rounding(op)

    def stop(alpha: np.ndarray, beta: np.ndarray, b: float) -> bool | str:
        restarted = np.flatnonzero(beta == 0.0)  # a restart couples the blocks by 0
        lo = int(restarted[-1]) + 1 if restarted.size else 0
        last[0] = top_k_verdict(
            *tridiagonal_eigh(alpha, beta),
            b,
            k,
            which,
            tol,
            block_start=lo,
            block_eigh=lambda lo, hi: tridiagonal_eigh(alpha[lo:hi], beta[lo : hi - 1]),
            rounding=rounding,
        )
        if last[0] == RESTART:
            searched[0] = tridiagonal_eigh(alpha[lo:], beta[lo:])[0]
        return last[0]

    run = lanczos(
        op,
        max_steps,
        seed=seed,
        basis_dtype=basis_dtype,
        basis_device=basis_device,
        stop=stop,
        start=start,
        return_basis=return_eigenvectors,
    )
    theta, S = run.ritz()
    idx = select(theta, k, which)
    pairs = ritz_pairs(
        op,
        theta,
        S,
        idx,
        residual_norm=run.residual_norm,
        dropped=run.dropped,
        basis=run.basis,
        tol=tol,
        return_eigenvectors=return_eigenvectors,
        true_residuals=true_residuals,
        num_matvecs=run.num_matvecs,
        num_steps=run.num_steps,
        restarts=run.restarts,
    )
    # max_steps ended the run during a search for copies: at the RESTART or in a later
    # block that had not yet finished
    if (
        searched[0] is not None
        and last[0] is not True
        and not run.exhausted
        and run.num_steps < op.dim
    ):
        pairs = unfinished_copy_search(pairs, theta, idx, searched[0], which, tol)
    return pairs


def unfinished_copy_search(
    pairs: EigenPairs,
    theta: np.ndarray,
    idx: np.ndarray,
    block: np.ndarray,
    which: str,
    tol: float,
) -> EigenPairs:
    """Flags for a run that m_max ended while it still looked for copies.

    The last Krylov block was invariant and its most wanted value ``max(block)`` was
    wanted more than the k-th (the verdict was RESTART): a further copy of it would
    displace every wanted value below it, so those are not certainly among the k wanted
    ones and are flagged unconverged, however small their residuals.
    """
    top = float(preference(block, which).max())
    scale = max(float(np.abs(theta).max()), np.finfo(float).tiny)
    wanted = preference(theta[idx], which)
    flags = [c and bool(v >= top - tol * scale) for c, v in zip(pairs.converged, wanted)]
    return dataclasses.replace(pairs, converged=flags)


def ritz_pairs(
    op: Any,
    theta: np.ndarray,
    S: np.ndarray,
    idx: np.ndarray,
    *,
    residual_norm: float,
    basis: Tensor | None,
    tol: float,
    dropped: np.ndarray | None = None,
    return_eigenvectors: bool,
    true_residuals: bool | None,
    num_matvecs: int,
    num_steps: int,
    restarts: int,
) -> EigenPairs:
    """The wanted Ritz pairs ``idx`` of a projected matrix ``S diag(theta) S^T``.

    Residual estimates ``residual_norm * |S[-1, i]|`` (only the last basis vector's image
    leaves the basis) plus, for each row j where a block ended in a restart, ``dropped[j] *
    ||S[j:, i]||``: the residual r = dropped[j]·q̃ left out there is orthogonal to q_j, and its
    part inside the later blocks couples them to q_j (QᵀAQ - T has the entries
    dropped[j]·(q̃ᵀq_l) in row j), so ``A Q s - θ Q s`` gains dropped[j]·(s_j q̃ + (q̃ᵀQ s) q_j),
    of norm at most dropped[j]·||s[j:]||. With ``return_eigenvectors`` the Ritz vectors
    ``basis^T S[:, i]`` and, unless ``true_residuals`` is False, ``||A y - theta y||``
    (len(idx) products).
    """
    scale = max(float(np.abs(theta).max()), np.finfo(float).tiny)
    residuals = residual_norm * np.abs(S[-1, idx])
    if dropped is not None and dropped.any():
        tails = np.sqrt(np.cumsum(S[::-1, idx] ** 2, axis=0)[::-1])  # ||S[j:, i]|| per row j
        residuals = residuals + dropped @ tails
    vectors = true_res = None
    if return_eigenvectors:
        assert basis is not None
        coeffs = torch.from_numpy(np.ascontiguousarray(S[:, idx].T))
        vectors = basis_combine_rows(basis, coeffs, torch.device("cpu"))
        if true_residuals is None or true_residuals:
            AY = op.mm(vectors.to(op.dtype)).cpu()
            num_matvecs += len(idx)
            lam = torch.from_numpy(theta[idx]).unsqueeze(1)
            true_res = torch.linalg.vector_norm(AY - lam * vectors, dim=1)
    return EigenPairs(
        eigenvalues=torch.from_numpy(theta[idx].copy()),
        residuals=torch.from_numpy(residuals),
        converged=[bool(r <= tol * scale) for r in residuals],
        num_matvecs=num_matvecs,
        num_steps=num_steps,
        eigenvectors=vectors,
        true_residuals=true_res,
        restarts=restarts,
    )


def _orthonormal_rows(W: Tensor, *bases: Tensor | None, gen: torch.Generator) -> Tensor:
    """Orthonormalize the rows of ``W`` against ``bases`` and each other.

    Rows that vanish (rank deficiency) are replaced by fresh random directions.
    """
    W = torch.stack([orthogonalize(w, *bases) for w in W])
    Qt, R = torch.linalg.qr(W.T)
    rows = Qt.T.contiguous()
    scale = max(float(torch.abs(torch.diagonal(R)).max()), 1e-300)
    for i in range(rows.shape[0]):
        if abs(float(R[i, i])) < 1e-10 * scale:
            fresh = random_vector(W.shape[1], gen).to(W.device)
            fresh = orthogonalize(fresh, *bases, rows[:i])
            rows[i] = fresh / torch.linalg.vector_norm(fresh)
    return rows


def block_lanczos_top_k(
    A: Any,
    k: int = 5,
    *,
    block_size: int = 2,
    which: Which = "LA",
    tol: float = 1e-5,
    max_steps: int = 100,
    seed: int = 0,
    dim: int | None = None,
) -> EigenPairs:
    r"""Block Lanczos with full reorthogonalization (Golub and Underwood, 1977).

    With a block of ``b`` start vectors the Krylov space holds ``b`` directions of every
    eigenspace, so an eigenvalue of multiplicity up to ``b`` is found with its
    multiplicity. :math:`A V_j = V_{j-1} B_{j-1}^T + V_j A_j + V_{j+1} B_j`; the band
    matrix T is solved densely. The residual block :math:`W_j` (:math:`A V_j` minus its
    projection on the basis) gives Ritz pair i the residual :math:`\|W_j^T S_{j,i}\|`;
    :math:`V_{j+1}` spans the directions of :math:`W_j` above 1e-10 :math:`|\theta_1|`
    (its singular vectors; fresh random directions for the rest) and
    :math:`B_j = V_{j+1} W_j^T`. Products go through the operator's block (vmapped) path.
    Meant for checks.

    The run never returns fewer than ``k`` values: the last block is as large as the
    budget ``min(max_steps, P)`` leaves (its best-aligned directions of :math:`W_j`; the
    part of :math:`W_j` left out, :math:`E`, is kept in the residuals as
    :math:`\|E\|\,\|S_{j:,i}\|`, which bounds what it couples to the rows from block j
    on). When the block Krylov space is invariant (:math:`\|W_j\| \le`
    ``tol`` :math:`\max|\theta|`, or 1e-10 of it) it holds at most ``b`` copies of each
    eigenvalue, so, as in :func:`top_k_verdict`, the run continues from a fresh block
    coupled by 0 (the left-out :math:`\|W_j\|` kept as above) and stops only when a
    fresh block's invariant space (or its converged most wanted value) adds no value
    wanted more than the k-th; when the budget ends that search, the values a further
    copy would displace are flagged unconverged (:func:`unfinished_copy_search`).

    Args:
        A: dense symmetric matrix, HessianOperator, or callable (with ``dim``).
        k: number of eigenpairs.
        block_size: vectors per block ``b``.
        which, tol, seed, dim: as in :func:`lanczos_top_k`.
        max_steps: the most operator applications (the first block is whole even when
            ``b`` > ``max_steps``).

    Returns:
        :class:`EigenPairs` (no eigenvectors), k of them.

    >>> A = torch.diag(torch.tensor([5.0, 5.0, 3.0, 1.0, 0.5, 0.2], dtype=torch.float64))
    >>> block_lanczos_top_k(A, k=3, block_size=2).eigenvalues.round(decimals=8).tolist()
    [5.0, 5.0, 3.0]
    >>> A = torch.diag(torch.arange(7.0, 0.0, -1.0, dtype=torch.float64))
    >>> block_lanczos_top_k(A, k=7, block_size=2).eigenvalues.round(decimals=8).tolist()
    [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    """
    if which not in WHICH:
        raise SharpscopeError(f"unknown which='{which}'; choose one of {', '.join(WHICH)}")
    op = as_operator(A, dim)
    n = op.dim
    _check_k(k, n, max_steps, tol)
    b = int(block_size)
    if b < 1:
        raise SharpscopeError(f"block_size must be >= 1, got {block_size}")
    if b > n:
        raise SharpscopeError(
            f"block_size {b} is larger than the number of parameters ({n}); use block_size <= {n}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    limit = max(min(int(max_steps), n), b)  # products; the first block is whole
    blocks: list[Tensor] = [_orthonormal_rows(random_vector(n, gen, rows=b).to(op.device), gen=gen)]
    diag: list[np.ndarray] = []
    off: list[np.ndarray] = []  # off[j] = T[block j+1, block j]; zeros after a restart
    drops: list[tuple[int, float]] = []  # (first row of a block, norm left out of T there)
    seg_start = 0  # first row of the current Krylov segment (T is block diagonal across)
    searched: np.ndarray | None = None  # the segment whose copies set off the search
    verdict: bool | str = False
    size = matvecs = 0
    while True:
        V = blocks[-1]
        s = V.shape[0]
        W = op.mm(V)
        matvecs += s
        Aj = V @ W.T
        check_finite_products(Aj)
        Aj = 0.5 * (Aj + Aj.T)
        W = W - Aj @ V
        if off:
            W = W - torch.from_numpy(off[-1]).to(W.device) @ blocks[-2]
        basis = torch.cat(blocks)
        W = torch.stack([orthogonalize(w, basis) for w in W])
        diag.append(Aj.cpu().numpy())
        size += s
        T = _band_matrix(diag, off)
        theta, S = np.linalg.eigh(T)
        scale = max(float(np.abs(theta).max()), np.finfo(float).tiny)
        threshold = tol * scale
        G = (W @ W.T).cpu().numpy()  # the residual block's Gram matrix
        idx = select(theta, min(k, size), which)
        residuals = _block_residuals(S, idx, G, drops)
        U, sigma, _ = torch.linalg.svd(W.T, full_matrices=False)
        sigma = sigma.cpu().numpy()
        norm = float(sigma.max()) if sigma.size else 0.0
        invariant = norm <= max(BREAKDOWN * scale, threshold)
        segment, seg_S = np.linalg.eigh(T[seg_start:, seg_start:])
        verdict = _block_verdict(
            theta, idx, residuals, segment, seg_S, G, seg_start, k, which, threshold, invariant
        )
        if verdict is True or size >= n:
            verdict = True  # the whole space: T is similar to A
            break
        if verdict == RESTART:
            searched = segment
        left = limit - size
        if left <= 0:
            break
        m = min(b, left)
        if verdict == RESTART:
            if norm > 0.0:
                drops.append((size - s, norm))
            fresh = random_vector(n, gen, rows=m).to(op.device)
            off.append(np.zeros((m, s)))
            blocks.append(_orthonormal_rows(fresh, basis, gen=gen))
            seg_start = size
            continue
        kept = U[:, : min(m, int(np.sum(sigma > BREAKDOWN * scale)))].T
        if kept.shape[0] < m:  # exhausted directions: fresh ones (coupled by ~0)
            fresh = random_vector(n, gen, rows=m - kept.shape[0]).to(op.device)
            kept = torch.cat([kept, _orthonormal_rows(fresh, basis, kept, gen=gen)])
        Vnext = kept.contiguous()
        B = Vnext @ W.T  # T[block j+1, block j] = V_{j+1} A V_j^T
        left_out = float(torch.linalg.matrix_norm(W - B.T @ Vnext, ord=2))
        if left_out > BREAKDOWN * scale:  # the budget cut the block short
            drops.append((size - s, left_out))
        off.append(B.cpu().numpy())
        blocks.append(Vnext)
    pairs = EigenPairs(
        eigenvalues=torch.from_numpy(theta[idx].copy()),
        residuals=torch.from_numpy(residuals),
        converged=[bool(r <= tol * scale) for r in residuals],
        num_matvecs=matvecs,
        num_steps=size,
    )
    if searched is not None and verdict is not True:  # the budget ended a search for copies
        pairs = unfinished_copy_search(pairs, theta, idx, searched, which, tol)
    return pairs


def _band_matrix(diag: list[np.ndarray], off: list[np.ndarray]) -> np.ndarray:
    """The symmetric block-tridiagonal T of diagonal blocks ``diag`` and sub-diagonal
    blocks ``off`` (``off[j]`` couples block j+1 to block j), blocks of any sizes."""
    starts = np.cumsum([0] + [len(D) for D in diag])
    T = np.zeros((starts[-1], starts[-1]))
    for i, D in enumerate(diag):
        T[starts[i] : starts[i + 1], starts[i] : starts[i + 1]] = D
    for i, B in enumerate(off[: len(diag) - 1]):
        T[starts[i + 1] : starts[i + 2], starts[i] : starts[i + 1]] = B
        T[starts[i] : starts[i + 1], starts[i + 1] : starts[i + 2]] = B.T
    return T


def _block_residuals(
    S: np.ndarray, idx: np.ndarray, G: np.ndarray, drops: list[tuple[int, float]]
) -> np.ndarray:
    r"""Ritz residuals of block Lanczos: :math:`\|W^T S_{last,i}\| = \sqrt{s^T G s}` of
    the last block's rows (G = W Wᵀ), plus :math:`\|E\|\,\|S_{r:,i}\|` for each residual
    E left out of T at a block starting at row r (a restart or a cut-short block)."""
    last = S[-len(G) :, idx]
    residuals = np.sqrt(np.maximum(np.einsum("ri,rq,qi->i", last, G, last), 0.0))
    for row, norm in drops:
        residuals = residuals + norm * np.linalg.norm(S[row:, idx], axis=0)
    return residuals


def _block_verdict(
    theta: np.ndarray,
    idx: np.ndarray,
    residuals: np.ndarray,
    segment: np.ndarray,
    seg_S: np.ndarray,
    G: np.ndarray,
    seg_start: int,
    k: int,
    which: str,
    threshold: float,
    invariant: bool,
) -> bool | str:
    """:func:`top_k_verdict` for block Lanczos: True (stop), False (go on) or
    :data:`RESTART` (a fresh block, coupled by 0). ``segment``, ``seg_S``: the Ritz pairs
    of the current segment (T's diagonal block from row ``seg_start``); ``G``: the Gram
    matrix of the residual block."""
    size = theta.size
    if size < k:
        return RESTART if invariant else False
    converged = bool(np.all(residuals <= threshold))
    if seg_start == 0:  # an invariant first segment proves nothing about further copies
        return RESTART if invariant else converged
    kth = float(preference(theta[idx], which).min())
    wanted = preference(segment, which)
    adds = bool(np.any(wanted > kth + threshold))  # another copy of a wanted value
    if invariant:
        return RESTART if adds else True
    # the segment's most wanted Ritz value must have converged too (the earlier
    # segments' values have no residual here)
    last = seg_S[-len(G) :, int(np.argmax(wanted))]
    if float(np.sqrt(max(last @ G @ last, 0.0))) > threshold or not converged:
        return False
    return RESTART if adds else True
