"""SAM-ON: perturb only the normalization layers (Mueller, Vlaar, Rolnick, Hein,
NeurIPS 2023, arXiv:2306.04226).

The ascent step moves only the affine parameters of normalization layers (the set N,
typically ~0.1% of the parameters)::

    eps_i = rho T_i^2 g_i / ||T g||_N   for i in N,   eps_i = 0 otherwise

then pass 2 and the base step use the gradient of *all* parameters at ``w + eps``.
``||eps|| = rho`` on the small set (mueller-mp/SAM-ON #1), so good rho values are larger
than SAM's (about 5x for SAM-ON, 2x for elementwise ASAM-ON, 10x for layerwise/l-inf).

N is found by module type (never by parameter name, which the reference matches with the
substrings ``norm``/``bn``): weight and bias of BatchNorm1d/2d/3d, SyncBatchNorm,
LayerNorm, GroupNorm, affine InstanceNorm and the weight of RMSNorm.
Reference defaults: rho 0.5, eta 0.01 (class) / 0.0 (CLI).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..errors import SharpscopeError, check_bool
from ._base import SharpnessAware, StepContext, state_count
from .asam import Adaptive, adaptive_perturbation, check_adaptive
from .closure import unwrap_model

__all__ = ["SAMON", "NORM_LAYER_TYPES", "normalization_parameters"]

NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = tuple(
    t
    for t in (
        _BatchNorm,
        nn.LayerNorm,
        nn.GroupNorm,
        _InstanceNorm,
        getattr(nn, "RMSNorm", None),  # torch >= 2.4
    )
    if t is not None
)


def normalization_parameters(model: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` of the affine parameters of every normalization layer."""
    out = []
    for module_name, module in unwrap_model(model).named_modules():
        if isinstance(module, NORM_LAYER_TYPES):
            for name, p in module.named_parameters(recurse=False):
                out.append((f"{module_name}.{name}" if module_name else name, p))
    return out


def check_normalization_layers(
    model: nn.Module, exclude_norm: bool = False
) -> list[tuple[str, Tensor]]:
    """The normalization layers' affine parameters SAM-ON perturbs; refuses a model with
    none (or, unless ``exclude_norm``, with every one frozen). A study calls it on each
    model built on the ``meta`` device, before anything trains.

    Raises:
        SharpscopeError: no normalization layer with affine parameters, or all frozen.
    """
    norm = normalization_parameters(model)
    if not norm:
        # a norm layer whose scale and shift are buffers (torchvision's FrozenBatchNorm2d)
        fixed = sorted(
            {
                type(m).__name__
                for m in unwrap_model(model).modules()
                if "Norm" in type(m).__name__ and not any(True for _ in m.parameters())
            }
        )
        held = (
            f" (its {', '.join(fixed)} has no parameters: affine=False, or a scale and shift "
            "kept as buffers)"
            if fixed
            else ""
        )
        raise SharpscopeError(
            f"SAM-ON perturbs normalization layers but {type(unwrap_model(model)).__name__} "
            "has none with affine parameters (BatchNorm/LayerNorm/GroupNorm/InstanceNorm/"
            f"RMSNorm){held}; use sam or asam for this model, or give it normalization layers "
            "(the registry's mlp, cnn and cnn1d take --model-opt norm=batch)"
        )
    if not exclude_norm and not any(p.requires_grad for _, p in norm):
        raise SharpscopeError(
            "SAM-ON perturbs normalization layers but every one of them is frozen "
            f"(requires_grad=False: {', '.join(n for n, _ in norm[:4])}"
            f"{', ...' if len(norm) > 4 else ''}); unfreeze them or use sam or asam"
        )
    return norm


