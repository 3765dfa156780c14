"""ASAM: adaptive SAM (Kwon, Kim, Park, Choi, ICML 2021, arXiv:2102.11600).

Scale-invariant sharpness: the ball is taken in the coordinates ``T^{-1} w`` with
``T = diag(|w| + eta)``, giving the ascent step ``eps = rho T^2 g / ||T g||``.
Reference code: SamsungLabs/ASAM (official; ``eta = 0.01`` class default, only tensors
named ``weight`` scaled, rho 0.5 on CIFAR-10) and davda54/sam ``adaptive=True``
(``T = |w|`` for every tensor, ``eta = 0``, rho 2.0). The rho values do not transfer
between these forms (davda54/sam #37). The SAM-ON repository adds a layerwise form
``T = ||w_layer|| + eta`` and an l-infinity ball ``eps = rho T sign(g)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import Tensor, nn

from ..errors import SharpscopeError, check_bool, check_choice
from ._base import SharpnessAware, finite_number, normalised
from ._ops import NORM_EPS, abs_plus, as_scalar, global_norm, products, scaled, signs
from .closure import unwrap_model

__all__ = ["ASAM", "Adaptive", "adaptive_perturbation"]

Adaptive = Literal["none", "elementwise", "layerwise", "linf"]
ADAPTIVE_FORMS: tuple[str, ...] = get_args(Adaptive)


def _layer_scales(params: list[Tensor], eta: float) -> list[Tensor]:
    norms = torch._foreach_norm(params)
    return [n + eta for n in norms]


def adaptive_perturbation(
    params: list[Tensor],
    grads: list[Tensor],
    rho: Tensor | float,
    *,
    adaptive: str,
    eta: float,
    scaled_mask: list[bool] | None = None,
) -> list[Tensor]:
    """The ascent step of SAM/ASAM in one of the forms of the SAM-ON repository.

    With ``T_i`` the scale of tensor ``i`` (1 where ``scaled_mask[i]`` is False):

    * ``"none"``: ``eps = rho g / ||g||`` (SAM);
    * ``"elementwise"``: ``T = |w| + eta``, ``eps = rho T^2 g / ||T g||`` (ASAM);
    * ``"layerwise"``: ``T = ||w_i|| + eta`` (one number per tensor), same formula;
    * ``"linf"``: ``eps = rho T sign(g)`` with the elementwise ``T`` (no normalisation).

    The norm is one global norm over all tensors given. Works inside ``vmap``.

    >>> w, g = [torch.tensor([2.0, -1.0])], [torch.tensor([1.0, 2.0])]
    >>> adaptive_perturbation(w, g, 1.0, adaptive="elementwise", eta=0.0)[0]  # [4, 2] / ||[2, 2]||
    tensor([1.4142, 0.7071])
    """
    if adaptive == "none":
        return normalised(grads, rho)
    rho = as_scalar(rho, grads[0])
    mask = [True] * len(params) if scaled_mask is None else scaled_mask
    idx_s = [i for i, s in enumerate(mask) if s]
    idx_u = [i for i, s in enumerate(mask) if not s]
    params_s = [params[i] for i in idx_s]
    grads_s = [grads[i] for i in idx_s]
    grads_u = [grads[i] for i in idx_u]
    if adaptive == "linf":
        t_s = abs_plus(params_s, eta) if params_s else []
        eps_s = scaled(products(t_s, signs(grads_s)), rho) if grads_s else []
        eps_u = scaled(signs(grads_u), rho) if grads_u else []
    elif adaptive in ("elementwise", "layerwise"):
        if adaptive == "elementwise":
            t_s = abs_plus(params_s, eta) if params_s else []
            tg_s = products(t_s, grads_s) if grads_s else []
        else:
            t_s = _layer_scales(params_s, eta) if params_s else []
            tg_s = [t * g for t, g in zip(t_s, grads_s)]
        norm = global_norm(tg_s + grads_u)
        factor = rho.to(norm) / (norm + NORM_EPS)
        if adaptive == "elementwise":
            eps_s = scaled(products(t_s, tg_s), factor) if tg_s else []
        else:
            eps_s = [t * tg * factor for t, tg in zip(t_s, tg_s)]
        eps_u = scaled(grads_u, factor) if grads_u else []
    else:
        raise SharpscopeError(
            f"adaptive must be one of {', '.join(ADAPTIVE_FORMS)}, got {adaptive!r}"
        )
    out: list[Tensor] = [None] * len(params)  # type: ignore[list-item]
    for i, e in zip(idx_s, eps_s):
        out[i] = e
    for i, e in zip(idx_u, eps_u):
        out[i] = e
    return out


def check_adaptive(adaptive: str, eta: float, *, allow_none: bool) -> None:
    """Raise a clear error for an unknown form, or an ``eta`` that is negative, non-finite
    or not a number."""
    forms = ADAPTIVE_FORMS if allow_none else ADAPTIVE_FORMS[1:]
    check_choice("adaptive", adaptive, forms)
    finite_number("eta", eta)


def weight_only_mask(model: nn.Module, params: list[Tensor], normalize_bias: bool) -> list[bool]:
    """Which of ``params`` ASAM scales: all with ``normalize_bias``, else those named ``*weight*``."""
    if normalize_bias:
        return [True] * len(params)
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    return ["weight" in names.get(id(p), "weight").rsplit(".", 1)[-1] for p in params]


class ASAM(SharpnessAware):
    """Adaptive SAM: ``eps = rho T^2 g / ||T g||`` with ``T = diag(|w| + eta)``.

    Args:
        params: parameters, parameter groups, or the model.
        base: base optimizer class (default ``torch.optim.SGD``).
        rho: radius in the rescaled coordinates; default 0.5 (official ASAM, CIFAR-10;
            1.0 on CIFAR-100). Not comparable with SAM's rho.
        eta: offset in ``T``; default 0.01 (official class default).
        adaptive: ``"elementwise"`` (default), ``"layerwise"`` or ``"linf"``.
        **kwargs: shared options and base optimizer options (see :class:`SAM`).

    ``ASAM(params, ...)`` scales every tensor; :meth:`from_model` with
    ``normalize_bias=False`` reproduces the official rule (only ``weight`` tensors scaled,
    biases and BN shifts use ``T = 1``).
    """

    name: ClassVar[str] = "asam"
    _id_sets: ClassVar[tuple[str, ...]] = ("_unscaled",)

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.5,
        eta: float = 0.01,
        adaptive: Adaptive = "elementwise",
        **kwargs: Any,
    ) -> None:
        check_adaptive(adaptive, eta, allow_none=False)
        super().__init__(params, base, rho=rho, **kwargs)
        self.eta = float(eta)
        self.adaptive = adaptive
        self._unscaled: set[int] = set()

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        normalize_bias: bool = False,
        **kwargs: Any,
    ) -> ASAM:
        """ASAM over all of ``model``'s parameters, scaling biases only with ``normalize_bias``."""
        check_bool("normalize_bias", normalize_bias)
        kwargs.setdefault("model", model)
        opt = cls(model.parameters(), base, **kwargs)
        opt._scaling_rule = (model, normalize_bias)
        opt._params_added(opt._all_params())
        return opt

    def _params_added(self, params: list[Tensor]) -> None:
        """Parameters the official rule leaves unscaled (biases, BatchNorm shifts), also
        for a group added later."""
        rule = self.__dict__.get("_scaling_rule")
        if rule is not None:
            mask = weight_only_mask(rule[0], params, rule[1])
            self._unscaled |= {id(p) for p, scaled in zip(params, mask) if not scaled}

    def perturbation(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor | None]:
        """``eps = rho T^2 g / ||T g||``, ``T = diag(|w| + eta)`` (or the ``adaptive`` form; see
        :func:`adaptive_perturbation`)."""
        mask = [id(p) not in self._unscaled for p in params] if self._unscaled else None
        return adaptive_perturbation(
            params, grads, self.rho, adaptive=self.adaptive, eta=self.eta, scaled_mask=mask
        )
