"""Symmetric linear operators for the Krylov kernels, and fp64 basis arithmetic.

The kernels (Lanczos, Hutch++, SLQ, power iteration) work on anything that maps a
vector of length ``dim`` to another: a dense symmetric matrix (tensor or array), a
:class:`~sharpscope.curvature.operator.HessianOperator`, or a plain callable. They
see it through :class:`LinearOperator`, whose products are always float64.

Krylov scalars are float64 (analysis.md section 0) even when the stored basis is
float32: :func:`basis_dot` and :func:`basis_combine` upcast the basis in column
chunks, so no float64 copy of the whole basis is ever made.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import SharpscopeError

F64 = torch.float64

# Column chunk of the basis upcast at once: rows * CHUNK * 8 bytes stays ~ 128 MB.
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LinearOperator:
    """A symmetric operator ``v -> A v`` on R^dim, with float64 products.

    Attributes:
        dim: size of the vectors.
        matvec: ``(dim,) -> (dim,)``.
        matmat: ``(s, dim) -> (s, dim)``, row i being ``A V[i]``.
        dtype: dtype the vectors are stored in (basis and probes).
        device: where products are computed.
        products_dtype: the precision A's products are computed in, where it differs
            from ``dtype`` or is unknown (a callable: taken as float32), for the
            symmetry check's tolerance.
        symmetry_advice: the remedy the symmetry check names when the products are not
            symmetric (a HessianOperator's; None: the generic one).
    """

    dim: int
    matvec: Callable[[Tensor], Tensor]
    matmat: Callable[[Tensor], Tensor]
    dtype: torch.dtype = F64
    device: torch.device = torch.device("cpu")
    num_matvecs: int = 0
    products_dtype: torch.dtype | None = None
    symmetry_advice: str | None = None

    def mv(self, v: Tensor) -> Tensor:
        """``A v`` in float64 on :attr:`device`; counted."""
        self.num_matvecs += 1
        return self.matvec(v.to(self.device)).to(F64)

    def mm(self, rows: Tensor) -> Tensor:
        """``A`` applied to every row of ``rows`` (``(s, dim)``), float64; counted."""
        self.num_matvecs += rows.shape[0]
        return self.matmat(rows.to(self.device)).to(F64)


NON_FINITE_PRODUCT = (
    "a Hessian-vector product is not finite (inf or NaN) although the loss and gradient are: "
    "the model's second derivative is infinite or undefined at these weights (e.g. torch.sqrt, "
    "x ** p with p < 2, or torch.cdist at 0); move the weights off that point or smooth the "
    "operation (e.g. torch.sqrt(x + 1e-12))"
)


def check_finite_products(*values: Any) -> None:
    """Refuse a non-finite product, seen through the scalars a kernel computes from it anyway.

    A product's dot product with a start, probe or basis vector (Lanczos' α, a probe's
    vᵀAv, Hutch++'s sketch) is finite exactly when the product is (a vector with no zero
    entries, times inf or NaN anywhere, gives inf or NaN), so checking those scalars
    costs nothing. Left unchecked, NaN reaches LAPACK (a numpy ``LinAlgError``) or a
    trace estimate (NaN, silently).

    >>> check_finite_products(1.0, np.array([2.0, 3.0]))
    >>> check_finite_products(float("nan"))
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: a Hessian-vector product is not finite (inf or NaN) \
although the loss and gradient are: the model's second derivative is infinite or undefined at \
these weights (e.g. torch.sqrt, x ** p with p < 2, or torch.cdist at 0); move the weights off \
that point or smooth the operation (e.g. torch.sqrt(x + 1e-12))
    """
    for value in values:
        finite = (
            bool(torch.isfinite(value).all())
            if isinstance(value, Tensor)
            else bool(np.all(np.isfinite(value)))
        )
        if not finite:
            raise SharpscopeError(NON_FINITE_PRODUCT)


def as_operator(A: Any, dim: int | None = None) -> LinearOperator:
    """Wrap ``A`` as a :class:`LinearOperator`.

    Args:
        A: a square symmetric tensor or array, an object with ``hvp``/``hvp_block``
            and ``dim`` (a HessianOperator), a :class:`LinearOperator`, or a callable
            ``v -> A v`` (then ``dim`` is required).
        dim: size of the vectors when ``A`` is a callable.

    Raises:
        SharpscopeError: for a non-square matrix or a callable without ``dim``.
    """
    if isinstance(A, LinearOperator):  # a fresh count, every other field as it is
        return dataclasses.replace(A, num_matvecs=0)
    if hasattr(A, "hvp") and hasattr(A, "hvp_block") and hasattr(A, "dim"):
        return LinearOperator(
            int(A.dim),
            A.hvp,
            A.hvp_block,
            A.dtype,
            A.device,
            products_dtype=getattr(A, "products_dtype", None),  # a mixed-dtype model's
            symmetry_advice=getattr(A, "symmetry_advice", None),
        )
    if isinstance(A, np.ndarray):
        A = torch.from_numpy(A)
    if isinstance(A, Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise SharpscopeError(f"expected a square matrix, got shape {tuple(A.shape)}")
        dense = A.to(F64) if not A.is_floating_point() else A
        return LinearOperator(
            int(A.shape[0]),
            lambda v: dense @ v.to(dense.dtype),
            lambda V: V.to(dense.dtype) @ dense,  # A symmetric: (A V^T)^T = V A
            dense.dtype,
            dense.device,
        )
    if callable(A):
        if dim is None:
            raise SharpscopeError("a matvec callable needs dim= (the length of its vectors)")
        fn = A
        return LinearOperator(
            int(dim),
            fn,
            lambda V: torch.stack([fn(v) for v in V]) if len(V) else V.clone(),
            F64,
            torch.device("cpu"),
            products_dtype=torch.float32,  # its precision is unknown: not held to float64's
        )
    raise SharpscopeError(f"cannot use {type(A).__name__} as a linear operator")


def _chunks(rows: int, dim: int) -> range:
    step = max(1, _CHUNK_ELEMENTS // max(rows, 1))
    return range(0, dim, step) if dim else range(0)


def basis_dot(Q: Tensor, w: Tensor) -> Tensor:
    """``Q @ w`` in float64 for a basis ``Q`` (rows) of any dtype or device.

    ``w`` is float64; the result is on ``w``'s device.
    """
    if Q.shape[0] == 0:
        return torch.zeros(0, dtype=F64, device=w.device)
    if Q.dtype == F64 and Q.device == w.device:
        return Q @ w
    out = torch.zeros(Q.shape[0], dtype=F64, device=Q.device)
    wq = w.to(Q.device)
    step = _chunks(Q.shape[0], Q.shape[1]).step
    for start in range(0, Q.shape[1], step):
        out += Q[:, start : start + step].to(F64) @ wq[start : start + step]
    return out.to(w.device)


def basis_combine(Q: Tensor, c: Tensor, device: torch.device | None = None) -> Tensor:
    """``Q^T c`` in float64 (a combination of the basis rows), on ``device``."""
    device = device if device is not None else c.device
    if Q.dtype == F64:
        return (c.to(Q.device) @ Q).to(device)
    out = torch.empty(Q.shape[1], dtype=F64, device=Q.device)
    cq = c.to(Q.device, F64)
    step = _chunks(Q.shape[0], Q.shape[1]).step
    for start in range(0, Q.shape[1], step):
        out[start : start + step] = cq @ Q[:, start : start + step].to(F64)
    return out.to(device)


def basis_combine_rows(Q: Tensor, C: Tensor, device: torch.device | None = None) -> Tensor:
    """``C @ Q`` in float64 for a coefficient matrix ``C`` of shape ``(r, rows)``."""
    device = device if device is not None else C.device
    if Q.dtype == F64:
        return (C.to(Q.device, F64) @ Q).to(device)
    out = torch.empty(C.shape[0], Q.shape[1], dtype=F64, device=Q.device)
    cq = C.to(Q.device, F64)
    step = _chunks(Q.shape[0] + C.shape[0], Q.shape[1]).step
    for start in range(0, Q.shape[1], step):
        out[:, start : start + step] = cq @ Q[:, start : start + step].to(F64)
    return out.to(device)


def orthogonalize(w: Tensor, *bases: Tensor | None, passes: int = 2) -> Tensor:
    """Remove from ``w`` its components along the rows of each basis.

    Classical Gram-Schmidt, repeated ``passes`` times ("twice is enough", Giraud et
    al., 2005), float64 coefficients.
    """
    for _ in range(passes):
        for Q in bases:
            if Q is not None and Q.shape[0]:
                w = w - basis_combine(Q, basis_dot(Q, w), w.device)
    return w


def random_vector(
    dim: int,
    generator: torch.Generator,
    distribution: str = "gaussian",
    rows: int | None = None,
) -> Tensor:
    """Seeded Gaussian or Rademacher vector(s) in float64 on the CPU.

    Drawn on the CPU so that a seed gives the same probes on every device.
    """
    shape = (dim,) if rows is None else (rows, dim)
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, dtype=F64)
    if distribution == "rademacher":
        return torch.randint(0, 2, shape, generator=generator).to(F64).mul_(2).sub_(1)
    raise SharpscopeError(
        f"unknown probe distribution '{distribution}'; use gaussian or rademacher"
    )