class SAMON(SharpnessAware):
    """Sharpness-aware step that perturbs only the normalization layers' affine parameters.

    Args:
        model: the network (its modules identify N; all its parameters are optimised).
        base: base optimizer class (default ``torch.optim.SGD``).
        rho: radius of the norm-only perturbation; default 0.5 (reference).
        adaptive: ``"none"`` (SAM-ON, default), ``"elementwise"`` (ASAM-ON, ``T = |w| + eta``),
            ``"layerwise"`` (``T = ||w|| + eta``) or ``"linf"`` (``eps = rho T sign(g)``).
        eta: offset in ``T``; default 0.01 (reference class default).
        normalize_bias: also scale the biases (shifts) by ``T`` in the adaptive forms.
        exclude_norm: ablation, perturb everything *except* N (the reference's ``no_norm``).
        fast_first_pass: in pass 1 compute gradients only for the perturbed set (turns
            ``requires_grad`` off elsewhere during pass 1); not under DDP.
        sam_epochs: ``(start, end)``: sharpness-aware steps only in epochs
            ``start <= epoch < end``, plain base steps outside; needs ``steps_per_epoch``.
        steps_per_epoch: optimizer steps per epoch (for ``sam_epochs``).
        **kwargs: shared options and base optimizer options (see :class:`SAM`).

    Raises:
        SharpscopeError: when ``model`` is not an ``nn.Module`` or has no normalization
            layer with affine parameters.
    """

    name: ClassVar[str] = "samon"
    _id_sets: ClassVar[tuple[str, ...]] = ("_norm_ids", "_perturbed_ids", "_bias_ids")

    def __init__(
        self,
        model: nn.Module,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.5,
        adaptive: Adaptive = "none",
        eta: float = 0.01,
        normalize_bias: bool = False,
        exclude_norm: bool = False,
        fast_first_pass: bool = False,
        sam_epochs: tuple[int, int] | None = None,
        steps_per_epoch: int | None = None,
        params: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise SharpscopeError(
                "SAMON needs the model (an nn.Module) to find its normalization layers: "
                "SAMON(model, base=torch.optim.SGD, rho=0.5, lr=0.1)"
            )
        check_adaptive(adaptive, eta, allow_none=True)
        check_normalization_layers(model, exclude_norm)
        if sam_epochs is not None:
            sam_epochs = _epoch_window(sam_epochs)
            if not steps_per_epoch or int(steps_per_epoch) < 1:
                raise SharpscopeError("sam_epochs needs steps_per_epoch (a positive integer)")
        kwargs.setdefault("model", model)
        super().__init__(model.parameters() if params is None else params, base, rho=rho, **kwargs)
        if fast_first_pass and self.model is not None and hasattr(self.model, "no_sync"):
            raise SharpscopeError(
                "fast_first_pass toggles requires_grad, which DistributedDataParallel does not "
                "allow; leave fast_first_pass off under DDP"
            )
        self.adaptive = adaptive
        self.eta = float(eta)
        self.normalize_bias = check_bool("normalize_bias", normalize_bias)
        self.exclude_norm = check_bool("exclude_norm", exclude_norm)
        self.fast_first_pass = check_bool("fast_first_pass", fast_first_pass)
        self.sam_epochs = sam_epochs
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)
        self.num_steps = 0
        self._norm_ids: set[int] = set()
        self._perturbed_ids: set[int] = set()
        self._bias_ids: set[int] = set()
        self._params_added(self._all_params())
        if not self._perturbed_ids:
            raise SharpscopeError(
                "SAM-ON with exclude_norm=True found no parameter outside the normalization "
                "layers to perturb"
                if self.exclude_norm
                else "SAM-ON found none of the model's normalization parameters among the "
                "parameters it was given; give it the model's parameters (or params= with them)"
            )

    def _params_added(self, params: list[Tensor]) -> None:
        """Sort parameters (those given, and a group added later) into perturbed or not,
        and biases."""
        if "_norm_ids" not in self.__dict__:  # torch's constructor adding the first groups
            return
        # the model's normalization layers now (it may have grown one since construction)
        self._norm_ids |= {id(p) for _, p in normalization_parameters(self.model)}
        self._perturbed_ids |= {
            id(p) for p in params if (id(p) in self._norm_ids) != self.exclude_norm
        }
        names = {id(p): n for n, p in unwrap_model(self.model).named_parameters()}
        self._bias_ids |= {
            id(p) for p in params if names.get(id(p), "").rsplit(".", 1)[-1] == "bias"
        }

    def perturbation(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor | None]:
        """``eps_i = rho T_i^2 g_i / ||T g||_N`` (or the ``adaptive`` form, see
        :func:`~sharpscope.optim.asam.adaptive_perturbation`) for i in the normalization
        parameters N, None for every other tensor."""
        index = [i for i, p in enumerate(params) if id(p) in self._perturbed_ids]
        if not index:
            raise SharpscopeError(
                "SAM-ON: no parameter it perturbs got a gradient in this step (normalization "
                "layers frozen or not used by the forward pass)"
            )
        sub_params = [params[i] for i in index]
        sub_grads = [grads[i] for i in index]
        mask = None
        if not self.normalize_bias and self.adaptive != "none":
            mask = [id(p) not in self._bias_ids for p in sub_params]
        eps = adaptive_perturbation(
            sub_params, sub_grads, self.rho, adaptive=self.adaptive, eta=self.eta, scaled_mask=mask
        )
        out: list[Tensor | None] = [None] * len(params)
        for i, e in zip(index, eps):
            out[i] = e
        return out

    def _skip_second_pass(self) -> bool:
        if self.rho == 0.0:
            return True
        if self.sam_epochs is None:
            return False
        epoch = self.num_steps // self.steps_per_epoch  # type: ignore[operator]
        return not self.sam_epochs[0] <= epoch < self.sam_epochs[1]

    def step(self, closure: Any = None) -> Tensor:  # type: ignore[override]
        """One two-pass step (:meth:`SharpnessAware.step`), counted in ``num_steps`` for
        ``sam_epochs``."""
        loss = super().step(closure)
        self.num_steps += 1
        return loss

    def _first_pass_context(self, ctx: StepContext) -> Any:
        stack = ExitStack()
        stack.enter_context(ctx.local_sync())
        if self.fast_first_pass:
            stack.enter_context(self._only_perturbed_require_grad())
        return stack

    @contextmanager
    def _only_perturbed_require_grad(self):
        switched = [
            p for p in self._all_params() if p.requires_grad and id(p) not in self._perturbed_ids
        ]
        for p in switched:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in switched:
                p.requires_grad_(True)

    def _variant_state(self) -> dict[str, Any]:
        return {"num_steps": self.num_steps} if self.sam_epochs is not None else {}

    def _check_variant_state(self, state: dict[str, Any]) -> None:
        self._check_variant_keys(state, ("num_steps",))
        state_count("num_steps", state.get("num_steps", 0))

    def _load_variant_state(self, state: dict[str, Any]) -> None:
        self.num_steps = state_count("num_steps", state.get("num_steps", 0))


def _epoch_window(value: Any) -> tuple[int, int]:
    """``sam_epochs`` as ``(start, end)`` with ``0 <= start <= end``; anything else (a
    number, a string, another length) is one clear error, not a traceback.

    >>> _epoch_window([0, 100])
    (0, 100)
    """
    window = None
    if not isinstance(value, (str, bytes)):
        try:
            start, end = (int(epoch) for epoch in value)
            window = (start, end)
        except (TypeError, ValueError):
            pass
    if window is None or not 0 <= window[0] <= window[1]:
        raise SharpscopeError(
            f"sam_epochs must be (start, end) with 0 <= start <= end, got {value!r} "
            "(on the command line: --opt 'sam_epochs=[0, 100]')"
        )
    return window
