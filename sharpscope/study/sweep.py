"""Sweep expansion: a :class:`StudyConfig` -> one :class:`RunSpec` per training run.

The semantics (which axis applies to which optimizer, what is recorded when it does
not) are documented in :mod:`sharpscope.study.config`. Every run records the same
hyperparameter keys (:data:`PARAM_COLUMNS`), so the results table is rectangular;
``None`` means "not applicable" (SGD has no ρ).

Run ids are readable and stable: the optimizer label, then ``<short><value>`` for every
axis that takes more than one value in the study, and always the seed, e.g.
``sam-rho0.1-lr0.05-s1``.

>>> from sharpscope.study.config import study_config_from_dict
>>> config = study_config_from_dict({
...     "train": {"epochs": 2},
...     "sweep": {"optimizer": ["sgd", "sam"], "rho": [0.05, 0.1], "seed": [0, 1]}})
>>> [r.run_id for r in expand_sweep(config)]  # SGD once per seed, not once per rho
['sgd-s0', 'sgd-s1', 'sam-rho0.05-s0', 'sam-rho0.1-s0', 'sam-rho0.05-s1', 'sam-rho0.1-s1']
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from ..columns import PARAM_COLUMNS  # also importable from here
from ..errors import SharpscopeError, caller_level
from .config import (
    AXIS_SHORT,
    BASE_DEFAULTS,
    BASE_OPTIMIZERS,
    GLOBAL_AXES,
    M_SUPPORTED,
    OPTIMIZER_AXES,
    TWO_PASS,
    StudyConfig,
    optimizer_name,
)

# ρ defaults written into every spec, so the recorded value is the one used (optimizers.md)
RHO_DEFAULTS = {
    "sam": 0.05,
    "asam": 0.5,
    "vasso": 0.05,
    "lets": 0.05,
    "samon": 0.5,
    "bsam": 0.01,
}
BSAM_DEFAULTS = {"lr": 0.5, "rho": 0.01}


@dataclass
class RunSpec:
    """One training run of a study and what to analyse on it."""

    run_id: str
    params: dict[str, Any]
    train: dict[str, Any]
    analysis_epochs: list[int]
    swept: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict, stored as ``runs/<run_id>/run.json``."""
        return asdict(self)


def _base_spec(name: str, config: StudyConfig, override: dict[str, Any] | None) -> dict[str, Any]:
    configured = config.optimizers.get("base", {})
    spec = {"name": name, **BASE_DEFAULTS.get(name, {})}
    if configured.get("name", "sgd") == name:
        spec.update(configured)
    if override:
        if override.get("name", name) != name:
            spec = {"name": override["name"], **BASE_DEFAULTS.get(override["name"], {})}
        spec.update(override)
    return spec


def optimizer_spec(label: str, config: StudyConfig) -> dict[str, Any]:
    """The full optimizer spec of a label before sweep values are applied."""
    name = optimizer_name(label, config.optimizers)
    entry = copy.deepcopy(config.optimizers.get(label, {}))
    if label == "base":
        entry = {}
    entry.pop("name", None)
    if name in BASE_OPTIMIZERS:
        return _base_spec(name, config, {"name": name, **entry})
    if name == "bsam":
        return {"name": "bsam", **BSAM_DEFAULTS, **entry}
    base_override = entry.pop("base", None)
    configured = config.optimizers.get("base", {"name": "sgd"})
    base_name = (base_override or {}).get("name", configured.get("name", "sgd"))
    base = _base_spec(base_name, config, base_override)
    spec = {"name": name, "rho": RHO_DEFAULTS[name], **entry, "base": base}
    return spec


def _applies(axis: str, spec: dict[str, Any]) -> bool:
    name = spec["name"]
    if axis == "rho":
        return name in TWO_PASS or name == "bsam"
    if axis == "m":
        return name in M_SUPPORTED
    if axis == "lr":
        return True
    base = spec if name in BASE_OPTIMIZERS else spec.get("base")
    if base is None:  # bsam: no momentum / weight decay of a base
        return False
    if axis == "momentum":
        return base["name"] == "sgd"
    return axis == "weight_decay"


