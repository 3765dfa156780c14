"""SAM: sharpness-aware minimization (Foret et al., ICLR 2021, arXiv:2010.01412).

Objective ``min_w max_{||eps|| <= rho} L(w + eps)``; the first-order inner solution is
``eps = rho g / ||g||`` (p = 2, one global norm over all parameters), and the descent
uses ``g~ = grad L(w + eps)`` (the Hessian term of d(w + eps)/dw is dropped).
Reference code: google-research/sam (JAX), davda54/sam (PyTorch).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._base import SharpnessAware, normalised

__all__ = ["SAM"]


class SAM(SharpnessAware):
    """SAM with ``eps = rho * g / ||g||`` around any base optimizer.

    Args:
        params: parameters, parameter groups, or the model.
        base: base optimizer class (default ``torch.optim.SGD``).
        rho: ball radius; default 0.05 (the SAM paper's CIFAR value, also the
            SamsungLabs/ASAM README's SAM value for CIFAR-10).
        **kwargs: shared options of :class:`~sharpscope.optim._base.SharpnessAware`
            (``bn_policy``, ``same_noise``, ``perturbation``, ``max_grad_norm``, ``m``,
            ``model``, ``scaler``) and the base optimizer's options (``lr``, ...).

    On ``L(w) = 1/2 w^T A w`` one step with plain SGD is
    ``w - lr * A (w + rho A w / ||A w||)``:

    >>> A = torch.diag(torch.tensor([2.0, 1.0]))
    >>> w = nn.Parameter(torch.tensor([1.0, 1.0]))
    >>> opt = SAM([w], base=torch.optim.SGD, rho=0.5, lr=0.1, bn_policy="both")
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = 0.5 * w @ A @ w
    ...     loss.backward()
    ...     return loss
    >>> _ = opt.step(closure)
    >>> g = A @ torch.ones(2)
    >>> torch.allclose(w.detach(), torch.ones(2) - 0.1 * A @ (torch.ones(2) + 0.5 * g / g.norm()))
    True
    """

    name: ClassVar[str] = "sam"

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, base, rho=rho, **kwargs)

    def perturbation(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor | None]:
        """``eps = rho g / (||g|| + 1e-12)``, one global norm over all tensors (0 when g = 0)."""
        return normalised(grads, self.rho)
