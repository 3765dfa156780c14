"""Build any optimizer from a spec dict (what the trainer, the CLI and checkpoints use).

A spec names the optimizer and gives hyperparameters by their constructor keyword names::

    {"name": "sam", "rho": 0.05, "m": 32,
     "base": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}}
    {"name": "sgd", "lr": 0.1, "momentum": 0.9}
    {"name": "lets", "inner": "asam", "rho": 0.5, "hypergrad": "diag"}
    {"name": "bsam", "lr": 0.5, "rho": 0.01, "prior_precision": 40, "splits": 1}

For the wrappers (sam, asam, vasso, lets, samon) the base optimizer's options may also be
given at the top level (``{"name": "sam", "lr": 0.1}``, like the constructors'
``**base_kwargs``), and ``"base"`` may be just a name (``"base": "adamw"``).
:func:`resolve_optimizer_spec` returns the canonical nested form with every default
filled in: store that in checkpoints. Unknown names or keys raise
:class:`~sharpscope.errors.SharpscopeError` listing the valid ones.

Trainer contract::

    opt = build_optimizer(spec, model, num_data=len(train_set),
                          val_batches=val_batches,          # LETS only (required there)
                          steps_per_epoch=len(train_loader))  # SAM-ON sam_epochs only
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max)  # moves the base LR
    for x, y in loader:
        loss = opt.step(BatchClosure(model, loss_fn, x, y, autocast_dtype=..., scaler=...))
        log(optimizer_metrics(opt))                         # {"rho": ...} / LETS: rho, F, ...
    ckpt["optimizer_state"] = opt.state_dict()              # exact resume: opt.load_state_dict

Every returned optimizer (plain SGD/Adam/AdamW included, see
:class:`~sharpscope.optim._base.SinglePass`) takes ``opt.step(closure)``, handles an fp16
``GradScaler`` carried by the closure, and clips with ``max_grad_norm``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import SharpscopeError, check_bool
from ._base import SharpnessAware, SinglePass, check_momentum, check_rates, two_betas
from .asam import ASAM
from .bsam import BSAM
from .lets import INNER_OPTIONS, LETS
from .sam import SAM
from .samon import SAMON
from .vasso import VaSSO

__all__ = [
    "OPTIMIZER_NAMES",
    "BASE_NAMES",
    "build_optimizer",
    "optimizer_options",
    "base_options",
    "optimizer_metrics",
    "resolve_optimizer_spec",
]

OPTIMIZER_NAMES: tuple[str, ...] = (
    "sgd",
    "adam",
    "adamw",
    "sam",
    "asam",
    "vasso",
    "lets",
    "samon",
    "bsam",
)

_BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    # SAM paper / SAM-ON reference CIFAR setting: SGD lr 0.1, momentum 0.9, wd 5e-4
    "sgd": (
        torch.optim.SGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4, "dampening": 0.0},
    ),
    # torch defaults
    "adam": (
        torch.optim.Adam,
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False},
    ),
    "adamw": (
        torch.optim.AdamW,
        {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False},
    ),
}
BASE_NAMES: tuple[str, ...] = tuple(_BASES)

_SHARED = {"bn_policy": "first", "same_noise": True, "perturbation": "local", "max_grad_norm": None}

_VARIANTS: dict[str, dict[str, Any]] = {
    "sam": {"rho": 0.05, "m": None, **_SHARED},
    "asam": {
        "rho": 0.5,
        "eta": 0.01,
        "adaptive": "elementwise",
        "normalize_bias": True,
        "m": None,
        **_SHARED,
    },
    "vasso": {"rho": 0.05, "theta": 0.9, **_SHARED, "perturbation": "global"},
    "samon": {
        "rho": 0.5,
        "adaptive": "none",
        "eta": 0.01,
        "normalize_bias": False,
        "exclude_norm": False,
        "fast_first_pass": False,
        "sam_epochs": None,
        "m": None,
        **_SHARED,
    },
    "lets": {
        "inner": "sam",
        "rho": 0.05,
        "rho_lr": 1e-4,
        "rho_min": 0.0,
        "rho_max": None,
        "hypergrad": "diag",
        "per_group": False,
        "fd_step": 1e-3,
        "val_batch_size": None,
        "val_seed": 0,
        # options of the inner variant; None = that variant's default
        "eta": None,
        "theta": None,
        "adaptive": None,
        "normalize_bias": None,
        "exclude_norm": None,
        **_SHARED,
    },
}
_BSAM = {
    "lr": 0.5,
    "betas": (0.9, 0.999),
    "rho": 0.01,
    "prior_precision": 40.0,
    "damping": 0.1,
    "s_init": 1.0,
    "splits": 1,
    "data_aug_factor": 1.0,
    "seed": 0,
    **_SHARED,
}
_CLASSES = {"sam": SAM, "asam": ASAM, "vasso": VaSSO, "lets": LETS, "samon": SAMON}


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name.lower() not in OPTIMIZER_NAMES:
        raise SharpscopeError(
            f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}"
        )
    return name.lower()


def base_options(name: str) -> dict[str, Any]:
    """Options (and defaults) of a base optimizer ``"sgd"``, ``"adam"`` or ``"adamw"``.

    >>> base_options("sgd")["lr"]
    0.1
    """
    if name not in _BASES:
        raise SharpscopeError(f"unknown base optimizer {name!r}; valid: {', '.join(BASE_NAMES)}")
    return copy.deepcopy(_BASES[name][1])


def optimizer_options(name: str, base: str = "sgd") -> dict[str, Any]:
    """Every option of optimizer ``name`` with its default, flat (CLI flags, validation).

    For the wrappers the base optimizer's options are included at the top level, with
    ``"base"`` the base's name; ``base`` picks which base's options are listed.

    >>> optimizer_options("sam")["rho"], optimizer_options("sam")["base"]
    (0.05, 'sgd')
    >>> sorted(optimizer_options("sgd"))
    ['dampening', 'lr', 'max_grad_norm', 'momentum', 'nesterov', 'weight_decay']
    """
    name = _check_name(name)
    if name in _BASES:
        return {**base_options(name), "max_grad_norm": None}
    if name == "bsam":
        return copy.deepcopy(_BSAM)
    return {**copy.deepcopy(_VARIANTS[name]), "base": base, **base_options(base)}


def resolve_optimizer_spec(spec: dict[str, Any] | str) -> dict[str, Any]:
    """The canonical spec: name, every option with its default, ``base`` as a nested dict.

    Raises:
        SharpscopeError: on an unknown optimizer, base or key (the message lists the
            valid ones), or a base option given twice with different values.

    >>> resolve_optimizer_spec({"name": "sam", "lr": 0.05})["base"]["lr"]
    0.05
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, dict) or "name" not in spec:
        raise SharpscopeError(
            f"an optimizer spec is a dict with a 'name' (one of {', '.join(OPTIMIZER_NAMES)}), "
            f"got {spec!r}"
        )
    given = dict(spec)
    name = _check_name(given.pop("name"))
    if name in _BASES or name == "bsam":
        defaults = optimizer_options(name)
        if "base" in given:
            raise SharpscopeError(f"{name} takes no 'base' (it is not a wrapper)")
        _reject_unknown(name, given, defaults)
        out = {"name": name, **defaults, **given}
        if "betas" in out:  # a TOML/JSON list becomes a tuple; a bad value is one line now
            out["betas"] = two_betas(out["betas"])
        check_momentum(out.get("momentum"))
        check_rates(out)
        _check_yes_no(given, defaults)
        return out
    variant = copy.deepcopy(_VARIANTS[name])
    base_spec = given.pop("base", None)
    if base_spec is None:
        base_spec = {"name": "sgd"}
    elif isinstance(base_spec, str):
        base_spec = {"name": base_spec}
    elif not isinstance(base_spec, dict):
        raise SharpscopeError(f"'base' must be a name or a dict with a name, got {base_spec!r}")
    base_spec = dict(base_spec)
    base_name = str(base_spec.pop("name", "sgd")).lower()
    base_defaults = base_options(base_name)
    _reject_unknown(f"base {base_name}", base_spec, base_defaults)
    top_base = {k: given.pop(k) for k in list(given) if k in base_defaults and k not in variant}
    for key, value in top_base.items():
        if key in base_spec and base_spec[key] != value:
            raise SharpscopeError(
                f"{key} is given twice with different values ({value!r} and base {key}="
                f"{base_spec[key]!r}); give it once"
            )
    _reject_unknown(name, given, {**variant, **base_defaults})
    base_full = {"name": base_name, **base_defaults, **top_base, **base_spec}
    if "betas" in base_full:
        base_full["betas"] = two_betas(base_full["betas"])
    check_momentum(base_full.get("momentum"))
    check_rates(base_full)
    _check_yes_no(base_full, base_defaults)
    _check_yes_no(given, variant)
    return {"name": name, **variant, **given, "base": base_full}


