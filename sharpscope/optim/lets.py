"""LETS: learning the perturbation radius (Wang, Jiang, Fu, Zhang, ECML-PKDD 2024,
arXiv:2408.08222).

Bilevel problem (from the paper's abstract)::

    min_{rho >= 0} F(rho) = 1/2 (L(D_val; w*(rho)) - L(D_tr; w*(rho)))^2
    s.t. w*(rho) in argmin_w L_tr(w + rho u(w))      u = the inner variant's direction

solved by alternating one SAM step (lower level) with one gradient step on rho (upper
level). No public code was found; what follows is sharpscope's design (optimizers.md
section 3), with the hypergradient through one lower-level step::

    w_{t+1} = w_t - P_t * g~_t,   g~_t = grad L_tr(w_t + rho u_t)
    d w_{t+1} / d rho = -P_t * (H~_t u_t) =: -v_t,       H~_t = Hessian at w_t + eps_t
    h = dF/drho = (L_val - L_tr)(w_{t+1}) * <grad L_val - grad L_tr, -v_t>
    rho <- clamp(rho - rho_lr * h, rho_min, rho_max)

``P_t`` is the base optimizer's coefficient on the current gradient: SGD ``lr``
(``lr (1 - dampening)`` once momentum exists, Nesterov ``lr (1 + mu c)``); Adam/AdamW
``lr (1 - beta1) / ((1 - beta1^t)(sqrt(v_hat) + eps))`` (v's dependence on rho ignored);
any other base ``lr`` (an approximation). ``H~ u`` by ``hypergrad``:

* ``"diag"`` (default): ``H~ ~ diag(g~ * g~)``, free (the diagonal approximation of the
  method summary; which diagonal the paper uses is unverified);
* ``"hvp"``: exact ``H~ u`` on the same batch (this rank's part under DDP) by
  reverse-over-reverse ``torch.autograd.grad`` (about two more passes; needs a
  ``BatchClosure``);
* ``"fd"``: ``(grad L(w + eps + r u) - g~) / r`` with ``r = fd_step`` (one more pass);
* ``"identity"``: ``H~ ~ I``, free.

Lagged schedule: ``v_t`` is stored at step t; at step t+1 pass 1 already gives
``L_tr, grad L_tr`` at ``w_{t+1}`` (on the new batch), one validation pass gives
``L_val, grad L_val`` there, rho is updated, and the step perturbs with the new rho.
Cost: SAM + 1 pass. The validation pass runs in train mode with BN running statistics
frozen, its own reproducible dropout noise (the training RNG stream is left untouched),
and ``autograd.grad`` (training ``.grad`` untouched). Validation batches come from
``val_batches`` in a seeded order that is reshuffled every cycle. Under DDP, ``h`` is
averaged over ranks so rho stays identical.

Overflow: the fd pass's backward is scaled by an fp16 ``GradScaler`` like pass 2's, and
an inf/NaN there skips the step as one in pass 2 does (optimizers.md §0). A non-finite
``h`` (from the validation pass, which is not scaled, or from ``v``) is dropped: that
step keeps rho.

``F`` and ``rho`` of every step are available through
:func:`sharpscope.optim.optimizer_metrics` (the trainer logs them to metrics.jsonl).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..curvature.twice import twice_differentiable
from ..data.batches import as_batches, as_tensors, read_fixed, same_batches, same_tensors
from ..distributed import is_multi_process
from ..errors import SharpscopeError, check_bool, check_choice, first_line
from ..precision import float_dtype
from ._base import (
    SharpnessAware,
    StepContext,
    _check_rho,
    as_number,
    finite_number,
    frozen_bn,
    rng_restore,
    rng_snapshot,
    scalar_loss,
    state_count,
)
from ._ops import all_finite, dot, products
from .asam import ASAM
from .closure import unwrap_model
from .sam import SAM
from .samon import SAMON
from .vasso import VaSSO

__all__ = ["LETS", "HYPERGRAD_MODES", "INNER_OPTIONS"]

Hypergrad = Literal["diag", "hvp", "fd", "identity"]
HYPERGRAD_MODES: tuple[str, ...] = ("diag", "hvp", "fd", "identity")

#: options each inner variant accepts (and their defaults), besides rho.
INNER_OPTIONS: dict[str, dict[str, Any]] = {
    "sam": {},
    "asam": {"eta": 0.01, "adaptive": "elementwise", "normalize_bias": True},
    "vasso": {"theta": 0.9},
    "samon": {"adaptive": "none", "eta": 0.01, "normalize_bias": False, "exclude_norm": False},
}


def _hessian_products(
    grads: list[Tensor], params: list[Tensor], tangents: list[Tensor]
) -> tuple[Tensor | None, ...]:
    """``H v`` from ``grads`` computed with their graph (reverse over reverse); one line for
    a model that PyTorch cannot differentiate twice, even in the forms of
    :mod:`sharpscope.curvature.twice` (``torch.cdist``: "the derivative for
    '_cdist_backward' is not implemented")."""
    try:
        return torch.autograd.grad(grads, params, grad_outputs=tangents, allow_unused=True)
    except RuntimeError as exc:
        if "not implemented" not in str(exc):
            raise
        raise SharpscopeError(
            "LETS hypergrad='hvp' needs the model's second derivatives, which PyTorch does "
            f"not have for one of its operations ({first_line(exc)}); use hypergrad='diag' "
            "or 'fd'"
        ) from exc


def check_second_derivatives(model: nn.Module, inputs: Tensor, targets: Tensor, loss_fn) -> None:
    """One Hessian-vector product on a few examples, BatchNorm statistics untouched: refuses
    in one line, before training, a model whose second derivatives PyTorch lacks."""
    params = [p for p in model.parameters() if p.requires_grad]
    with frozen_bn(model), torch.enable_grad():
        with twice_differentiable():
            loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        used = [(p, g) for p, g in zip(params, grads) if g is not None and g.requires_grad]
        if used:  # else an affine loss: no curvature, nothing PyTorch could lack
            grads = [g for _, g in used]
            _hessian_products(grads, [p for p, _ in used], [torch.ones_like(g) for g in grads])


class _NoStep(torch.optim.Optimizer):
    """Placeholder base of the inner variant: LETS only uses its perturbation."""

    def __init__(self, params: Iterable[Any]) -> None:
        super().__init__(params, {})

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        return None


class _ValidationStream:
    """Draws validation batches reproducibly.

    * An *iterator* (e.g. the trainer's endless seeded generator) is consumed in order;
      after a resume (``count`` restored) the first draw skips the batches consumed before.
    * Anything re-iterable (a pair of tensors, a ``DataSplit``, a ``Dataset``, a list of
      batches) becomes a list of batches, visited in a seeded order reshuffled every cycle.
    """

    def __init__(self, data: Any, batch_size: int | None, seed: int) -> None:
        if hasattr(data, "inputs") and hasattr(data, "targets"):
            data = (data.inputs, data.targets)
        self._iterator = data if isinstance(data, Iterator) else None
        self._data = data
        self._batch_size = batch_size
        self._batches: list[tuple[Tensor, Tensor]] | None = None
        self.seed = int(seed)
        self.count = 0
        self._consumed = 0
        self._cycle = -1
        self._order: list[int] = []

    def _materialise(self, default_batch_size: int) -> list[tuple[Tensor, Tensor]]:
        if self._batches is None:
            data = self._data
            is_pair = (
                isinstance(data, (tuple, list))
                and len(data) == 2
                and all(isinstance(t, Tensor) for t in data)
            )
            # a shuffling loader or random transforms would give a resumed run other
            # batches than the run it continues: refused, as the analyses refuse them
            why = " of LETS' validation data (a resumed run would draw other batches)"
            if is_pair or isinstance(data, torch.utils.data.Dataset):
                inputs, targets = read_fixed(data, as_tensors, same_tensors, why)
                self._batches = as_batches(
                    (inputs, targets), batch_size=self._batch_size or default_batch_size
                )
            else:
                self._batches = read_fixed(data, as_batches, same_batches, why)
        return self._batches

    def _from_iterator(self) -> tuple[Tensor, Tensor]:
        assert self._iterator is not None
        try:
            while self._consumed < self.count:  # resume: skip what was drawn before
                next(self._iterator)
                self._consumed += 1
            batch = next(self._iterator)
        except StopIteration as exc:
            raise SharpscopeError(
                "LETS ran out of validation batches; pass an endless iterator or a re-iterable "
                "(a list of batches or a pair of tensors), which LETS cycles through"
            ) from exc
        self._consumed += 1
        self.count += 1
        return batch[0], batch[1]

    def next(self, default_batch_size: int) -> tuple[Tensor, Tensor]:
        if self._iterator is not None:
            return self._from_iterator()
        batches = self._materialise(default_batch_size)
        cycle, position = divmod(self.count, len(batches))
        if cycle != self._cycle:
            gen = torch.Generator().manual_seed(self.seed + cycle)
            self._order = torch.randperm(len(batches), generator=gen).tolist()
            self._cycle = cycle
        self.count += 1
        return batches[self._order[position]]


class LETS(SharpnessAware):
    """A SAM-family step whose radius rho is learned to close the train/validation gap.

    Args:
        params: parameters, parameter groups, or the model.
        base: base optimizer class (default ``torch.optim.SGD``).
        inner: the lower-level variant supplying the direction ``u``: ``"sam"`` (default),
            ``"asam"``, ``"vasso"`` or ``"samon"``.
        rho: initial radius; default 0.05 (project default).
        rho_lr: step size beta of the rho update; default 1e-4 (project default; the
            paper's value is unverified).
        rho_min, rho_max: clamp of rho (``rho_max=None``: no upper bound).
        hypergrad: ``"diag"`` (default), ``"hvp"``, ``"fd"`` or ``"identity"``.
        per_group: learn one rho per parameter group (``"diag"``/``"identity"`` only).
        fd_step: ``r`` of the finite-difference mode; default 1e-3.
        val_batches: validation data: an iterable of ``(inputs, targets)`` batches, a
            pair of tensors, a ``Dataset`` or a ``DataSplit``; a held-out part of the
            training split (never the test split). Required.
        val_batch_size: batch size when ``val_batches`` is not already batched
            (default: the training batch size of the closure, or 128).
        val_seed: seed of the validation batch order and of its dropout noise.
        loss_fn: the loss for the validation pass when the closure is a plain function
            (a ``BatchClosure`` carries it).
        inner_options: options of the inner variant (see ``INNER_OPTIONS``).
        **kwargs: shared options and base optimizer options (see :class:`SAM`).

    Raises:
        SharpscopeError: without validation data, or on an invalid option.
    """

    name: ClassVar[str] = "lets"
    supports_m: ClassVar[bool] = False
    extra_options: ClassVar[tuple[str, ...]] = tuple(
        sorted({key for options in INNER_OPTIONS.values() for key in options})
    )

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        inner: str = "sam",
        rho: float = 0.05,
        rho_lr: float = 1e-4,
        rho_min: float = 0.0,
        rho_max: float | None = None,
        hypergrad: Hypergrad = "diag",
        per_group: bool = False,
        fd_step: float = 1e-3,
        val_batches: Any = None,
        val_batch_size: int | None = None,
        val_seed: int = 0,
        loss_fn: Callable[[Any, Tensor], Tensor] | None = None,
        inner_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if val_batches is None:
            raise SharpscopeError(
                "LETS needs validation data to learn rho: pass val_batches= (a held-out part "
                "of the training split, e.g. 10%; never the test split)"
            )
        check_choice("inner", inner, sorted(INNER_OPTIONS))
        check_choice("hypergrad", hypergrad, HYPERGRAD_MODES)
        if per_group and hypergrad not in ("diag", "identity"):
            raise SharpscopeError(
                "per_group=True needs hypergrad='diag' or 'identity' (one HVP per group is not "
                "implemented)"
            )
        finite_number("rho_lr", rho_lr)
        rho_min = _check_rho(rho_min, "rho_min")
        if rho_max is not None and not as_number("rho_max", rho_max) >= rho_min:
            raise SharpscopeError(f"rho_max must be >= rho_min ({rho_min}), got {rho_max!r}")
        if val_batch_size is not None:  # 0 fell back to the training batch size silently
            size = as_number("val_batch_size", val_batch_size)
            if size != int(size) or size < 1:
                raise SharpscopeError(
                    f"val_batch_size must be a positive integer or None, got {val_batch_size!r}"
                )
            val_batch_size = int(size)
        initial = _check_rho(rho)
        if initial < rho_min or (rho_max is not None and initial > float(rho_max)):
            raise SharpscopeError(
                f"the initial rho {initial} lies outside [rho_min, rho_max] = "
                f"[{rho_min}, {rho_max}] (the clamp of optimizers.md §3)"
            )
        finite_number("fd_step", fd_step, positive=True)
        options = dict(inner_options or {})
        unknown = set(options) - set(INNER_OPTIONS[inner])
        if unknown:
            raise SharpscopeError(
                f"unknown option(s) {sorted(unknown)} for inner={inner!r}; valid: "
                f"{sorted(INNER_OPTIONS[inner]) or 'none'}"
            )
        if kwargs.get("m") is not None:
            raise SharpscopeError("LETS does not support m-sharpness training; leave m unset")
        super().__init__(params, base, rho=rho, **kwargs)
        self.hypergrad = hypergrad
        self.per_group = check_bool("per_group", per_group)
        self.rho_lr = float(rho_lr)
        self.rho_min = rho_min
        self.rho_max = None if rho_max is None else float(rho_max)
        self.fd_step = float(fd_step)
        self.loss_fn = loss_fn
        self._val = _ValidationStream(val_batches, val_batch_size, val_seed)
        self.inner = self._build_inner(inner, options)
        device = self._device()
        # rho and the hypergradient scalars in float64 (MPS has none): rho moves by
        # rho_lr * h, far below float32 resolution of rho for small rho_lr
        self._scalar_dtype = torch.float32 if device.type == "mps" else torch.float64
        self._rho_start = float(self.rho)
        self._rho_t = torch.full(
            (len(self.param_groups),) if self.per_group else (),
            float(self.rho),
            device=device,
            dtype=self._scalar_dtype,
        )
        self.last_F = torch.full((), float("nan"))
        self.last_h = torch.zeros_like(self._rho_t)
        self._hu: dict[int, Tensor] = {}
        self._sgd_first: dict[int, bool] = {}

    _transient: ClassVar[dict[str, Callable[[], Any]]] = {
        **SharpnessAware._transient,
        "_hu": dict,
        "_sgd_first": dict,
    }

    def __getstate__(self) -> dict[str, Any]:
        if self._val._iterator is not None:  # a generator can be neither copied nor pickled
            raise SharpscopeError(
                "this LETS draws its validation batches from an iterator, which cannot be "
                "copied or pickled; give val_batches as a list of batches or a pair of "
                "tensors, or save opt.state_dict() instead of the optimizer"
            )
        return super().__getstate__()

    def _build_inner(self, inner: str, options: dict[str, Any]) -> SharpnessAware:
        common: dict[str, Any] = {"rho": 1.0, "bn_policy": "both"}
        if inner == "samon":
            if self.model is None:
                raise SharpscopeError(
                    "LETS with inner='samon' needs the model: pass model= (or the module as params)"
                )
            return SAMON(self.model, _NoStep, params=self._all_params(), **common, **options)
        if inner == "asam":
            normalize_bias = options.pop("normalize_bias", True)
            if self.model is not None:
                return ASAM.from_model(
                    self.model, _NoStep, normalize_bias=normalize_bias, **common, **options
                )
            if not normalize_bias:
                raise SharpscopeError(
                    "inner='asam' with normalize_bias=False needs the model (parameter names): "
                    "pass model="
                )
            return ASAM(self._all_params(), _NoStep, **common, **options)
        cls = {"sam": SAM, "vasso": VaSSO}[inner]
        return cls(self._all_params(), _NoStep, **common, **options)

    # ------------------------------------------------------------------ rho

    @property
    def rho(self) -> float:  # type: ignore[override]
        """Current radius (the mean over groups with ``per_group``)."""
        rho_t = self.__dict__.get("_rho_t")
        if rho_t is None:
            return self.__dict__["_rho_init"]
        return float(rho_t.mean())

    @rho.setter
    def rho(self, value: float) -> None:
        value = _check_rho(value)
        if "_rho_t" in self.__dict__:
            self._rho_t.fill_(value)
        else:
            self.__dict__["_rho_init"] = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; with ``per_group`` it gets its own rho, starting at the initial one.

        The inner variant learns of the new parameters too, so that its state for them
        (VaSSO's ``d``) is saved in ``state_dict`` and a resume is exact.
        """
        super().add_param_group(param_group)
        inner = self.__dict__.get("inner")
        if inner is not None:  # an ASAM built from the model may hold them already
            known = {id(p) for p in inner._all_params()}
            new = [p for p in self.param_groups[-1]["params"] if id(p) not in known]
            if new:
                inner.add_param_group({"params": new})
        rho_t = self.__dict__.get("_rho_t")
        if rho_t is not None and self.per_group:
            start = torch.full((1,), self._rho_start, dtype=rho_t.dtype, device=rho_t.device)
            self._rho_t = torch.cat([rho_t, start])
            self.last_h = torch.zeros_like(self._rho_t)

    def rho_values(self) -> list[float]:
        """rho per parameter group (one value without ``per_group``)."""
        return [float(v) for v in self._rho_t.reshape(-1)]

    def _skip_second_pass(self) -> bool:
        return False

    def _group_of(self) -> dict[int, int]:
        return {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}

    # ------------------------------------------------------------------ hooks

    def _validation(
        self, ctx: StepContext, params: list[Tensor]
    ) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        model = ctx.model
        loss_fn = ctx.loss_fn
        if model is None or loss_fn is None:
            raise SharpscopeError(
                "LETS's validation pass needs the model and the loss: use BatchClosure or pass "
                "model= and loss_fn= to LETS"
            )
        default_size = ctx.batch.batch_size if ctx.batch is not None else 128
        x, y = self._val.next(default_size)
        module = unwrap_model(model)
        # floating inputs in the model's dtype, as the analyses and the trainer read data
        # (float32 batches against a bfloat16 or float64 model failed inside the pass)
        dtype = float_dtype(module) if x.is_floating_point() else None
        x = x.to(ctx.device, dtype=dtype, non_blocking=True)
        y = y.to(ctx.device, non_blocking=True)
        state = rng_snapshot(ctx.device)
        seed = (self._val.seed * 1_000_003 + self._val.count) % (2**63 - 1)
        torch.default_generator.manual_seed(seed)
        if ctx.device.type == "cuda":
            index = (
                ctx.device.index if ctx.device.index is not None else torch.cuda.current_device()
            )
            torch.cuda.default_generators[index].manual_seed(seed)
        try:
            with self.bn_frozen(ctx), torch.enable_grad():
                with ctx.autocast():
                    loss = loss_fn(module(x), y)
                loss = scalar_loss(loss, "LETS' validation loss_fn")
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            rng_restore(state, ctx.device)
        self.gradient_passes += 1
        return loss.detach().to(self._scalar_dtype), grads

    def _before_perturbation(
        self, ctx: StepContext, loss: Tensor, params: list[Tensor], grads: list[Tensor]
    ) -> None:
        val_loss, val_grads = self._validation(ctx, params)
        gap = val_loss - loss.to(val_loss)
        self.last_F = 0.5 * gap * gap
        have = [
            (i, self.state[p]["v"])
            for i, p in enumerate(params)
            if "v" in self.state[p] and val_grads[i] is not None
        ]
        for p in params:
            self.state[p].pop("v", None)  # consumed: v describes the previous step only
        if not have or self.rho_lr == 0.0:
            self.last_h = torch.zeros_like(self._rho_t)
            return
        diff = torch._foreach_sub([val_grads[i] for i, _ in have], [grads[i] for i, _ in have])
        vs = [v for _, v in have]
        if self.per_group:
            group_of = self._group_of()
            h = torch.zeros_like(self._rho_t)
            for k in range(len(self.param_groups)):
                sel = [j for j, (i, _) in enumerate(have) if group_of[id(params[i])] == k]
                if sel:
                    h[k] = -gap * dot([diff[j] for j in sel], [vs[j] for j in sel]).to(gap)
        else:
            h = -gap * dot(diff, vs).to(gap)
        if ctx.ddp is not None and is_multi_process():
            dist.all_reduce(h)
            h /= dist.get_world_size()
        # an inf/NaN from the validation pass (no scaler watches it) or in v is dropped:
        # h = 0 and rho stays; a NaN rho masked eps to 0 for good (LETS became its base
        # optimizer). Decided on the device, with no host synchronisation.
        self.last_h = torch.where(torch.isfinite(h), h, torch.zeros_like(h))
        new = self._rho_t - self.rho_lr * self.last_h.to(self._rho_t)
        self._rho_t.copy_(torch.clamp(new, min=self.rho_min, max=self.rho_max))

    def perturbation(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor | None]:
        """``eps = rho u``, u the inner variant's direction at radius 1 (rho per group with
        ``per_group``); u is kept for the hypergradient ``v_t``."""
        dtype = grads[0].dtype if grads else torch.float32
        if self.per_group:
            # u from the inner rule at radius 1, then eps = rho_group * u
            self.inner.rho = 1.0
            u = self.inner.perturbation(params, grads)
            group_of = self._group_of()
            rho = self._rho_t.to(dtype)
            eps = [None if e is None else e * rho[group_of[id(p)]] for p, e in zip(params, u)]
            self._u = u
            return eps
        # The inner rule runs at the current radius itself, so that rho_lr = 0 gives the
        # inner variant bit for bit; u = eps / rho. At rho = 0 it runs at radius 1 for u
        # (so rho can grow from 0) and eps is masked to 0. No host synchronisation.
        rho = self._rho_t.to(dtype)
        positive = rho > 0
        self.inner._set_radius_tensor(torch.where(positive, rho, torch.ones_like(rho)))
        raw = self.inner.perturbation(params, grads)
        index = [i for i, e in enumerate(raw) if e is not None]
        kept = [raw[i] for i in index]
        u_kept = torch._foreach_div(kept, self.inner.rho) if kept else []
        eps_kept = torch._foreach_mul(kept, positive.to(dtype)) if kept else []
        u: list[Tensor | None] = [None] * len(params)
        eps: list[Tensor | None] = [None] * len(params)
        for i, ui, ei in zip(index, u_kept, eps_kept):
            u[i], eps[i] = ui, ei
        self._u = u
        return eps

    def _after_second_pass(
        self, ctx: StepContext, params: list[Tensor], moved: list[Tensor], eps: list[Tensor]
    ) -> None:
        inv = 1.0 / float(ctx.scaler.get_scale()) if ctx.scaler is not None else None
        u = self._u
        self._hu = {}
        if isinstance(self.base, torch.optim.SGD):
            self._sgd_first = {
                id(p): self.base.state.get(p, {}).get("momentum_buffer") is None for p in params
            }
        pairs = [(p, e) for p, e in zip(params, u) if e is not None]
        if self.hypergrad == "identity":
            self._hu = {id(p): e for p, e in pairs}
        elif self.hypergrad == "diag":
            g2 = [p.grad for p, _ in pairs if p.grad is not None]
            kept = [(p, e) for p, e in pairs if p.grad is not None]
            sq = products(g2, g2)
            if inv is not None:
                torch._foreach_mul_(sq, inv * inv)
            for (p, _), hu in zip(kept, products(sq, [e for _, e in kept])):
                self._hu[id(p)] = hu
        elif self.hypergrad == "fd":
            self._hu = self._finite_difference(ctx, params, pairs, inv)
        else:
            self._hu = self._exact_hvp(ctx, params, pairs)

    def _finite_difference(
        self,
        ctx: StepContext,
        params: list[Tensor],
        pairs: list[tuple[Tensor, Tensor]],
        inv: float | None,
    ) -> dict[int, Tensor]:
        r = self.fd_step
        perturbed_grads = [p.grad.clone() if p.grad is not None else None for p in params]
        torch._foreach_add_([p for p, _ in pairs], [e * r for _, e in pairs])
        if self._step_rng is not None:
            rng_restore(self._step_rng, ctx.device)
        # reduced like pass 2 (never inside no_sync): g~ above is all-reduced under DDP, so a
        # rank-local gradient here would put (local - global gradient) / r into H~u
        with frozen_bn(ctx.model) if ctx.model is not None else nullcontext():
            ctx.call()
        fd_grads = [p.grad for p in params if p.grad is not None]
        if ctx.scaler is not None and fd_grads and not bool(all_finite(fd_grads)):
            # this pass's backward is scaled, like pass 2's: an overflow here is one of the
            # step (optimizers.md §0). Its gradients stay in .grad, so the scaler skips the
            # base step and backs off; w is restored as after any pass 2, and no v is kept.
            return {}
        out = {}
        for p, g in zip(params, perturbed_grads):
            if g is not None and p.grad is not None:
                diff = (p.grad - g) / r
                out[id(p)] = diff * inv if inv is not None else diff
            p.grad = g
        return out

    def _exact_hvp(
        self, ctx: StepContext, params: list[Tensor], pairs: list[tuple[Tensor, Tensor]]
    ) -> dict[int, Tensor]:
        batch = ctx.batch
        if batch is None:
            raise SharpscopeError(
                "LETS hypergrad='hvp' needs a sharpscope.optim.BatchClosure (it re-evaluates the "
                "batch with a double backward); use hypergrad='diag' or 'fd' with a plain closure"
            )
        module = unwrap_model(batch.model)
        tangent_of = {id(p): e for p, e in pairs}
        tangents = [tangent_of.get(id(p), torch.zeros_like(p)) for p in params]
        if self._step_rng is not None:
            rng_restore(self._step_rng, ctx.device)
        # reverse-over-reverse HVP at w + eps, BN statistics untouched
        with frozen_bn(module), torch.enable_grad():
            with batch.autocast(), twice_differentiable():
                loss = batch.loss_fn(module(batch.inputs), batch.targets)
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            hvps = _hessian_products(
                [grads[i] for i in used], [params[i] for i in used], [tangents[i] for i in used]
            )
        self.gradient_passes += 2
        return {
            id(params[i]): (h if h is not None else torch.zeros_like(params[i])).detach()
            for i, h in zip(used, hvps)
        }

    def _coefficients(self) -> dict[int, Tensor | float]:
        base = self.base
        out: dict[int, Tensor | float] = {}
        if isinstance(base, torch.optim.Adam):
            for group in base.param_groups:
                beta1, beta2 = group["betas"]
                lr, eps = float(group["lr"]), float(group["eps"])
                for p in group["params"]:
                    if id(p) not in self._hu:
                        continue
                    st = base.state[p]
                    step = float(st["step"])
                    v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
                    denom = v.sqrt() / (1 - beta2**step) ** 0.5 + eps
                    out[id(p)] = (lr * (1 - beta1) / (1 - beta1**step)) / denom
        elif isinstance(base, torch.optim.SGD):
            for group in base.param_groups:
                lr, mu = float(group["lr"]), float(group["momentum"])
                damp, nesterov = float(group["dampening"]), bool(group["nesterov"])
                for p in group["params"]:
                    first = self._sgd_first.get(id(p), True)
                    c = 1.0 if (mu == 0 or first) else 1.0 - damp
                    out[id(p)] = lr * (1.0 + mu * c if nesterov else c)
        else:
            for group in base.param_groups:
                for p in group["params"]:
                    out[id(p)] = float(group["lr"])
        return out

    def _after_base_step(self, ctx: StepContext) -> None:
        coef = self._coefficients()
        params = [p for g in self.param_groups for p in g["params"] if id(p) in self._hu]
        scalar: dict[float, list[Tensor]] = {}  # SGD: one coefficient for many tensors
        for p in params:
            c = coef[id(p)]
            if isinstance(c, Tensor):
                self.state[p]["v"] = self._hu[id(p)] * c
            else:
                scalar.setdefault(c, []).append(p)
        for c, group in scalar.items():
            for p, v in zip(group, torch._foreach_mul([self._hu[id(q)] for q in group], c)):
                self.state[p]["v"] = v
        self._hu = {}

    # ------------------------------------------------------------------ state

    def _variant_state(self) -> dict[str, Any]:
        return {
            "v": self._per_param_state("v"),
            "val_count": self._val.count,
            "inner": self.inner._variant_state(),
        }

    def rank_state(self) -> dict[str, Any]:
        """``v`` comes from this rank's own batch; the inner variant's per-rank state too."""
        return {"v": self._per_param_state("v"), "inner": self.inner.rank_state()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self._load_per_param_state("v", state.get("v", {}))
        if state.get("inner") is not None:
            self.inner.load_rank_state(state["inner"])

    def derive_rank_state(self, rank: int) -> None:
        self.inner.derive_rank_state(rank)

    def _check_variant_state(self, state: dict[str, Any]) -> None:
        self._check_variant_keys(state, ("v", "val_count", "inner"))
        self._check_per_param_state("v", state.get("v", {}))
        state_count("val_count", state.get("val_count", 0))
        inner = state.get("inner", {})
        if not isinstance(inner, dict):
            raise SharpscopeError(f"LETS state inner must be a dict, got {type(inner).__name__}")
        self.inner._check_variant_state(inner)

    def _load_variant_state(self, state: dict[str, Any]) -> None:  # checked before
        self._load_per_param_state("v", state.get("v", {}))
        self._val.count = state_count("val_count", state.get("val_count", 0))
        self.inner._load_variant_state(state.get("inner", {}))

    def _rho_state(self) -> Tensor:
        return self._rho_t.clone()

    def _check_rho_state(self, value: Any) -> None:
        self._rho_from_state(value)

    def _rho_from_state(self, value: Any) -> Tensor:
        try:
            rho = torch.as_tensor(value, dtype=self._rho_t.dtype)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SharpscopeError(
                f"checkpoint rho must be a number or a tensor, got {value!r}"
            ) from exc
        if rho.shape != self._rho_t.shape:
            raise SharpscopeError(
                f"checkpoint rho has shape {tuple(rho.shape)}, this LETS expects "
                f"{tuple(self._rho_t.shape)} (per_group must match)"
            )
        return rho

    def _load_rho_state(self, value: Any) -> None:
        self._rho_t.copy_(self._rho_from_state(value))

    def metrics(self) -> dict[str, float | str | None]:
        """Per-step values to log: rho (and rho_k per group), F, h and the hypergrad mode.

        ``lets_F`` is ``None`` while no finite F has been measured: before the first step
        that gets past pass 1 (with an fp16 ``GradScaler``, every step the scaler skipped
        so far) and after a validation pass that overflowed.
        """
        out: dict[str, float | str | None] = {"rho": self.rho}
        if self.per_group:
            for k, v in enumerate(self.rho_values()):
                out[f"rho_{k}"] = v
        # a NaN read as a divergence in train (the scaler's back-off is not one) and is no JSON
        F = float(self.last_F)
        out["lets_F"] = F if math.isfinite(F) else None
        out["lets_h"] = float(self.last_h.mean())
        out["hypergrad"] = self.hypergrad
        return out
