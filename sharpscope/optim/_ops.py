"""Arithmetic on lists of tensors, fast outside ``vmap`` and correct inside it.

The optimizers work on one tensor per parameter. Outside ``torch.func.vmap`` these
helpers use the fused ``torch._foreach_*`` kernels (one dispatch for the whole list, no
Python loop over elements, no host synchronisation). ``vmap`` has no batching rule for
the ``_foreach_*`` ops, so inside it (the m-sharpness path, :mod:`sharpscope.optim.msam`)
the same maths runs tensor by tensor. Every perturbation rule is written once with these
helpers and therefore works in both places.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Added to every norm in a denominator (spec section 0: the references use 1e-12).
NORM_EPS = 1e-12


def _batched(tensors: Sequence[Tensor]) -> bool:
    return bool(tensors) and torch._C._functorch.is_batchedtensor(tensors[0])


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """One l2 norm over all entries of all ``tensors`` (a 0-dim tensor).

    >>> global_norm([torch.tensor([3.0]), torch.tensor([4.0])])
    tensor(5.)
    """
    if not tensors:
        raise ValueError("global_norm of an empty list")
    # float16 has no room for NORM_EPS (1e-12 rounds to 0, so g = 0 gave 0/0 = NaN) nor for
    # rho / ||g|| once ||g|| < rho / 65504: the norm of float16 tensors is kept in float32
    half = any(t.dtype == torch.float16 for t in tensors)
    wide = torch.float32 if half and all(t.dtype != torch.float64 for t in tensors) else None
    if _batched(tensors):
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(t, dtype=wide) for t in tensors])
        )
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors, dtype=wide)))


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every entry of ``tensors`` is finite, as a 0-dim bool tensor (no host
    synchronisation until it is read; an inf/NaN anywhere makes its tensor's norm so).

    >>> bool(all_finite([torch.tensor([1.0]), torch.tensor([float("inf")])]))
    False
    """
    return torch.isfinite(torch.stack(torch._foreach_norm(list(tensors)))).all()


def as_scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` as a 0-dim tensor of ``like``'s dtype and device.

    Arithmetic then happens in that dtype whether ``value`` came as a Python float or as
    a tensor (a Python scalar is otherwise combined in double precision first), so a
    radius given either way gives bit-identical steps (LETS vs its inner variant).
    """
    if isinstance(value, Tensor):
        return value.to(dtype=like.dtype, device=like.device)
    return torch.full((), value, dtype=like.dtype, device=like.device)


def scaled(tensors: Sequence[Tensor], factor: Tensor | float) -> list[Tensor]:
    """``[t * factor for t in tensors]`` (``factor`` a scalar or 0-dim tensor)."""
    if _batched(tensors) or (isinstance(factor, Tensor) and _batched([factor])):
        return [t * factor for t in tensors]
    return list(torch._foreach_mul(tensors, factor))


def products(a: Sequence[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """Elementwise products ``[x * y for x, y in zip(a, b)]``."""
    if _batched(a) or _batched(b):
        return [x * y for x, y in zip(a, b)]
    return list(torch._foreach_mul(a, b))


def abs_plus(tensors: Sequence[Tensor], eta: float) -> list[Tensor]:
    """``[|t| + eta for t in tensors]`` (ASAM's ``T = |w| + eta``)."""
    if _batched(tensors):
        return [t.abs() + eta for t in tensors]
    out = torch._foreach_abs(tensors)
    if eta:
        torch._foreach_add_(out, eta)
    return list(out)


def signs(tensors: Sequence[Tensor]) -> list[Tensor]:
    """``[sign(t) for t in tensors]``."""
    if _batched(tensors):
        return [t.sign() for t in tensors]
    return list(torch._foreach_sign(tensors))


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Sum over the list of the inner products ``<a_i, b_i>`` (a 0-dim tensor).

    >>> dot([torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 4.0])])
    tensor(11.)
    """
    if not a:
        return torch.zeros(())
    if len(a) == 1:
        return torch.vdot(a[0].reshape(-1), b[0].reshape(-1))
    # two concatenations and one kernel instead of one small kernel per tensor
    return torch.vdot(torch.cat([x.reshape(-1) for x in a]), torch.cat([y.reshape(-1) for y in b]))