def _check_yes_no(given: dict[str, Any], defaults: dict[str, Any]) -> None:
    """The options whose default is True or False must be given as true or false: a TOML
    string "false" or ``--opt nesterov=no`` would be truthy and turn the option on."""
    for key, default in defaults.items():
        if isinstance(default, bool) and key in given:
            check_bool(key, given[key])


def _reject_unknown(what: str, given: dict[str, Any], valid: dict[str, Any]) -> None:
    """One line naming the keys ``what`` does not take; a single key that another
    optimizer takes is said to apply to those (``m does not apply to vasso (only to
    asam, sam, samon)``: the CLI turns the leading key into its flag)."""
    unknown = sorted(set(given) - set(valid))
    if not unknown:
        return
    valid_list = ", ".join(sorted(valid))
    takers = sorted(n for n in OPTIMIZER_NAMES if unknown[0] in _own_options(n))
    if len(unknown) == 1 and takers:
        raise SharpscopeError(
            f"{unknown[0]} does not apply to {what} (only to {', '.join(takers)}); "
            f"valid options of {what}: {valid_list}"
        )
    raise SharpscopeError(f"unknown option(s) {unknown} for {what}; valid: {valid_list}")


def _own_options(name: str) -> dict[str, Any]:
    """The options ``name`` takes itself (a wrapper's, without its base's)."""
    if name in _BASES:
        return optimizer_options(name)
    return _BSAM if name == "bsam" else _VARIANTS[name]


