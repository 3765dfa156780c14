"""The two-pass step every sharpness-aware optimizer shares (optimizers.md §0).

It is the step of SAM (Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-aware minimization
for efficiently improving generalization", ICLR 2021, arXiv:2010.01412, Algorithm 1),
with the ascent direction ``eps`` left to the variant.

One call per batch, ``loss = opt.step(closure)``:

1. pass 1 at ``w``: ``g = grad L_B(w)`` (BatchNorm running statistics are updated here);
2. ``eps = self.perturbation(params, grads)`` under ``no_grad``;
3. back up the tensors that move (a copy), ``w <- w + eps``;
4. pass 2 on the same batch at ``w + eps``: ``g~ = grad L_B(w + eps)``;
5. restore ``w`` by copying the backup back (never ``w - eps``: subtraction is not
   exact in floating point and would break "rho = 0 gives the base optimizer exactly");
6. optional clipping of ``g~`` (``max_grad_norm``), then ``base.step()`` with ``g~``.

The pass-1 loss is returned. With ``rho == 0`` passes 2-5 are skipped and the step is
exactly the base optimizer's.

Shared options (every variant takes them as keywords):

* ``bn_policy``: ``"first"`` (default) saves the running mean/var/``num_batches_tracked``
  of every ``_BatchNorm`` (and any module with ``running_mean``/``running_var`` buffers)
  before pass 2 and copies them back after it, so only pass 1 updates them; pass 2 still
  normalises with batch statistics (train mode). ``"both"`` lets both passes update
  them, as the VaSSO, SAM-ON and bSAM reference code does.
* ``same_noise`` (default ``True``): the global RNG state is restored before pass 2 so
  dropout/drop-path masks equal pass 1's (the JAX SAM reference reuses its PRNG key).
* ``perturbation``: under ``DistributedDataParallel``, ``"local"`` runs pass 1 (forward
  and backward) inside ``model.no_sync()`` so each rank perturbs with its own sub-batch
  gradient (the SAM paper's m-sharpness with m = per-rank batch); ``"global"`` lets DDP
  all-reduce ``g`` before ``eps`` is computed. Pass 2 is always all-reduced by DDP.
* ``max_grad_norm``: global-norm clipping of ``g~`` after the all-reduce (clipping
  pass 1 is pointless for SAM: its direction is normalised).
* ``m``: m-sharpness training (SAM paper, §4.1), see :mod:`sharpscope.optim.msam`.
* ``model``: the network, needed to find BatchNorm layers and ``no_sync`` when the
  closure is a plain function (a :class:`~sharpscope.optim.closure.BatchClosure`
  carries it). Passing the module itself as ``params`` also works.
* ``scaler``: an fp16 ``torch.amp.GradScaler`` used by a plain closure (a
  ``BatchClosure`` carries its own). Each pass's backward is scaled by the closure;
  the optimizer unscales ``g`` before computing ``eps`` and ``g~`` before the base step,
  skips the base step (weights restored) when either pass overflowed, and calls
  ``scaler.update()``. Do not call ``scaler.step``/``scaler.update`` yourself.

The base optimizer is built on the wrapper's parameter groups and the wrapper then
*shares* its ``param_groups`` list, so an LR scheduler attached to either moves the LR
the base uses. ``state_dict()`` is ``{"optimizer": <the spec name of the optimizer that wrote it>,
"base": base.state_dict(), "variant": <the variant's persistent tensors>, "rho": ...,
"rng": <the optimizer's own generator state or None>}``; backups are transient and never
saved. ``load_state_dict`` refuses another optimizer's state (states without
``"optimizer"``, written by earlier versions, load as before);
``load_base_state_dict`` takes the base part alone (SGD first, then SAM).

A variant overrides :meth:`SharpnessAware.perturbation` (returning ``None`` for tensors
it does not move) and, where it mixes gradients differently, :meth:`combine`.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from numbers import Real
from typing import Any, ClassVar, Literal, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import SharpscopeError, check_bool, check_choice, first_line
from ._ops import NORM_EPS, all_finite, as_scalar, global_norm, scaled
from .closure import BatchClosure, check_scaler, unwrap_model

__all__ = [
    "SharpnessAware",
    "SinglePass",
    "BNPolicy",
    "PerturbationMode",
    "batchnorm_buffers",
    "frozen_bn",
]

BNPolicy = Literal["first", "both"]
PerturbationMode = Literal["local", "global"]
_BN_POLICIES = get_args(BNPolicy)
_PERTURBATION_MODES = get_args(PerturbationMode)


# --------------------------------------------------------------------------- BatchNorm


def batchnorm_modules(model: nn.Module) -> list[nn.Module]:
    """Modules whose running statistics a forward pass in train mode updates.

    ``_BatchNorm`` (BatchNorm1d/2d/3d, SyncBatchNorm, LazyBatchNorm) and any other module
    carrying ``running_mean``/``running_var`` tensors (custom BN classes escape an
    ``isinstance`` check: mlcommons/algorithmic-efficiency PR #325).
    """
    found = []
    for module in unwrap_model(model).modules():
        if isinstance(module, _BatchNorm) or any(
            isinstance(getattr(module, name, None), Tensor)
            for name in ("running_mean", "running_var")
        ):
            found.append(module)
    return found


def _module_stat_buffers(modules: Iterable[nn.Module]) -> list[Tensor]:
    out = []
    for module in modules:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            value = getattr(module, name, None)
            if isinstance(value, Tensor):
                out.append(value)
    return out


def batchnorm_buffers(model: nn.Module) -> list[Tensor]:
    """Running mean, running var and ``num_batches_tracked`` of every BN-like module."""
    return _module_stat_buffers(batchnorm_modules(model))


@contextmanager
def frozen_bn(model: nn.Module) -> Iterator[None]:
    """Run the body with BatchNorm running statistics restored afterwards.

    The body still normalises with batch statistics when the model is in train mode
    (never switch BN to eval for the second pass: davda54/sam #30). The buffers are
    copied back, not recomputed, so they are bit-identical to before.

    >>> bn = nn.BatchNorm1d(2)
    >>> with frozen_bn(bn):
    ...     _ = bn(torch.randn(4, 2))
    >>> bn.running_mean.tolist(), int(bn.num_batches_tracked)
    ([0.0, 0.0], 0)
    """
    buffers = batchnorm_buffers(model)
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, saved)


class _BatchNormCache:
    """Finds a model's BN modules once and saves/restores their buffers without allocating."""

    def __init__(self) -> None:
        self._model: weakref.ref | None = None
        self._modules: list[nn.Module] = []
        self._saved: list[Tensor] = []

    def buffers(self, model: nn.Module) -> list[Tensor]:
        if self._model is None or self._model() is not model:
            self._modules = batchnorm_modules(model)
            self._model = weakref.ref(model)
        return _module_stat_buffers(self._modules)

    @contextmanager
    def frozen(self, model: nn.Module | None) -> Iterator[None]:
        buffers = self.buffers(model) if model is not None else []
        if not buffers:
            yield
            return
        if len(self._saved) != len(buffers) or any(
            s.shape != b.shape or s.dtype != b.dtype or s.device != b.device
            for s, b in zip(self._saved, buffers)
        ):
            self._saved = [torch.empty_like(b) for b in buffers]
        with torch.no_grad():
            torch._foreach_copy_(self._saved, buffers)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(buffers, self._saved)


# --------------------------------------------------------------------------- RNG


def rng_snapshot(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The global CPU RNG state and, on CUDA, that device's RNG state."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def rng_restore(snapshot: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    """Undo the draws made since :func:`rng_snapshot`."""
    torch.set_rng_state(snapshot[0])
    if snapshot[1] is not None:
        torch.cuda.set_rng_state(snapshot[1], device)


# --------------------------------------------------------------------------- step context


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _closure_arguments_error(args: tuple[Any, ...], exc: TypeError) -> SharpscopeError:
    if args:
        return SharpscopeError(
            "splitting the batch needs a closure that accepts (chunk_index, num_chunks), "
            f"e.g. sharpscope.optim.BatchClosure: {exc}"
        )
    return SharpscopeError(
        "the closure must take no arguments (or (chunk_index, num_chunks) with splits), "
        f"e.g. sharpscope.optim.BatchClosure: {exc}"
    )


class StepContext:
    """What one ``step(closure)`` knows: the closure, the model, the scaler, DDP."""

    def __init__(self, opt: SharpnessAware, closure: Callable[..., Any]) -> None:
        self.opt = opt
        self.closure = closure
        self.batch = closure if isinstance(closure, BatchClosure) else None
        self.model: nn.Module | None = self.batch.model if self.batch is not None else opt.model
        self.scaler = self.batch.scaler if self.batch is not None else opt.scaler
        if self.scaler is not None and not self.scaler.is_enabled():
            self.scaler = None
        self.ddp = self.model if self.model is not None and _is_ddp(self.model) else None
        self.loss_fn = (
            self.batch.loss_fn if self.batch is not None else getattr(opt, "loss_fn", None)
        )
        self.autocast = self.batch.autocast if self.batch is not None else nullcontext
        self.device = opt._device()

    def call(self, chunk_index: int | None = None, num_chunks: int | None = None) -> Tensor:
        """Run the closure once (one forward+backward pass) and return its loss.

        The gradients are cleared first, so a closure that forgets ``zero_grad()`` (the
        davda54/sam style, where the closure only runs forward and backward) still hands
        each pass its own gradient instead of silently accumulating onto the last one.
        """
        for group in self.opt.param_groups:
            for p in group["params"]:
                p.grad = None
        # a step called inside the caller's torch.autocast: the region keeps one cast copy
        # of each weight, and pass 2 ran at the unperturbed weights' (SAM became SGD)
        torch.clear_autocast_cache()
        args = () if chunk_index is None else (chunk_index, num_chunks)
        with torch.enable_grad():
            try:
                loss = self.closure(*args)
            except TypeError as exc:
                # raised by the call itself (no frame of the closure ran): the closure does
                # not take these arguments; a TypeError from inside it is the user's own
                if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                    raise _closure_arguments_error(args, exc) from None
                raise
        self.opt.gradient_passes += 1.0 / float(num_chunks or 1) if args else 1
        if loss is None:
            raise SharpscopeError("the closure returned None; return the loss from the closure")
        if isinstance(loss, Tensor):
            return scalar_loss(loss, "the closure").detach()
        if isinstance(loss, Real) and not isinstance(loss, bool):
            return torch.as_tensor(loss)
        raise SharpscopeError(
            f"the closure returned a {type(loss).__name__}; return the loss alone (keep "
            "outputs such as logits in a variable outside the closure)"
        )

    def local_sync(self) -> AbstractContextManager:
        """``model.no_sync()`` under DDP with ``perturbation="local"``, else a no-op."""
        if self.ddp is not None and self.opt.perturbation_mode == "local":
            return self.ddp.no_sync()
        return nullcontext()

    def unscale_(self, grads: Sequence[Tensor]) -> bool:
        """Divide scaled pass-1 gradients by the loss scale; ``False`` on inf/NaN.

        Under DDP with ``perturbation="local"`` pass 1's gradients are each rank's own, so
        the ranks agree first (one all-reduce): a rank that overflowed alone skipped pass 2
        while the others ran its all-reduce, which then met the next step's. On a rank
        whose own gradients were finite they are made NaN, so that its scaler also skips
        the base step and backs off, and every rank keeps the same weights and scale."""
        if self.scaler is None or not grads:
            return True
        grads = list(grads)
        torch._foreach_mul_(grads, 1.0 / float(self.scaler.get_scale()))
        finite = all_finite(grads)
        if self.ddp is not None and self.opt.perturbation_mode == "local" and _world_size() > 1:
            agreed = finite.to(torch.float32)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            if not bool(agreed) and bool(finite):
                torch._foreach_mul_(grads, math.nan)
            return bool(agreed)
        return bool(finite)


def scalar_loss(loss: Tensor, who: str) -> Tensor:
    """``loss`` if it is one number (0-dim or one element), else one line: per-example
    losses were returned as "the loss" by five optimizers and broke LETS' rho update.

    >>> scalar_loss(torch.ones(4), "the closure")
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: the closure returned a tensor of shape (4,); return the loss as one number (e.g. loss.mean() of per-example losses)
    """
    if loss.numel() != 1:
        raise SharpscopeError(
            f"{who} returned a tensor of shape {tuple(loss.shape)}; return the loss as one "
            "number (e.g. loss.mean() of per-example losses)"
        )
    return loss


def _is_ddp(model: nn.Module) -> bool:
    return isinstance(model, nn.parallel.DistributedDataParallel) or (
        hasattr(model, "no_sync") and isinstance(getattr(model, "module", None), nn.Module)
    )


def _check_rho(rho: float, name: str = "rho") -> float:
    if isinstance(rho, bool):  # float(True) is 1.0
        raise SharpscopeError(f"{name} must be a number >= 0, got {rho!r}")
    try:
        value = float(rho)
    except (TypeError, ValueError) as exc:
        raise SharpscopeError(f"{name} must be a number >= 0, got {rho!r}") from exc
    if not value >= 0 or value == float("inf"):
        raise SharpscopeError(f"{name} must be a finite number >= 0, got {rho!r}")
    return value


# --------------------------------------------------------------------------- base class


def as_number(name: str, value: Any) -> float:
    """``value`` as a float (``"0.1"`` is fine), or one line naming the option."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise SharpscopeError(f"{name} must be a number, got {value!r}") from None


def finite_number(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a finite float >= 0 (> 0 with ``positive``), or one line naming the
    option: an infinite one trained to a NaN loss blamed on the learning rate.

    >>> finite_number("s_init", float("inf"), positive=True)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: s_init must be a finite number > 0, got inf
    """
    number = as_number(name, value)
    if not (number > 0 if positive else number >= 0) or number == float("inf"):
        bound = "> 0" if positive else ">= 0"
        raise SharpscopeError(f"{name} must be a finite number {bound}, got {value!r}")
    return number


def two_betas(value: Any) -> tuple[float, float]:
    """``betas`` as two floats in [0, 1) (Adam's and bSAM's moment decays), else one line.

    >>> two_betas([0.9, 0.999])
    (0.9, 0.999)
    """
    betas = None
    if hasattr(value, "tolist") and not isinstance(value, (tuple, list)):
        value = value.tolist()  # a tensor or an ndarray, as torch's Adam takes them
    if isinstance(value, (tuple, list)) and len(value) == 2:
        try:
            betas = (as_number("betas", value[0]), as_number("betas", value[1]))
        except SharpscopeError:
            betas = None
    if betas is None or not all(0.0 <= b < 1.0 for b in betas):
        raise SharpscopeError(f"betas must be two numbers in [0, 1), got {value!r}")
    return betas


def check_rates(options: dict[str, Any]) -> None:
    """The learning rate and weight decay among ``options`` are finite numbers >= 0, else
    one line: NaN trained to a NaN loss, reported as a divergence ("lower the learning
    rate"), when it came from a config file or ``--opt`` rather than ``--lr``.

    >>> check_rates({"lr": float("nan")})
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: lr must be a finite number >= 0, got nan
    """
    for name in ("lr", "weight_decay"):
        value = options.get(name)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = float(value)
        if isinstance(value, str):  # float() would read it, torch's optimizers would not
            raise SharpscopeError(f"{name} must be a number, got {value!r} (str)")
        if value is not None:
            _check_rho(value, name)


def _check_loaded_base(base: torch.optim.Optimizer) -> None:
    """A loaded base state's learning rates and weight decays are numbers >= 0
    (:func:`check_rates`), and its per-parameter tensors have their parameter's shape."""
    for group in base.param_groups:
        check_rates(group)
        for param in group["params"]:
            for name, value in base.state.get(param, {}).items():
                if isinstance(value, Tensor) and value.dim() > 0 and value.shape != param.shape:
                    raise SharpscopeError(
                        f"its {name} has shape {tuple(value.shape)}, its parameter "
                        f"{tuple(param.shape)}"
                    )


def check_momentum(value: Any) -> None:
    """SGD's ``momentum`` in [0, 1), else one line: torch refuses only negative values,
    and with 1 or more the steps grow without bound.

    >>> check_momentum(0.9)
    """
    if isinstance(value, Tensor) and value.numel() == 1:
        value = float(value)
    if isinstance(value, Real) and not isinstance(value, bool) and not 0 <= value < 1:
        raise SharpscopeError(
            "momentum must be in [0, 1) (the fraction of the last step kept; "
            f"1 or more makes the steps grow without bound), got {value!r}"
        )


#: torch bases whose ``betas`` are two decays in [0, 1); torch checks only the ones it
#: indexes (``[0.9]`` was an IndexError, three values a failure at the first step)
_TWO_BETA_BASES: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
)


#: the base optimizers' numeric options that sharpscope checks itself (a TOML typo such
#: as a string is named; a value beyond the parameters' dtype is refused)
_NUMBER_OPTIONS = ("lr", "momentum", "weight_decay", "dampening")


def state_count(name: str, value: Any) -> int:
    """A step or batch counter read from a checkpoint, as an int >= 0, else one line."""
    try:
        count = int(value)
    except (TypeError, ValueError, RuntimeError):
        count = -1
    if isinstance(value, bool) or count < 0:
        raise SharpscopeError(f"optimizer state {name} must be an integer >= 0, got {value!r}")
    return count


@functools.cache
def _constructor_options(cls: type) -> frozenset[str]:
    """Keyword-only options of ``cls`` and its bases' ``__init__`` (and ``from_model``)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        for attr in ("__init__", "from_model"):
            fn = klass.__dict__.get(attr)
            fn = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
            if callable(fn):
                names.update(
                    p.name
                    for p in inspect.signature(fn).parameters.values()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY
                )
    return frozenset(names)


def _positive_or_none(name: str, value: Any) -> float | None:
    """``value`` as a float > 0, or None; one line otherwise."""
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not number > 0:
        raise SharpscopeError(f"{name} must be > 0 or None, got {value!r}")
    return number


def _check_first_order(base: type[torch.optim.Optimizer]) -> None:
    """One line for a base that cannot take the step the wrapper gives it: another
    sharpness-aware optimizer (its step needs a closure; nest nothing, pick one variant)
    or one whose ``step`` needs a closure of its own (LBFGS re-evaluates the loss)."""
    if issubclass(base, SharpnessAware):
        raise SharpscopeError(
            f"base must be a plain torch optimizer such as torch.optim.SGD, not the "
            f"sharpness-aware {base.__name__} (the wrapper takes the two passes itself)"
        )
    try:
        closure = inspect.signature(base.step).parameters.get("closure")
    except (TypeError, ValueError):  # no signature to read: let it try
        return
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise SharpscopeError(
            f"base {base.__name__} needs a closure in its own step (it evaluates the loss "
            "itself), which the sharpness-aware step cannot give it; use a first-order "
            "optimizer such as torch.optim.SGD or Adam"
        )


_NO_TWO_STEP = (
    "sharpscope's optimizers have no first_step/second_step (davda54/sam): pass a closure "
    "that runs forward and backward, opt.step(closure), which takes both passes"
)


class SharpnessAware(torch.optim.Optimizer):
    """Base class of the two-pass optimizers; see the module docstring for the step.

    Args:
        params: parameters or parameter groups, or the model itself (then also used as
            ``model``).
        base: the base optimizer *class* (``torch.optim.SGD``, ``Adam``, ``AdamW``, ...);
            it receives ``g~`` and ``**base_kwargs``.
        rho: radius of the perturbation (>= 0).
        bn_policy: ``"first"`` or ``"both"`` (which passes update BN running statistics).
        same_noise: restore the global RNG before pass 2 (same dropout masks).
        perturbation: ``"local"`` or ``"global"`` perturbation under DDP (default: the
            variant's, ``"local"`` except VaSSO).
        max_grad_norm: clip ``g~`` to this global norm before the base step.
        m: m-sharpness group size (SAM, ASAM, SAM-ON only; needs a ``BatchClosure``).
        model: the network (BN layers, ``no_sync``), if ``params`` is not the model.
        scaler: fp16 ``GradScaler`` for plain closures.
        **base_kwargs: the base optimizer's options (``lr``, ``momentum``, ...).

    Raises:
        SharpscopeError: on a negative rho, an unknown choice, a non-optimizer base.
    """

    #: variants whose perturbation is a pure function of (params, grads) support ``m``.
    supports_m: ClassVar[bool] = True
    default_perturbation: ClassVar[PerturbationMode] = "local"
    #: the spec name (``build_optimizer`` key).
    name: ClassVar[str] = "sam"
    #: options given to the optimizer as a whole that are not constructor keywords
    #: (LETS's ``inner_options``); a parameter group may not carry them either.
    extra_options: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        rho: float = 0.05,
        bn_policy: BNPolicy = "first",
        same_noise: bool = True,
        perturbation: PerturbationMode | None = None,
        max_grad_norm: float | None = None,
        m: int | None = None,
        model: nn.Module | None = None,
        scaler: Any = None,
        **base_kwargs: Any,
    ) -> None:
        if isinstance(params, nn.Module):
            model = params if model is None else model
            params = params.parameters()
        if model is not None and not isinstance(model, nn.Module):  # else failed at step 1
            raise SharpscopeError(
                f"model must be the network (an nn.Module), got {type(model).__name__}"
            )
        self.model = model
        check_scaler(scaler)
        self.scaler = scaler
        self.rho = rho
        check_choice("bn_policy", bn_policy, _BN_POLICIES)
        self.bn_policy = bn_policy
        self.same_noise = check_bool("same_noise", same_noise)
        perturbation = self.default_perturbation if perturbation is None else perturbation
        check_choice("perturbation", perturbation, _PERTURBATION_MODES)
        self.perturbation_mode = perturbation
        self.max_grad_norm = _positive_or_none("max_grad_norm", max_grad_norm)
        if m is not None:
            if not self.supports_m:
                raise SharpscopeError(
                    f"m-sharpness training (m={m}) is supported by sam, asam and samon, "
                    f"not by {self.name}; leave m unset"
                )
            if isinstance(m, bool) or not isinstance(m, (int, float)) or int(m) != m or m < 1:
                raise SharpscopeError(f"m must be a positive integer group size, got {m!r}")
            if perturbation == "global":
                raise SharpscopeError(
                    "m-sharpness perturbs per group of m examples; it cannot be combined with "
                    "perturbation='global' (use 'local')"
                )
            m = int(m)
        self.m = m
        if not (isinstance(base, type) and issubclass(base, torch.optim.Optimizer)):
            given = f"an instance of {type(base).__name__}" if not isinstance(base, type) else base
            raise SharpscopeError(
                f"base must be a torch.optim.Optimizer class such as torch.optim.SGD (its options "
                f"go to this optimizer as keywords), got {given}"
            )
        _check_first_order(base)
        try:
            super().__init__(params, {})
        except (TypeError, ValueError) as exc:
            raise SharpscopeError(
                f"params must be the model or an iterable of parameters or parameter groups: "
                f"{first_line(exc) or type(exc).__name__}"
            ) from exc
        for group in self.param_groups:  # torch only warns; a perturbation would add twice
            seen: set[int] = set()
            for p in group["params"]:
                if id(p) in seen:
                    raise SharpscopeError(
                        f"a parameter group lists the same tensor (shape {tuple(p.shape)}) "
                        "twice, e.g. a tied weight given through both modules: it would be "
                        "perturbed and counted twice; give model.parameters() (each tensor once)"
                    )
                seen.add(id(p))
        for key in _NUMBER_OPTIONS:  # a TOML typo, named
            value = base_kwargs.get(key)
            number = isinstance(value, (Real, Tensor)) and not isinstance(value, bool)
            if value is not None and not number:
                raise SharpscopeError(f"{key} must be a number, got {value!r}")
        if "betas" in base_kwargs and issubclass(base, _TWO_BETA_BASES):
            two_betas(base_kwargs["betas"])
        check_momentum(base_kwargs.get("momentum"))
        self._check_fits_dtype({"rho": self.rho, **base_kwargs})
        try:
            self.base = base(self.param_groups, **base_kwargs)
        except (TypeError, ValueError, IndexError, KeyError) as exc:  # e.g. betas[1] of (0.9,)
            raise SharpscopeError(
                f"the base optimizer {base.__name__} refused its options: "
                f"{first_line(exc) or type(exc).__name__}"
            ) from exc
        self.param_groups = self.base.param_groups
        for group in self.param_groups:
            self._check_group_options(group)
            check_momentum(group.get("momentum"))  # a group's own momentum too
            check_rates(group)  # torch takes a NaN lr or weight decay (NaN weights at step 1)
        self.defaults.update(self.base.defaults)
        self.base.register_step_post_hook(self._mark_base_stepped)
        self._base_stepped = False
        self._bn = _BatchNormCache()
        self._backups: dict[int, Tensor] = {}
        self._warned_no_model = False
        #: forward+backward passes this optimizer has run (closure calls, validation and
        #: HVP passes); not saved in ``state_dict``. Used by the benchmark.
        self.gradient_passes = 0.0

    # ------------------------------------------------------------------ copy and pickle

    #: attributes a copy rebuilds empty (their factories): per-step buffers keyed by
    #: ``id(tensor)``, which a copy's tensors do not share, and the BatchNorm cache, whose
    #: weakref pickle refuses
    _transient: ClassVar[dict[str, Callable[[], Any]]] = {
        "_backups": dict,
        "_bn": _BatchNormCache,
        "_msam_used": type(None),
    }
    #: attributes holding sets of ``id(parameter)`` (ASAM's unscaled tensors, SAM-ON's
    #: perturbed ones): a copy carries the tensors themselves and takes their new ids
    _id_sets: ClassVar[tuple[str, ...]] = ()

    def __getstate__(self) -> dict[str, Any]:
        """What ``copy.deepcopy(opt)``, ``pickle`` and ``torch.save(opt)`` keep: every
        attribute (base, rho, model, the variant's own), so that the copy steps as this
        optimizer does. torch's ``Optimizer.__getstate__`` keeps only ``defaults``,
        ``state`` and ``param_groups``, which left a copy without ``base`` that failed at
        its first step. Registered hooks are left out, as torch leaves them out.
        """
        state = {
            key: value
            for key, value in self.__dict__.items()
            if key not in self._transient
            and not (key.startswith("_optimizer_") and key.endswith("_hooks"))
        }
        if self._id_sets:
            tensors = {id(p): p for p in self._all_params()}
            if isinstance(self.model, nn.Module):
                tensors.update((id(p), p) for p in unwrap_model(self.model).parameters())
            for key in self._id_sets:
                if key in state:
                    state[key] = [tensors[i] for i in state[key] if i in tensors]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        whole = "base" in state  # not torch's partial {"state", "param_groups"} update
        if whole:
            for key in self._id_sets:
                if key in state:
                    state[key] = {id(p) for p in state[key]}
        super().__setstate__(state)
        if whole:
            for key, factory in self._transient.items():
                self.__dict__[key] = factory()
            self.base.register_step_post_hook(self._mark_base_stepped)

    # ------------------------------------------------------------------ plumbing

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the base optimizer (so its defaults fill the group: sam PR #65)."""
        base = self.__dict__.get("base")
        if base is None:
            super().add_param_group(param_group)
        else:
            self._check_group_options(param_group)
            base.add_param_group(param_group)
            self.param_groups = base.param_groups
            self._params_added(list(base.param_groups[-1]["params"]))

    def _params_added(self, params: list[Tensor]) -> None:
        """Hook: ``params`` joined by :meth:`add_param_group` after construction (a
        variant that sorts its parameters, such as ASAM's biases, sorts these too)."""

    def _check_group_options(self, group: dict[str, Any]) -> None:
        """Refuse a group key that is an option of this optimizer, not of its base.

        The base reads its own keys (``lr``, ``weight_decay``, ...) per group; this
        optimizer's options (``rho``, ``eta``, ...) hold for all groups, so such a key in a
        group, e.g. davda54/sam's per-group ``rho`` or ``adaptive``, would be ignored.
        """
        own = _constructor_options(type(self)) | set(self.extra_options)
        options = own | {"rho", "adaptive"}  # davda54/sam keeps both in every group
        refused = sorted((set(group) & options) - set(self.base.defaults) - {"params"})
        if not refused:
            return
        key = "rho" if "rho" in refused else refused[0]
        cls = type(self).__name__
        if key not in own:
            raise SharpscopeError(
                f"per-group {key} is not supported: {cls} has no {key} option (davda54/sam's "
                "adaptive=True is sharpscope.optim.ASAM); remove it from the parameter group"
            )
        where = f"{cls}(inner_options=...)" if key in self.extra_options else cls
        per_group = key == "rho" and self.name != "bsam"
        hint = " (LETS(per_group=True) learns one rho per group)" if per_group else ""
        raise SharpscopeError(
            f"per-group {key} is not supported: {cls} uses one {key} for all parameter "
            f"groups; remove it from the group and give it to {where}{hint}"
        )

    def _check_fits_dtype(self, options: dict[str, Any]) -> None:
        """One line for a number the parameters' dtype cannot hold (``rho=1e39`` with
        float32 weights overflowed in the first step, a traceback from the CLI)."""
        dtypes = {p.dtype for g in self.param_groups for p in g["params"] if p.is_floating_point()}
        if not dtypes:
            return
        narrowest = min(dtypes, key=lambda d: torch.finfo(d).max)
        limit = torch.finfo(narrowest).max
        for key in ("rho", *_NUMBER_OPTIONS):
            value = options.get(key)
            if isinstance(value, Real) and not isinstance(value, bool) and abs(value) > limit:
                raise SharpscopeError(
                    f"{key} = {value:g} is larger than the parameters' "
                    f"{str(narrowest).removeprefix('torch.')} can hold ({limit:.3g})"
                )

    def _mark_base_stepped(self, *_: Any) -> None:
        self._base_stepped = True

    def _device(self) -> torch.device:
        for group in self.param_groups:
            for p in group["params"]:
                return p.device
        return torch.device("cpu")

    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _params_with_grads(self) -> tuple[list[Tensor], list[Tensor]]:
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise SharpscopeError(
                    "sparse gradients are not supported by sharpness-aware optimizers; "
                    "use dense embeddings (sparse=False)"
                )
        return params, [p.grad for p in params]

    def _require_gradients(self, params: Sequence[Tensor]) -> None:
        """One line when none of ``params`` got a gradient: the closure forgot ``backward()``."""
        if not any(p.grad is not None for p in params):
            raise SharpscopeError(
                f"{self.name}: the closure left no gradients; it must call loss.backward() "
                "(or use sharpscope.optim.BatchClosure)"
            )

    def _backup(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Copies of ``tensors`` in buffers reused from step to step."""
        out = []
        for t in tensors:
            buf = self._backups.get(id(t))
            if (
                buf is None
                or buf.shape != t.shape
                or buf.dtype != t.dtype
                or buf.device != t.device
            ):
                buf = torch.empty_like(t, memory_format=torch.preserve_format)
                self._backups[id(t)] = buf
            out.append(buf)
        if out:
            torch._foreach_copy_(out, list(tensors))
        return out

    def _context(self, closure: Callable[..., Any] | None) -> StepContext:
        if closure is None:
            raise SharpscopeError(
                f"{type(self).__name__}.step needs a closure that zeroes the gradients, runs "
                "forward and backward and returns the loss: opt.step(closure)"
            )
        ctx = StepContext(self, closure)
        if ctx.model is None:
            if self.bn_policy == "first" and not self._warned_no_model:
                warnings.warn(
                    f"{type(self).__name__} was not given the model: if it has BatchNorm, "
                    "its running statistics also move in the second pass (bn_policy 'first' "
                    "freezes them there); pass model=... (or the module as params) or use "
                    "sharpscope.optim.BatchClosure",
                    stacklevel=4,
                )
                self._warned_no_model = True
            if self.perturbation_mode == "local" and _world_size() > 1:
                raise SharpscopeError(
                    "distributed training with perturbation='local' needs the DDP model to "
                    "call no_sync(): pass model=<the DDP module> or use BatchClosure"
                )
        return ctx

    def bn_frozen(self, ctx: StepContext) -> AbstractContextManager:
        """Freeze BN running statistics for a pass that must not update them."""
        return self._bn.frozen(ctx.model)

    def _second_pass_bn(self, ctx: StepContext) -> AbstractContextManager:
        return self.bn_frozen(ctx) if self.bn_policy == "first" else nullcontext()

    # ------------------------------------------------------------------ hooks

    def perturbation(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor | None]:
        """The ascent step ``eps`` for each tensor (``None``: the tensor does not move)."""
        raise NotImplementedError

    def combine(self, clean: list[Tensor], perturbed: list[Tensor]) -> list[Tensor]:
        """Gradients handed to the base optimizer; SAM-style variants use ``perturbed``."""
        return perturbed

    def clip_gradients(self) -> None:
        """Clip the gradients the base step will use (``max_grad_norm``) to a global norm."""
        if self.max_grad_norm is None:
            return
        params = [p for p in self._all_params() if p.grad is not None]
        if params:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm, foreach=True)

    def _skip_second_pass(self) -> bool:
        return self.rho == 0.0

    def _first_pass_context(self, ctx: StepContext) -> AbstractContextManager:
        return ctx.local_sync()

    def _before_perturbation(
        self, ctx: StepContext, loss: Tensor, params: list[Tensor], grads: list[Tensor]
    ) -> None:
        """Called after pass 1 (unscaled ``grads``), before ``eps`` (LETS updates rho here)."""

    def _after_second_pass(
        self, ctx: StepContext, params: list[Tensor], moved: list[Tensor], eps: list[Tensor]
    ) -> None:
        """Called while the weights are still at ``w + eps`` (LETS's HVP modes)."""

    def _after_base_step(self, ctx: StepContext) -> None:
        """Called after a base step that actually ran (not after an fp16 skip)."""

    # ------------------------------------------------------------------ state

    # Each part has a check that raises and changes nothing, so that load_state_dict can
    # refuse a state before it replaces any of the optimizer's own.

    def _variant_state(self) -> dict[str, Any]:
        return {}

    def _check_variant_state(self, state: dict[str, Any]) -> None:
        if state:
            raise SharpscopeError(
                f"{type(self).__name__} has no variant state but the checkpoint has {sorted(state)}"
            )

    def _load_variant_state(self, state: dict[str, Any]) -> None:
        """Load a variant state :meth:`_check_variant_state` has accepted (nothing here)."""

    def _check_variant_keys(self, state: dict[str, Any], allowed: tuple[str, ...]) -> None:
        """Refuse a variant state with keys this optimizer does not keep: another
        variant's state (a LETS state into VaSSO would drop VaSSO's ``d`` silently)."""
        unknown = sorted(set(state) - set(allowed))
        if unknown:
            raise SharpscopeError(
                f"{type(self).__name__} keeps no {', '.join(map(repr, unknown))} in its state: "
                "the checkpoint holds another optimizer's; load it into an optimizer built "
                "from the same spec and model"
            )

    def _rho_state(self) -> Any:
        return self.rho

    def _check_rho_state(self, value: Any) -> None:
        _check_rho(value)

    def _load_rho_state(self, value: Any) -> None:
        self.rho = value

    def _rng_state(self) -> Tensor | None:
        return None

    def _check_rng_state(self, state: Tensor | None) -> None:
        pass

    def _load_rng_state(self, state: Tensor | None) -> None:
        pass

    def rank_state(self) -> dict[str, Any] | None:
        """The part of the state that differs between DDP ranks (``None``: nothing does).

        :meth:`state_dict` is one process's state; under torchrun the trainer also saves
        each rank's :meth:`rank_state` and gives it back with :meth:`load_rank_state`, so
        every rank resumes with its own (bSAM's noise generator, LETS' ``v``).
        """
        return None

    def load_rank_state(self, state: dict[str, Any]) -> None:
        """Load this rank's part saved by :meth:`rank_state`."""

    def derive_rank_state(self, rank: int) -> None:
        """Make this rank's part its own when none was saved for it (a resume with more
        processes): by default the loaded state (rank 0's) is kept as it is."""

    def _per_param_state(self, key: str) -> dict[int, Tensor]:
        return {
            i: self.state[p][key]
            for i, p in enumerate(self._all_params())
            if p in self.state and key in self.state[p]
        }

    def _check_per_param_state(self, key: str, values: Any) -> None:
        params = self._all_params()
        count = len(params)
        if not isinstance(values, dict):
            raise SharpscopeError(
                f"optimizer state {key!r} must map parameter indices to tensors, got "
                f"{type(values).__name__}"
            )
        for i, value in values.items():
            if not isinstance(value, Tensor):
                raise SharpscopeError(
                    f"optimizer state {key!r} of parameter {i} is a {type(value).__name__}, "
                    "not a tensor"
                )
            try:
                index = int(i)
            except (TypeError, ValueError):
                index = -1
            if not 0 <= index < count:
                raise SharpscopeError(
                    f"optimizer state refers to parameter {i!r} but there are {count}; "
                    "load it into the same model"
                )
            if value.shape != params[index].shape:  # else a traceback at the next step
                raise SharpscopeError(
                    f"optimizer state {key!r} of parameter {i} has shape {tuple(value.shape)}, "
                    f"the parameter {tuple(params[index].shape)}; load it into the same model"
                )

    def _load_per_param_state(self, key: str, values: dict[int, Tensor]) -> None:
        self._check_per_param_state(key, values)  # before anything is dropped
        params = self._all_params()
        for p in params:
            if p in self.state:
                self.state[p].pop(key, None)
        for i, value in values.items():
            i = int(i)
            self.state[params[i]][key] = value.detach().clone().to(params[i].device)

    def _state_name(self) -> str:
        """The ``"optimizer"`` entry of :meth:`state_dict`: the spec name (``sam``, ...)."""
        return self.name

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer", "base", "variant", "rho", "rng"}``: the spec name of the
        optimizer that wrote it and everything exact resumption needs.

        Hooks registered with ``register_state_dict_pre_hook``/``_post_hook`` run as in
        ``torch.optim.Optimizer.state_dict`` (a post hook may return a replacement).
        """
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = {
            "optimizer": self._state_name(),
            "base": self.base.state_dict(),
            "variant": self._variant_state(),
            "rho": self._rho_state(),
            "rng": self._rng_state(),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` and share the base's (new) ``param_groups`` again.

        Every part is checked before any is loaded: a state that does not fit raises one
        line and leaves the optimizer as it was. A state written by another optimizer
        (its ``"optimizer"`` entry; states written before sharpscope kept one are taken
        as they are) is refused: its rho and variant state would replace this one's. To
        go on from another optimizer's state, e.g. SGD for the first epochs and SAM for
        the last ones, load its base part alone with :meth:`load_base_state_dict`.

        What comes from the state and what from the constructor: rho (LETS' learned one
        too), the variant's tensors (VaSSO's ``d``, ...) and the base's parameter groups
        come from the state, so the group options do too, as in torch (``lr``, momentum,
        bSAM's ``num_data``, ``prior_precision``, ``damping``); the variant's other
        options (VaSSO's ``theta``, ASAM's ``eta``, LETS' ``rho_lr`` and ``hypergrad``,
        ``bn_policy``, ``max_grad_norm``, ...) stay the constructor's. To change rho after
        loading, set ``opt.rho``.

        Hooks registered with ``register_load_state_dict_pre_hook``/``_post_hook`` run as
        in ``torch.optim.Optimizer.load_state_dict``: a pre hook gets a shallow copy (and
        may return a replacement), a post hook runs once the state is loaded.
        """
        if not isinstance(state_dict, dict):
            raise SharpscopeError(
                f"not a {type(self).__name__} state dict: a {type(state_dict).__name__}, not a dict"
            )
        state_dict = dict(state_dict)  # shallow copy, as torch's
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
        missing = {"base", "variant", "rho", "rng"} - set(state_dict)
        if missing:
            raise SharpscopeError(
                f"not a {type(self).__name__} state dict (missing {sorted(missing)}); it needs "
                "the keys base, variant, rho, rng"
            )
        owner, name = state_dict.get("optimizer"), self._state_name()
        if owner is not None and owner != name:
            raise SharpscopeError(
                f"this state was written by the {owner} optimizer, not by {name} (its rho and "
                f"variant state would replace this optimizer's); to go on from {owner} with "
                f"{name}, load its base optimizer's part alone: opt.load_base_state_dict(state)"
            )
        if not isinstance(state_dict["variant"], dict):
            raise SharpscopeError(
                f"not a {type(self).__name__} state dict: its variant part is a "
                f"{type(state_dict['variant']).__name__}, not a dict"
            )
        self._check_base_part(
            state_dict["base"], f"not a {type(self).__name__} state dict: its base part is"
        )
        self._check_variant_state(state_dict["variant"])
        self._check_rho_state(state_dict["rho"])
        self._check_rng_state(state_dict["rng"])
        self._load_base_state(state_dict["base"])
        self.param_groups = self.base.param_groups
        self._load_variant_state(state_dict["variant"])
        self._load_rho_state(state_dict["rho"])
        self._load_rng_state(state_dict["rng"])
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def load_base_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load only the base optimizer's state (momentum buffers, Adam moments, learning
        rates) and keep this optimizer's own rho and variant state.

        For going on from another optimizer's state, e.g. plain SGD for the first epochs
        and SAM for the last ones: ``state_dict`` is a sharpscope optimizer's
        :meth:`state_dict` (its ``"base"`` part is loaded) or a torch optimizer's own
        ``state_dict()`` (``torch.optim.SGD``'s, ...). The base must be of the same class.
        Unlike ``opt.base.load_state_dict``, the base's ``param_groups`` stay shared with
        this optimizer, so an LR scheduler attached to it still moves the LR the base uses.
        """
        base = state_dict.get("base") if isinstance(state_dict, dict) else None
        if not isinstance(base, dict):
            base = state_dict
        self._check_base_part(base, f"cannot load this into {type(self).__name__}'s base: it is")
        self._load_base_state(base)
        self.param_groups = self.base.param_groups

    def _check_base_part(self, base: Any, prefix: str) -> None:
        well_formed = (
            isinstance(base, dict)
            and isinstance(base.get("state"), dict)
            and isinstance(base.get("param_groups"), list)
            and all(isinstance(g, dict) for g in base["param_groups"])
        )
        if not well_formed:
            raise SharpscopeError(
                f"{prefix} not an optimizer state (a dict with a 'state' dict and a "
                "'param_groups' list)"
            )

    def _load_base_state(self, state: dict[str, Any]) -> None:
        """``base.load_state_dict``, undone when it fails or leaves a group without an option.

        torch rebinds ``base.state`` and ``base.param_groups`` to new objects only after its
        own checks (Adam's KeyError for an SGD state comes later), so binding the old ones
        again restores the base exactly.
        """
        base = self.base
        previous = (base.state, base.param_groups)
        try:
            base.load_state_dict(state)
        except (KeyError, ValueError) as exc:
            base.state, base.param_groups = previous
            if isinstance(exc, KeyError):  # Adam reading an SGD state's missing "step"
                self._refuse_base_state([str(exc.args[0])], exc)
            raise SharpscopeError(  # torch: another number of groups or of parameters
                f"cannot load this {type(self).__name__} state: "
                f"{first_line(exc) or type(exc).__name__}; load it into an optimizer built "
                "from the same spec and model"
            ) from exc
        # an option the groups had that one lacks after torch filled its own defaults (an
        # Adam state into SGD loads, and its first step fails on group["momentum"])
        options = {k for k in base.defaults if all(k in g for g in previous[1])}
        lacking = sorted({k for g in base.param_groups for k in options if k not in g})
        if lacking:
            base.state, base.param_groups = previous
            self._refuse_base_state(lacking, None)
        # values a hand-edited or foreign state holds that would fail only at the next step
        try:
            _check_loaded_base(base)
        except SharpscopeError as exc:
            base.state, base.param_groups = previous
            raise SharpscopeError(
                f"cannot load this {type(self).__name__} state: {exc}; load it into an "
                "optimizer built from the same spec and model"
            ) from exc

    def _refuse_base_state(self, keys: list[str], cause: BaseException | None) -> None:
        raise SharpscopeError(
            f"cannot load this {type(self).__name__} state: it is the state of a different "
            f"base optimizer than {type(self.base).__name__} (no {', '.join(map(repr, keys))}); "
            "load it into an optimizer built from the same spec and model"
        ) from cause

    # ------------------------------------------------------------------ the step

    @property
    def rho(self) -> float:
        """The perturbation radius ρ ≥ 0. Set it between steps (a ρ schedule, say) as a
        number; a negative, infinite or non-numeric ρ is refused in one line, as the
        constructor and ``load_state_dict`` refuse it (a negative ρ would ascend: anti-SAM)."""
        return self.__dict__["_rho"]

    @rho.setter
    def rho(self, value: float) -> None:
        self.__dict__["_rho"] = _check_rho(value)

    def _set_radius_tensor(self, rho: Tensor) -> None:
        """Set ρ to a tensor ≥ 0 unchecked: LETS hands its inner rule the learned radius
        this way, with no host synchronisation in the step."""
        self.__dict__["_rho"] = rho

    @property
    def base_optimizer(self) -> torch.optim.Optimizer:
        """davda54/sam's name for :attr:`base` (code ported from it keeps working)."""
        return self.base

    def first_step(self, *args: Any, **kwargs: Any) -> None:
        """Not offered: davda54/sam's two-step form. Raises a one-line pointer to ``step``."""
        raise SharpscopeError(_NO_TWO_STEP)

    def second_step(self, *args: Any, **kwargs: Any) -> None:
        """Not offered: davda54/sam's two-step form. Raises a one-line pointer to ``step``."""
        raise SharpscopeError(_NO_TWO_STEP)

    def step(self, closure: Callable[..., Any] | None = None) -> Tensor:  # type: ignore[override]
        """One optimisation step on the batch the closure evaluates; returns the pass-1 loss.

        Raises:
            SharpscopeError: without a closure, or with ``m`` and a plain closure.
        """
        ctx = self._context(closure)
        if self.m is not None and not self._skip_second_pass():
            from .msam import m_sharpness_step

            return m_sharpness_step(self, ctx)
        if self._skip_second_pass():
            loss = ctx.call()
            self._finish(ctx)
            return loss
        return self._two_pass_step(ctx)

    def _two_pass_step(self, ctx: StepContext) -> Tensor:
        rng = rng_snapshot(ctx.device) if self.same_noise else None
        self._step_rng = rng  # extra passes of a variant (LETS fd/hvp) reuse pass 1's noise
        with self._first_pass_context(ctx):
            loss = ctx.call()
        params, grads = self._params_with_grads()
        self._require_gradients(params)
        if not ctx.unscale_(grads):
            self._finish(ctx)  # the scaler sees the overflow, skips and backs off
            return loss
        with torch.no_grad():
            self._before_perturbation(ctx, loss, params, grads)
            eps = self.perturbation(params, grads)
        moved = [p for p, e in zip(params, eps) if e is not None]
        eps = [e for e in eps if e is not None]
        if moved:
            with torch.no_grad():
                backup = self._backup(moved)
                torch._foreach_add_(moved, eps)
            try:
                with self._second_pass_bn(ctx):
                    if rng is not None:
                        rng_restore(rng, ctx.device)
                    ctx.call()
                    with torch.no_grad():
                        self._after_second_pass(ctx, params, moved, eps)
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(moved, backup)
            perturbed = [p.grad for p in params]
            combined = self.combine(grads, perturbed)
            if combined is not perturbed:
                for p, g in zip(params, combined):
                    p.grad = g
        self._finish(ctx)
        return loss

    def _finish(self, ctx: StepContext) -> None:
        """Clip and take the base step (through the scaler when there is one)."""
        self._base_stepped = False
        if ctx.scaler is not None:
            ctx.scaler.unscale_(self.base)
            self.clip_gradients()
            ctx.scaler.step(self.base)
            ctx.scaler.update()
        else:
            self.clip_gradients()
            self.base.step()
        if self._base_stepped:
            with torch.no_grad():
                self._after_base_step(ctx)
        torch.clear_autocast_cache()  # the caller's region: its next pass sees the new weights


def normalised(tensors: list[Tensor], rho: Tensor | float) -> list[Tensor]:
    """``rho * t / ||t||`` with one global norm; zero (never NaN) when the norm is 0.

    >>> [e.tolist() for e in normalised([torch.tensor([3.0, 4.0])], 0.5)]
    [[0.30000001192092896, 0.4000000059604645]]
    """
    norm = global_norm(tensors)
    return scaled(tensors, as_scalar(rho, norm) / (norm + NORM_EPS))


class SinglePass(SharpnessAware):
    """The base optimizer alone (one pass per step) behind the same interface.

    ``build_optimizer({"name": "sgd"|"adam"|"adamw", ...})`` returns this, so the trainer
    treats every optimizer alike: ``opt.step(closure)``, fp16 ``GradScaler`` handling,
    ``max_grad_norm`` clipping and the ``{"optimizer", "base", "variant", "rho", "rng"}``
    state layout.
    Its steps are exactly the base optimizer's.

    >>> w = nn.Parameter(torch.tensor([1.0]))
    >>> opt = SinglePass([w], base=torch.optim.SGD, lr=0.5)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = (w**2).sum()
    ...     loss.backward()
    ...     return loss
    >>> _ = opt.step(closure); w.item()
    0.0
    """

    supports_m: ClassVar[bool] = False
    name: ClassVar[str] = "sgd"

    def _state_name(self) -> str:
        """``sgd``, ``adam`` or ``adamw``: the base optimizer alone, named by its class."""
        return type(self.base).__name__.lower()

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        base: type[torch.optim.Optimizer] = torch.optim.SGD,
        *,
        max_grad_norm: float | None = None,
        model: nn.Module | None = None,
        scaler: Any = None,
        **base_kwargs: Any,
    ) -> None:
        super().__init__(
            params,
            base,
            rho=0.0,
            bn_policy="both",
            same_noise=False,
            max_grad_norm=max_grad_norm,
            model=model,
            scaler=scaler,
            **base_kwargs,
        )

    def _skip_second_pass(self) -> bool:
        return True

    def _check_group_options(self, group: dict[str, Any]) -> None:
        pass  # the base optimizer alone, keys as torch takes them

    def _check_rho_state(self, value: Any) -> None:
        pass

    def _load_rho_state(self, value: Any) -> None:
        pass
