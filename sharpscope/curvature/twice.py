"""The model's operations in forms that PyTorch differentiates twice (for Hessians).

Some PyTorch operations compute the right function and gradient but have no second
derivative (or no forward-mode derivative), so a Hessian-vector product through them fails:

* the fused attention kernels (flash, memory-efficient) of ``nn.MultiheadAttention`` and
  ``F.scaled_dot_product_attention``: the math kernel computes the same function with
  plain operations;
* ``F.hardsigmoid`` (``nn.Hardsigmoid``, in the squeeze-excitation blocks of every
  torchvision MobileNetV3: "derivative for aten::hardsigmoid_backward is not
  implemented"): ``relu6(x + 3) / 6`` is the same function, with the same gradient
  (1/6 on (−3, 3), else 0) and second derivative (0 almost everywhere).

Inside :func:`twice_differentiable` both are used; outside nothing changes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``F.hardsigmoid`` as ``relu6(x + 3) / 6`` (a new tensor also for ``inplace``, as the
    module's output is what is used)."""
    return F.relu6(input + 3.0) / 6.0


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run the block with the math attention kernel and a twice-differentiable hardsigmoid.

    >>> import torch
    >>> x = torch.tensor([-4.0, 0.0, 1.5], requires_grad=True)
    >>> with twice_differentiable():
    ...     y = torch.nn.Hardsigmoid()(x)
    >>> y.tolist(), torch.equal(y, F.hardsigmoid(x))
    ([0.0, 0.5, 0.75], True)
    """
    original = F.hardsigmoid
    F.hardsigmoid = _hardsigmoid
    try:
        with sdpa_kernel([SDPBackend.MATH]):
            yield
    finally:
        F.hardsigmoid = original
