"""VaSSO: variance suppressed sharpness-aware optimization (Li & Giannakis, NeurIPS 2023,
arXiv:2309.15639).

The adversary takes its direction from an exponential moving average of the stochastic
gradients instead of the current one::

    d_t   = (1 - theta) d_{t-1} + theta g_t      (d_0 = the first g, as in the reference)
    eps_t = rho d_t / ||d_t||
    w_{t+1} = base_step(w_t, grad L_B(w_t + eps_t))

``theta`` weighs the *new* gradient (the opposite of a momentum beta): ``theta = 1`` is
SAM exactly, smaller values average over about ``1/theta`` steps. Reference code:
BingcongLi/VaSSO (defaults rho 0.05, theta 0.9; it updates BN statistics in both passes
and perturbs with the all-reduced gradient, hence ``perturbation="global"`` here).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import SharpscopeError
from ._base import PerturbationMode, SharpnessAware, normalised

__all__ = ["VaSSO"]


class VaSSO(SharpnessAware):
    """SAM whose ascent direction is an EMA ``d`` of the data-loss gradients.

    Args:
        params: parameters, parameter groups, or the model.
        base: base optimizer class (default ``torch.optim.SGD``; the reference also uses AdamW).
        rho: ball radius; default 0.05 (reference config).
        theta: weight of the new gradient in the EMA, in (0, 1]; default 0.9 (reference config).
        **kwargs: shared options and base optimizer options (see :class:`SAM`).

    State: ``d`` (one tensor per parameter), saved in ``state_dict()["variant"]["d"]``.

    Raises:
        SharpscopeError: when ``theta`` is outside (0, 1].
    """

    name: ClassVar[str] = "vasso"
    supports_m: ClassVar[bool] = False
    default_perturbation: ClassVar[PerturbationMode] = "global"

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        theta: float = 0.9,
        **kwargs: Any,
    ) -> None:
        try:
            theta = float(theta)
        except (TypeError, ValueError) as exc:
            raise SharpscopeError(f"theta must be a number in (0, 1], got {theta!r}") from exc
        if not 0.0 < theta <= 1.0:
            raise SharpscopeError(
                f"theta must be in (0, 1] (the weight of the new gradient; 1 gives SAM), got {theta}"
            )
        super().__init__(params, base, rho=rho, **kwargs)
        self.theta = theta

    def perturbation(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor | None]:
        """``d <- (1 - theta) d + theta g`` (``d = g`` at the first step), then
        ``eps = rho d / ||d||``; d is kept in the state."""
        fresh = [p for p in params if "d" not in self.state[p]]
        if len(fresh) == len(params):
            d = [g.clone() for g in grads]
            for p, t in zip(params, d):
                self.state[p]["d"] = t
        else:
            for p in fresh:  # a parameter seen for the first time starts from its gradient
                self.state[p]["d"] = p.grad.clone()
            d = [self.state[p]["d"] for p in params]
            # lerp(d, g, theta) = d + theta (g - d); exact d = g at theta = 1
            torch._foreach_lerp_(d, grads, self.theta)
        return normalised(d, self.rho)

    def _variant_state(self) -> dict[str, Any]:
        return {"d": self._per_param_state("d")}

    def _check_variant_state(self, state: dict[str, Any]) -> None:
        self._check_variant_keys(state, ("d",))
        self._check_per_param_state("d", state.get("d", {}))

    def _load_variant_state(self, state: dict[str, Any]) -> None:
        self._load_per_param_state("d", state.get("d", {}))

    def rank_state(self) -> dict[str, Any]:
        """Under DDP with local perturbations ``d`` averages this rank's own gradients."""
        return {"d": self._per_param_state("d")}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self._load_per_param_state("d", state.get("d", {}))