#: what each optimizer axis needs, for the message of :func:`check_axes_apply`
_AXIS_TAKERS = {
    "rho": ", ".join((*TWO_PASS, "bsam")),
    "m": ", ".join(M_SUPPORTED),
    "momentum": "sgd and the optimizers over an SGD base",
    "weight_decay": "every optimizer but bsam",
}


def check_axes_apply(config: StudyConfig) -> None:
    """Refuse an optimizer axis given as one list that applies to none of
    ``sweep.optimizer``: it would collapse to one run per optimizer without a word (a
    forgotten ``"sam"`` under a ρ sweep, an Adam base under a momentum sweep). An axis that
    applies to some of them collapses for the others, as the module docstring says; a
    per-optimizer table is checked by :func:`expand_sweep`.

    Raises:
        SharpscopeError: naming the axis, the optimizers and those it applies to.
    """
    labels = list(config.sweep["optimizer"])
    specs = [optimizer_spec(label, config) for label in labels]
    for axis, takers in _AXIS_TAKERS.items():
        values = config.sweep.get(axis)
        if values is None or isinstance(values, dict):
            continue
        if not any(_applies(axis, spec) for spec in specs):
            raise SharpscopeError(
                f"sweep.{axis} applies to none of sweep.optimizer ({', '.join(labels)}), so "
                f"it would sweep nothing; {axis} applies to {takers}: add one of them, or "
                f"remove sweep.{axis}"
            )