def build_optimizer(
    spec: dict[str, Any] | str,
    model: nn.Module,
    *,
    num_data: int,
    val_batches: Iterable[Any] | None = None,
    steps_per_epoch: int | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer ``spec`` names over all parameters of ``model``.

    Args:
        spec: optimizer spec (see the module docstring); a bare name is allowed.
        model: the network, possibly wrapped in ``DistributedDataParallel`` (used for
            ``no_sync``; BN and normalization layers are found in ``.module``).
        num_data: training set size (bSAM's N).
        val_batches: validation data for LETS (required for LETS, ignored otherwise): an
            iterable of ``(inputs, targets)`` batches, a pair of tensors or a DataSplit.
        steps_per_epoch: optimizer steps per epoch (SAM-ON ``sam_epochs``).

    Returns:
        A :class:`~sharpscope.optim._base.SharpnessAware` optimizer (``SinglePass`` for
        sgd/adam/adamw): ``loss = opt.step(closure)``, ``state_dict``/``load_state_dict``
        for exact resume, ``param_groups`` shared with the base optimizer.

    Raises:
        SharpscopeError: on an unknown name/key or an invalid value.
    """
    full = resolve_optimizer_spec(spec)
    name = full.pop("name")
    if name in _BASES:
        cls, _ = _BASES[name]
        max_grad_norm = full.pop("max_grad_norm")
        return SinglePass(
            model.parameters(), base=cls, model=model, max_grad_norm=max_grad_norm, **full
        )
    if name == "bsam":
        return BSAM(model.parameters(), num_data=num_data, model=model, **full)
    base_spec = full.pop("base")
    base_cls = _BASES[base_spec.pop("name")][0]
    options = {k: v for k, v in full.items() if v is not None}  # None = constructor default
    if name == "asam":
        normalize_bias = options.pop("normalize_bias")
        return ASAM.from_model(
            model, base_cls, normalize_bias=normalize_bias, **options, **base_spec
        )
    if name == "samon":
        return SAMON(model, base_cls, steps_per_epoch=steps_per_epoch, **options, **base_spec)
    if name == "lets":
        inner = options["inner"]
        if inner not in INNER_OPTIONS:
            raise SharpscopeError(
                f"unknown LETS inner variant {inner!r}; choose one of: {', '.join(INNER_OPTIONS)}"
            )
        inner_options = {
            k: options.pop(k)
            for k in ("eta", "theta", "adaptive", "normalize_bias", "exclude_norm")
            if k in options
        }
        stray = sorted(set(inner_options) - set(INNER_OPTIONS[inner]))
        if stray:
            raise SharpscopeError(
                f"option(s) {stray} do not apply to LETS with inner={inner!r}; valid inner "
                f"options: {sorted(INNER_OPTIONS[inner]) or 'none'}"
            )
        return LETS(
            model.parameters(),
            base_cls,
            model=model,
            val_batches=val_batches,
            inner_options=inner_options,
            **options,
            **base_spec,
        )
    return _CLASSES[name](model.parameters(), base_cls, model=model, **options, **base_spec)


def step_metrics(opt: torch.optim.Optimizer) -> dict[str, float | str | None]:
    """Values that change every step and are logged per step: LETS' (its learned ρ, F, h);
    nothing for the others, whose ρ is fixed (it is in every evaluation row)."""
    return opt.metrics() if isinstance(opt, LETS) else {}


def optimizer_metrics(opt: torch.optim.Optimizer) -> dict[str, float | str | None]:
    """Values recorded in every evaluation row: LETS ``rho, rho_k, lets_F, lets_h, hypergrad``;
    other sharpness-aware optimizers ``rho``; plain optimizers nothing.

    ``hypergrad`` (LETS only) is the mode's name, a string; ``lets_F`` is ``None`` until
    a finite F has been measured (see :meth:`LETS.metrics`). Reading the values
    synchronises with the device once.
    """
    if isinstance(opt, LETS):
        return opt.metrics()
    if isinstance(opt, SinglePass) or not isinstance(opt, SharpnessAware):
        return {}
    return {"rho": float(opt.rho)}