def warn_if_lets_holds_out_alone(config: StudyConfig) -> None:
    """Warn when LETS shares a study with other optimizers and ``[train] dataset`` sets no
    ``val_fraction``: the trainer then holds out 10% of the training set for LETS alone (its
    radius is learned there), so LETS trains on other examples than its neighbours, and the
    analyses, which read the training split, include examples LETS never trained on."""
    names = {optimizer_spec(label, config)["name"] for label in config.sweep["optimizer"]}
    dataset = config.train.get("dataset")
    if "lets" not in names or len(names) < 2:
        return
    if isinstance(dataset, dict) and dataset.get("val_fraction"):
        return
    from ..trainer import LETS_VAL_FRACTION as share

    others = ", ".join(sorted(names - {"lets"}))
    warnings.warn(
        f"sweep.optimizer puts lets beside {others}: LETS holds out {share:.0%} of the "
        f"training set to learn its radius (val_fraction = {share}), so it trains on other "
        f"examples than they do; set val_fraction = {share} in [train] dataset to hold out "
        "the same examples in every run",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def _set_optimizer_axis(spec: dict[str, Any], axis: str, value: Any) -> None:
    if axis in ("rho", "m"):
        spec[axis] = value
        return
    target = spec if spec["name"] in BASE_OPTIMIZERS or spec["name"] == "bsam" else spec["base"]
    target[axis] = value


def _recorded(spec: dict[str, Any], axis: str) -> Any:
    if not _applies(axis, spec):
        return None
    if axis in ("rho", "m"):
        return spec.get(axis)
    target = spec if spec["name"] in BASE_OPTIMIZERS or spec["name"] == "bsam" else spec["base"]
    return target.get(axis, 0.0 if axis in ("momentum", "weight_decay") else None)


def format_value(value: Any) -> str:
    """Compact text of a hyperparameter value for run ids and column names.

    >>> format_value(0.05), format_value(5e-4), format_value(128), format_value(True)
    ('0.05', '0.0005', '128', 'true')
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value == int(value) and abs(value) < 1e6:
            return str(int(value)) if value != 0 else "0"
        return f"{value:g}" if abs(value) >= 1e-4 else f"{value:.0e}"
    if isinstance(value, dict):
        return str(value.get("name", value.get("factory", "model")))
    return str(value)


def _model_label(spec: dict[str, Any]) -> str:
    name = str(spec.get("name", spec.get("factory", "model"))).rsplit(":", 1)[-1]
    extra = {k: v for k, v in spec.items() if k not in ("name", "factory")}
    if not extra:
        return name
    digest = hashlib.sha1(json.dumps(extra, sort_keys=True).encode()).hexdigest()[:6]
    return f"{name}_{digest}"


def _width_and_depth(spec: dict[str, Any]) -> dict[str, Any]:
    """The width and depth a model is built with: a registered model's defaults where its
    spec leaves them out (a swept ``{name = "mlp"}`` is 256 wide and 2 deep: it does not
    inherit ``[train] model``'s), ``None`` where the model has no such option.

    >>> _width_and_depth({"name": "mlp", "depth": 1}), _width_and_depth({"name": "resnet20"})
    ({'width': 256, 'depth': 1}, {'width': 16, 'depth': None})
    """
    from ..models import resolved_model_spec

    try:
        resolved = resolved_model_spec(spec)
    except SharpscopeError:  # checked, with its message, where the config is validated
        resolved = spec
    return {"width": resolved.get("width"), "depth": resolved.get("depth")}


def sanitize_name(text: str) -> str:
    """``text`` with anything but letters, digits and ._+- replaced: a file or folder name."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "run"


def _axis_values(config: StudyConfig, axis: str, label: str) -> list[Any] | None:
    values = config.sweep.get(axis)
    if values is None:
        return None
    if isinstance(values, dict):
        return values.get(label)
    return values


def expand_sweep(config: StudyConfig) -> list[RunSpec]:
    """All runs of a study, in a stable order (optimizer, then the axes in config order).

    Raises:
        SharpscopeError: a per-optimizer axis value for an optimizer it cannot apply to,
            analysis epochs beyond a run's training epochs, or duplicate runs.
    """
    from ..trainer import TrainConfig

    train_base = dict(config.train)
    defaults = TrainConfig()
    runs: list[RunSpec] = []
    global_axes = [a for a in GLOBAL_AXES if a in config.sweep]
    for label in config.sweep["optimizer"]:
        spec0 = optimizer_spec(label, config)
        opt_axes: list[tuple[str, list[Any]]] = []
        for axis in OPTIMIZER_AXES:
            values = _axis_values(config, axis, label)
            if values is None:
                continue
            if not _applies(axis, spec0):
                if isinstance(config.sweep.get(axis), dict):
                    raise SharpscopeError(
                        f"sweep.{axis} gives values for '{label}', but {axis} does not apply to "
                        f"{spec0['name']}"
                    )
                continue  # collapses: recorded as not applicable
            opt_axes.append((axis, values))
        axes = [(a, config.sweep[a]) for a in global_axes] + opt_axes
        for combo in itertools.product(*(values for _, values in axes)):
            chosen = dict(zip((a for a, _ in axes), combo))
            spec = copy.deepcopy(spec0)
            for axis, _ in opt_axes:
                _set_optimizer_axis(spec, axis, chosen[axis])
            train = copy.deepcopy(train_base)
            train["optimizer"] = spec
            train["seed"] = chosen.get("seed", train.get("seed", defaults.seed))
            for key in ("batch_size", "epochs"):
                if key in chosen:
                    train[key] = chosen[key]
            dataset = dict(train.get("dataset", defaults.dataset))
            if "label_noise" in chosen:
                dataset["label_noise"] = chosen["label_noise"]
            train["dataset"] = dataset
            model = dict(chosen.get("model", train.get("model", defaults.model)))
            for key in ("width", "depth"):
                if key in chosen:
                    model[key] = chosen[key]
            train["model"] = model
            train.setdefault("progress", False)
            epochs = int(train.get("epochs", defaults.epochs))
            params = {
                "optimizer": label,
                "optimizer_name": spec["name"],
                "base": spec["base"]["name"] if "base" in spec else None,
                "rho": _recorded(spec, "rho"),
                "m": _recorded(spec, "m"),
                "lr": _recorded(spec, "lr"),
                "momentum": _recorded(spec, "momentum"),
                "weight_decay": _recorded(spec, "weight_decay"),
                "batch_size": int(train.get("batch_size", defaults.batch_size)),
                "epochs": epochs,
                "label_noise": float(dataset.get("label_noise", 0.0)),
                "seed": int(train["seed"]),
                "model": _model_label(model),
                **_width_and_depth(model),
            }
            analysis_epochs = resolve_epochs(config.analysis.epochs, epochs, label)
            requested = [e for e in analysis_epochs if e < epochs]
            user_every = int(train.get("save_every", 0) or 0)
            every = math.gcd(*requested, user_every) if requested else user_every
            train["save_every"] = every
            runs.append(RunSpec("", params, train, analysis_epochs))
    _check_optimizer_specs(runs)
    _assign_ids(runs, config.sweep)
    return runs


def _check_optimizer_specs(runs: list[RunSpec]) -> None:
    """Refuse unknown optimizer keys before anything trains (one line, from the factory)."""
    from ..optim.factory import resolve_optimizer_spec

    seen: set[str] = set()
    for run in runs:
        spec = run.train["optimizer"]
        key = json.dumps(spec, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            _build_on_a_toy_model(resolve_optimizer_spec(copy.deepcopy(spec)))
        except SharpscopeError as exc:
            raise SharpscopeError(f"optimizer '{run.params['optimizer']}': {exc}") from exc


def _build_on_a_toy_model(spec: dict[str, Any]) -> None:
    """Construct the optimizer once on a two-unit network: its own checks of every value
    (``rho = "big"``, a negative lr) then fail here, not after the other runs have trained."""
    import torch
    from torch import nn

    from ..optim.factory import build_optimizer

    toy = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))  # SAM-ON finds a norm layer
    pair = (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    build_optimizer(spec, toy, num_data=4, val_batches=pair, steps_per_epoch=1)


def resolve_epochs(epochs: list[int | str], total: int, label: str = "") -> list[int]:
    """Analysis epochs as sorted integers (``"last"`` -> ``total``).

    >>> resolve_epochs([2, "last", 4], 6)
    [2, 4, 6]
    """
    out = set()
    for epoch in epochs:
        value = total if epoch == "last" else int(epoch)
        if value > total:
            raise SharpscopeError(
                f"analysis.epochs asks for epoch {value}, but the '{label}' runs train only "
                f"{total} epoch{'s' if total != 1 else ''}"
            )
        out.add(value)
    return sorted(out)


def swept_axes(runs: list[RunSpec], axes: Iterable[str] | None = None) -> list[str]:
    """Hyperparameters that take more than one (applicable) value across the runs.

    Args:
        runs: the runs of a study.
        axes: the axes of its ``[sweep]`` (default: every hyperparameter column); a
            value that differs between optimizers only by their defaults (SAM's ρ vs
            ASAM's) is not a swept axis.
    """
    out = []
    allowed = set(axes) | {"optimizer"} if axes is not None else None
    for key in PARAM_COLUMNS:
        if key in ("optimizer_name", "base"):
            continue
        if allowed is not None and key not in allowed:
            continue
        values = {json.dumps(r.params.get(key)) for r in runs if r.params.get(key) is not None}
        if key == "optimizer":
            values = {r.params["optimizer"] for r in runs}  # type: ignore[misc]
        if len(values) > 1:
            out.append(key)
    return out


def id_parts(swept: Iterable[str], *runs: RunSpec) -> list[str]:
    """The ``<short><value>`` parts of a run id (``rho0.1``, ``lr0.05``): the swept values of
    ``runs`` but the optimizer and the seed, in axis order, each once (two runs: the tag of
    an interpolation between them)."""
    parts: list[str] = []
    for key in swept:
        if key in ("optimizer", "seed"):
            continue
        for run in runs:
            value = run.params.get(key)
            part = f"{AXIS_SHORT[key]}{format_value(value)}" if value is not None else None
            if part is not None and part not in parts:
                parts.append(part)
    return parts


def _assign_ids(runs: list[RunSpec], axes: Iterable[str]) -> None:
    swept = swept_axes(runs, axes)
    for run in runs:
        parts = [run.params["optimizer"], *id_parts(swept, run), f"s{run.params['seed']}"]
        run.run_id = sanitize_name("-".join(parts))
        run.swept = list(swept)
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.run_id] = seen.get(run.run_id, 0) + 1
    duplicates = [k for k, v in seen.items() if v > 1]
    for run in runs:
        if run.run_id in duplicates:
            digest = hashlib.sha1(
                json.dumps(run.train, sort_keys=True, default=str).encode()
            ).hexdigest()[:8]
            run.run_id = f"{run.run_id}-{digest}"
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        raise SharpscopeError("the sweep produces identical runs; remove the duplicate values")
