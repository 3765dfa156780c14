"""Study configuration: the TOML schema, its validation, and the built-in configs.

A study file has these sections (every key is optional unless marked)::

    [study]
    name = "quick"                 # default: the file's stem
    description = "..."
    keep_checkpoints = "all"       # "all" | "analysed": delete epoch_NNN.pt not analysed

    [train]                        # TrainConfig keys shared by every run (not "out")
    dataset = {name = "mnist1d"}
    model = {name = "mlp", width = 128}
    epochs = 10
    batch_size = 128

    [optimizers]                   # hyperparameters per optimizer name (or per label)
    base = {name = "sgd", lr = 0.1, momentum = 0.9, weight_decay = 5e-4}
    sam = {rho = 0.05}
    asam = {rho = 0.5}
    sam-adam = {name = "sam", rho = 0.05, base = {name = "adam", lr = 1e-3}}

    [sweep]                        # axes; the runs are their cartesian product
    optimizer = ["sgd", "sam"]
    rho = [0.05, 0.1]              # or per optimizer: {sam = [0.05, 0.1], asam = [0.5, 1.0]}
    seed = [0, 1]

    [analysis]                     # what is measured on which checkpoints
    epochs = ["last"]              # epoch numbers and/or "last"
    samples = 1024                 # analysis subset of the training split, or "all"
    [analysis.spectrum]            # a measure runs when its table is present
    k = 5
    [analysis.m_sharpness]
    m = [16, 128]
    rho = [0.05, 0.1]

    [executor]                     # submitit parameters for --executor slurm
    timeout_min = 120
    slurm_partition = "gpu"

**Sweep semantics.** The runs are the cartesian product of the axes. The optimizer
axis lists names (sgd, adam, adamw, sam, asam, vasso, lets, samon, bsam) or labels
defined in ``[optimizers]``. Optimizer-specific axes apply only where they make sense:
``rho`` to the sharpness-aware optimizers and bSAM, ``m`` (m-sharpness training,
SAM paper §4.1) to SAM, ASAM and SAM-ON, ``momentum`` and ``weight_decay`` to
optimizers with an SGD/Adam base. For an optimizer an axis does not apply to, the axis
collapses to one run and the value is recorded as empty ("not applicable"): SGD is
trained once per (seed, lr, ...), not once per ρ. An axis given as a table keyed by
optimizer label (``rho = {sam = [...], asam = [...]}``) sweeps each optimizer over its
own values (ASAM's ρ lives on another scale); optimizers missing from the table keep
their configured value. ``lr``/``momentum``/``weight_decay`` set the base optimizer's
values (bSAM: its own ``lr``); ``label_noise`` sets the data set's symmetric label
noise; ``width``/``depth`` set model options; ``model`` lists whole model specs.

**Measures** (one table each under ``[analysis]``; see
:mod:`sharpscope.study.measures` for the columns they add): ``spectrum`` (options of
:func:`sharpscope.analysis.spectrum.spectrum`: ``k``, ``tol``, ``max_steps``,
``trace_probes``, ``num_probes``, ``num_lanczos_steps``, ...), ``m_sharpness`` and
``adaptive_sharpness`` (``m``, ``rho`` lists, ``steps``, ``norm``; adaptive also
``projection``, "exact" or "rescale", see :func:`~sharpscope.analysis.msharpness.m_sharpness`;
defaults as analysis.md section 5 gives them for studies: m 128, rho [0.05, 0.1] and
[0.5, 1.0], 20 Auto-PGD steps), ``average_sharpness``
(``rho``, ``adaptive``, ``adaptive_rho``, ``num_draws``, ``m``), ``keskar``
(``epsilon``, default [1e-3, 5e-4], ``iterations``, ``subspace_dim``), ``pac_bayes`` (``magnitude_aware``,
``target_drop``, ``num_draws``, ...) and ``landscape`` (``dims``, ``grid``, ``span``,
``directions``, ``norm``, ``bias``, ``interpolate = [["sgd", "sam"]]`` for the line
between the final solutions of two optimizers that share every other hyperparameter: one
file per pair, ``pairs/A__B__TAG.npz``, TAG the pair's swept values, e.g. ``rho0.1-lr0.05-s0``).
The weight norm is always recorded.

**Unknown keys or values** raise :class:`~sharpscope.errors.SharpscopeError` with one
line naming the key and the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import SharpscopeError, check_seed
from ..optim.factory import BASE_NAMES, OPTIMIZER_NAMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS = ("study", "train", "optimizers", "sweep", "analysis", "executor")
STUDY_KEYS = ("name", "description", "keep_checkpoints", "reproduction")
KEEP_CHECKPOINTS = ("all", "analysed")
REPRODUCTIONS = ("a", "b", "c", "d", "e", "f")

BASE_OPTIMIZERS = BASE_NAMES
TWO_PASS = tuple(n for n in OPTIMIZER_NAMES if n not in BASE_NAMES and n != "bsam")
M_SUPPORTED = ("sam", "asam", "samon")
BASE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
    "adam": {"lr": 1e-3},
    "adamw": {"lr": 1e-3, "weight_decay": 0.01},
}

# axis -> where it applies: "optimizer" axes depend on the optimizer
OPTIMIZER_AXES = ("rho", "m", "lr", "momentum", "weight_decay")
GLOBAL_AXES = ("seed", "batch_size", "epochs", "label_noise", "model", "width", "depth")
AXES = ("optimizer", *OPTIMIZER_AXES, *GLOBAL_AXES)
# short names used in run ids
AXIS_SHORT = {
    "rho": "rho",
    "m": "m",
    "lr": "lr",
    "momentum": "mom",
    "weight_decay": "wd",
    "seed": "s",
    "batch_size": "bs",
    "epochs": "ep",
    "label_noise": "noise",
    "model": "",
    "width": "w",
    "depth": "d",
}
# axes coupled with the optimizer for granulated Kendall: they change with it
OPTIMIZER_COUPLED = ("rho", "m")

ANALYSIS_KEYS = ("epochs", "samples", "split", "batch_size", "seed", "device")
#: the measures whose ``m`` cuts the analysis data into subsets of m examples
SUBSET_MEASURES = ("m_sharpness", "adaptive_sharpness", "average_sharpness")
MEASURES = (
    "spectrum",
    "m_sharpness",
    "adaptive_sharpness",
    "average_sharpness",
    "keskar",
    "pac_bayes",
    "landscape",
)
MEASURE_KEYS: dict[str, tuple[str, ...]] = {
    "m_sharpness": ("m", "rho", "steps", "norm", "seed"),
    "adaptive_sharpness": ("m", "rho", "steps", "norm", "projection", "seed"),
    "average_sharpness": ("rho", "adaptive", "adaptive_rho", "num_draws", "m", "seed"),
    "keskar": ("epsilon", "iterations", "subspace_dim", "seed"),
    "pac_bayes": (
        "target_drop",
        "magnitude_aware",
        "num_draws",
        "tolerance",
        "num_halvings",
        "seed",
    ),
    "landscape": ("dims", "grid", "span", "directions", "norm", "bias", "interpolate", "seed"),
}
SPLITS = ("train", "test")
EXECUTOR_PREFIXES = ("slurm_", "local_")
EXECUTOR_KEYS = (
    "timeout_min",
    "gpus_per_node",
    "cpus_per_task",
    "mem_gb",
    "nodes",
    "tasks_per_node",
    "name",
    "stderr_to_stdout",
)


def _fail(message: str) -> SharpscopeError:
    return SharpscopeError(message)


def _check_keys(where: str, values: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    for key in values:
        if key not in valid:
            raise _fail(f"unknown key '{key}' in {where}; valid keys: {', '.join(valid)}")


def _as_list(where: str, value: Any) -> list[Any]:
    if isinstance(value, list):
        if not value:
            raise _fail(f"{where} is an empty list; give at least one value")
        return list(value)
    return [value]


def _positive_int(where: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(f"{where} must be a positive integer, got {value!r}")
    return value


def _number(
    where: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    positive: bool = False,
) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(f"{where} must be a number, got {value!r}")
    if positive and not value > 0:
        raise _fail(f"{where} must be a number > 0, got {value!r}")
    if not (low <= value <= high) or not math.isfinite(value):
        raise _fail(f"{where} must be in [{low:g}, {high:g}], got {value!r}")
    return value


def _nonnegative_int(where: str, value: Any, what: str = "an integer") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _fail(f"{where} must be {what} >= 0, got {value!r}")
    return value


def _flag(where: str, value: Any) -> bool:
    """A TOML boolean (``"false"`` as a string would read as true)."""
    if not isinstance(value, bool):
        raise _fail(f"{where} must be true or false, got {value!r}")
    return value


# numeric options of the measures besides the seed (every measure's, 0 to 2^62), checked up
# front (the runs would fail only after training): key -> "int" (>= 1), "int0" (>= 0) or
# "pos" (a number > 0)
MEASURE_NUMBERS: dict[str, dict[str, str]] = {
    "spectrum": {
        "tol": "pos",
        "deflate": "int0",
        "batch_size": "int",
        "block_size": "int",
        "restart_size": "int",
    },
    "average_sharpness": {"num_draws": "int", "m": "int"},
    "keskar": {"iterations": "int", "subspace_dim": "int"},
    "pac_bayes": {
        "target_drop": "pos",
        "num_draws": "int",
        "tolerance": "pos",
        "num_halvings": "int",
    },
    "landscape": {"span": "pos"},
}


def _check_measure_numbers(measure: str, options: Mapping[str, Any]) -> None:
    for key, kind in {"seed": "seed", **MEASURE_NUMBERS.get(measure, {})}.items():
        value, where = options.get(key), f"analysis.{measure}.{key}"
        if value is None:
            continue
        if kind == "pos":
            _number(where, value, positive=True)
        elif kind == "seed":
            check_seed(where, value)
        elif kind == "int0":
            _nonnegative_int(where, value)
        else:
            _positive_int(where, value)


@dataclass
class AnalysisPlan:
    """What is measured on each run: checkpoints, data subset, measures and options."""

    epochs: list[int | str] = field(default_factory=lambda: ["last"])
    samples: int | None = 1024
    split: str = "train"
    batch_size: int | None = None
    seed: int = 0
    device: str | None = None
    measures: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (stored with every run, compared on resume)."""
        return dataclasses.asdict(self)

    def subset_sizes(self) -> list[tuple[str, int]]:
        """Every ``(measure, m)`` of the measures that cut the data into subsets of m."""
        pairs = []
        for measure in SUBSET_MEASURES:
            ms = self.measures.get(measure, {}).get("m")
            pairs += [(measure, m) for m in (ms if isinstance(ms, list) else [ms]) if m is not None]
        return pairs


@dataclass
class StudyConfig:
    """A validated study configuration (see the module docstring for the schema)."""

    name: str
    description: str = ""
    keep_checkpoints: str = "all"
    reproduction: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)
    analysis: AnalysisPlan = field(default_factory=AnalysisPlan)
    executor: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The configuration as TOML-ready sections."""
        analysis = self.analysis.to_dict()
        measures = analysis.pop("measures")
        all_examples = analysis["samples"] is None  # TOML has no null: "all" reads back as None
        analysis = {k: v for k, v in analysis.items() if v is not None}
        if all_examples:
            analysis["samples"] = "all"
        analysis.update(measures)
        study = {"name": self.name, "description": self.description}
        study["keep_checkpoints"] = self.keep_checkpoints
        if self.reproduction:
            study["reproduction"] = self.reproduction
        out: dict[str, Any] = {"study": study, "train": copy.deepcopy(self.train)}
        for key in ("optimizers", "sweep", "executor"):
            value = getattr(self, key)
            if value:
                out[key] = copy.deepcopy(value)
        out["analysis"] = analysis
        return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, with one-line errors."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise _fail(f"study config not found: {path}") from exc
    except IsADirectoryError as exc:
        raise _fail(f"study config {path} is a folder, not a TOML file") from exc
    except UnicodeDecodeError as exc:
        raise _fail(f"{path} is not a TOML file (not UTF-8 text)") from exc
    except tomllib.TOMLDecodeError as exc:
        raise _fail(f"{path} is not valid TOML: {exc}") from exc


def _validate_optimizers(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label, spec in values.items():
        if isinstance(spec, str):
            spec = {"name": spec}
        if not isinstance(spec, Mapping):
            raise _fail(f"optimizers.{label} must be a table, got {spec!r}")
        spec = dict(spec)
        name = spec.get("name", "sgd" if label == "base" else label)
        if label == "base" and name not in BASE_OPTIMIZERS:  # checked first: its own choices
            raise _fail(
                f"optimizers.base must be one of {', '.join(BASE_OPTIMIZERS)}, got '{name}'"
            )
        if name not in OPTIMIZER_NAMES:
            raise _fail(
                f"unknown optimizer '{name}' in optimizers.{label}; "
                f"choose one of: {', '.join(OPTIMIZER_NAMES)}"
            )
        if "base" in spec:
            base = spec["base"]
            if not isinstance(base, (str, Mapping)):
                raise _fail(
                    f"optimizers.{label}.base must be a table or an optimizer name, got {base!r}"
                )
            base = {"name": base} if isinstance(base, str) else dict(base)
            if base.get("name", "sgd") not in BASE_OPTIMIZERS:
                raise _fail(
                    f"unknown base optimizer '{base.get('name')}' in optimizers.{label}; "
                    f"choose one of: {', '.join(BASE_OPTIMIZERS)}"
                )
            spec["base"] = base
        out[label] = spec
    return out


def optimizer_name(label: str, optimizers: Mapping[str, Mapping[str, Any]]) -> str:
    """The registry name behind an optimizer label (``"sam-adam"`` -> ``"sam"``)."""
    entry = optimizers.get(label, {})
    return str(entry.get("name", label))


def _validate_sweep(
    values: Mapping[str, Any], optimizers: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    _check_keys("[sweep]", values, AXES)
    sweep: dict[str, Any] = {}
    labels = _as_list("sweep.optimizer", values.get("optimizer", ["sgd"]))
    valid_labels = sorted({*OPTIMIZER_NAMES, *(k for k in optimizers if k != "base")})
    for label in labels:
        if not isinstance(label, str) or (label not in OPTIMIZER_NAMES and label not in optimizers):
            raise _fail(
                f"unknown optimizer '{label}' in sweep.optimizer; choose one of: "
                f"{', '.join(valid_labels)} (or define it in [optimizers])"
            )
        if label == "base":
            raise _fail("'base' is the base optimizer's settings, not a sweep.optimizer entry")
    if len(set(labels)) != len(labels):
        raise _fail(f"sweep.optimizer lists an optimizer twice: {labels}")
    sweep["optimizer"] = labels
    for axis in AXES:
        if axis == "optimizer" or axis not in values:
            continue
        value = values[axis]
        where = f"sweep.{axis}"
        if isinstance(value, Mapping):
            if axis not in OPTIMIZER_AXES:
                raise _fail(
                    f"{where} is per-optimizer only for {', '.join(OPTIMIZER_AXES)}; give a list"
                )
            for label in value:
                if label not in labels:
                    raise _fail(
                        f"{where} names optimizer '{label}', which is not in sweep.optimizer "
                        f"({', '.join(labels)})"
                    )
            per = {
                k: [_check_axis_value(f"{where}.{k}", axis, v) for v in _as_list(where, vs)]
                for k, vs in value.items()
            }
            sweep[axis] = per
        else:
            sweep[axis] = [_check_axis_value(where, axis, v) for v in _as_list(where, value)]
    return sweep


def _check_axis_value(where: str, axis: str, value: Any) -> Any:
    if axis in ("m", "seed", "batch_size", "epochs", "width", "depth"):
        if axis == "seed":
            return check_seed(f"{where} values", value)
        return _positive_int(where, value)
    if axis == "label_noise":
        return _number(where, value, low=0.0, high=0.99)
    if axis in ("rho", "weight_decay", "momentum"):
        return _number(where, value, low=0.0)
    if axis == "lr":
        if _number(where, value, low=0.0) == 0:
            raise _fail(f"{where} must be > 0, got {value!r}")
        return value
    if axis == "model":
        from ..registry import absolute_spec, normalize_spec

        return absolute_spec(normalize_spec(value, "model"))
    return value


def _validate_train(values: Mapping[str, Any]) -> dict[str, Any]:
    from ..trainer import TrainConfig

    values = {k.replace("-", "_"): v for k, v in values.items()}
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    valid = [n for n in names if n not in ("out", "optimizer")]  # the study sets these
    for key in values:
        if key not in names:
            raise _fail(f"unknown key '{key}' in [train]; valid keys: {', '.join(valid)}")
    if "out" in values:
        raise _fail("train.out is set by the study (DIR/runs/<run_id>); remove it from [train]")
    if "optimizer" in values:
        raise _fail(
            "[train] takes no optimizer: list optimizers in sweep.optimizer and their "
            "settings in [optimizers]"
        )
    config = TrainConfig.from_dict({**values, "progress": False})
    out = {k: v for k, v in values.items()}
    out["dataset"] = config.dataset
    if isinstance(values.get("dataset"), Mapping) and "data_root" in values["dataset"]:
        out["data_root"] = config.data_root  # the dataset table's data_root moved there
    out["model"] = config.model
    if "loss" in out:
        out["loss"] = config.loss
    return out


def _validate_analysis(values: Mapping[str, Any]) -> AnalysisPlan:
    _check_keys("[analysis]", values, (*ANALYSIS_KEYS, *MEASURES))
    plan = AnalysisPlan()
    epochs = _as_list("analysis.epochs", values.get("epochs", ["last"]))
    for epoch in epochs:
        if epoch != "last":
            _positive_int('analysis.epochs entries (integers or "last")', epoch)
    plan.epochs = list(dict.fromkeys(epochs))
    if "samples" in values:  # as the CLI's --samples: 0 is refused, not read as "all"
        samples = values["samples"]
        if samples != "all" and (
            isinstance(samples, bool) or not isinstance(samples, int) or samples < 1
        ):
            raise _fail(f'analysis.samples must be a positive integer or "all", got {samples!r}')
        plan.samples = None if samples == "all" else samples
    split = values.get("split", "train")
    if split not in SPLITS:
        raise _fail(f"unknown analysis.split '{split}'; choose one of: {', '.join(SPLITS)}")
    plan.split = split
    if "batch_size" in values:
        plan.batch_size = _positive_int("analysis.batch_size", values["batch_size"])
    if "seed" in values:
        plan.seed = check_seed("analysis.seed", values["seed"])
    if "device" in values:
        from ..distributed import check_device_name

        plan.device = str(values["device"])
        check_device_name(plan.device)  # its form only: the runs may go to other machines
    for measure in MEASURES:
        if measure in values:
            options = values[measure]
            if not isinstance(options, Mapping):
                raise _fail(f"analysis.{measure} must be a table, got {options!r}")
            plan.measures[measure] = _validate_measure(measure, dict(options))
    if plan.samples is not None:  # the measures would cut m to the subset, keeping its name
        for measure, m in plan.subset_sizes():
            if m > plan.samples:
                raise _fail(
                    f"analysis.{measure}.m {m} is larger than the {plan.samples} examples "
                    "of analysis.samples"
                )
    return plan


def _spectrum_keys() -> tuple[str, ...]:
    from ..analysis.spectrum import spectrum

    skip = {"model", "data", "loss", "meta", "return_eigenvectors", "device", "dtype"}
    params = inspect.signature(spectrum).parameters
    # hvp_mode goes to the Hessian operator: "auto" times both modes on the machine as it
    # is, so pinning it is what makes a rerun bit-identical on a busy machine
    return tuple(
        name
        for name, p in params.items()
        if name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ) + ("hvp_mode",)


def _spectrum_default(name: str) -> Any:
    from ..analysis.spectrum import spectrum

    return inspect.signature(spectrum).parameters[name].default


def _validate_measure(measure: str, options: dict[str, Any]) -> dict[str, Any]:
    where = f"[analysis.{measure}]"
    _check_measure_numbers(measure, options)
    if measure == "spectrum":
        _check_keys(where, options, _spectrum_keys())
        from ..curvature.operator import HVP_MODES

        if options.get("hvp_mode", "auto") not in HVP_MODES:
            raise _fail(
                f"analysis.spectrum.hvp_mode must be {', '.join(HVP_MODES[:-1])} or "
                f"{HVP_MODES[-1]}, got {options['hvp_mode']!r}"
            )
        for key in ("k", "max_steps", "num_probes", "num_lanczos_steps", "trace_probes"):
            if options.get(key) is not None:
                _positive_int(f"analysis.spectrum.{key}", options[key])
        k = options.get("k", _spectrum_default("k"))
        if options.get("max_steps") is not None and options["max_steps"] < k:
            raise _fail(
                f"analysis.spectrum.max_steps {options['max_steps']} is fewer than k {k}: "
                "Lanczos finds at most one eigenvalue per step"
            )
        from ..analysis.spectrum import check_block_options, check_skip, check_spectrum_choices
        from ..curvature.trace import check_trace_budget
        from ..distributed import check_device_name

        skip = options.get("skip", [])
        if not isinstance(skip, (str, list)) or not all(isinstance(p, str) for p in skip):
            raise _fail(f"analysis.spectrum.skip must be a list of trace, density; got {skip!r}")
        backend = options.get("backend", _spectrum_default("backend"))
        try:  # the checks spectrum() makes, before the runs train rather than after
            check_spectrum_choices(
                which=options.get("which"),
                trace_method=options.get("trace_method"),
                kernel=options.get("kernel"),
                backend=backend,
            )
            skipped = check_skip(skip, deflate=options.get("deflate", 0))
            if options.get("block_size") is not None:
                restart = options.get("restart_size")
                check_block_options(options["block_size"], backend, restart, False)
            if options.get("trace_probes") is not None and "trace" not in skipped:
                method = options.get("trace_method") or _spectrum_default("trace_method")
                check_trace_budget(method, options["trace_probes"])
        except SharpscopeError as exc:
            raise _fail(f"[analysis.spectrum]: {exc}") from None
        if options.get("basis_device") is not None:  # its form; that it exists: run_study
            try:
                check_device_name(options["basis_device"])
            except SharpscopeError as exc:
                raise _fail(f"analysis.spectrum.basis_device: {exc}") from None
        return options
    _check_keys(where, options, MEASURE_KEYS[measure])
    if measure in ("m_sharpness", "adaptive_sharpness"):
        # analysis.md section 5: the training radii of SAM / ASAM (never a single rho),
        # 20 Auto-PGD steps in studies (the command line's default is SAM's one step)
        default_rho = [0.05, 0.1] if measure == "m_sharpness" else [0.5, 1.0]
        options["m"] = [
            _positive_int(f"analysis.{measure}.m", v)
            for v in _as_list(f"analysis.{measure}.m", options.get("m", [128]))
        ]
        options["rho"] = [
            _number(f"analysis.{measure}.rho", v, positive=True)
            for v in _as_list(f"analysis.{measure}.rho", options.get("rho", default_rho))
        ]
        options["steps"] = _positive_int(f"analysis.{measure}.steps", options.get("steps", 20))
        norm = options.get("norm", "l2")
        if norm not in ("l2", "linf"):
            raise _fail(f"unknown analysis.{measure}.norm '{norm}'; choose one of: l2, linf")
        options["norm"] = norm
        # Checked, not filled in: a plan without it (default "exact") stays equal to
        # the plans of studies written before the key existed, so they still resume.
        if options.get("projection", "exact") not in ("exact", "rescale"):
            raise _fail(
                f"unknown analysis.{measure}.projection '{options['projection']}'; "
                "choose one of: exact, rescale"
            )
    elif measure == "average_sharpness":
        options["rho"] = [
            _number("analysis.average_sharpness.rho", v, positive=True)
            for v in _as_list("analysis.average_sharpness.rho", options.get("rho", [0.05]))
        ]
        options["adaptive"] = [
            _flag("analysis.average_sharpness.adaptive", v)
            for v in _as_list(
                "analysis.average_sharpness.adaptive", options.get("adaptive", [False])
            )
        ]
        options["adaptive_rho"] = [
            _number("analysis.average_sharpness.adaptive_rho", v, positive=True)
            for v in _as_list(
                "analysis.average_sharpness.adaptive_rho",
                options.get("adaptive_rho", options["rho"]),
            )
        ]
    elif measure == "pac_bayes":
        drop = options.get("target_drop")  # > 0 checked above; pac_bayes() refuses >= 1
        if drop is not None and not drop < 1:
            raise _fail(f"analysis.pac_bayes.target_drop must be in (0, 1), got {drop!r}")
        options["magnitude_aware"] = [
            _flag("analysis.pac_bayes.magnitude_aware", v)
            for v in _as_list(
                "analysis.pac_bayes.magnitude_aware", options.get("magnitude_aware", [False, True])
            )
        ]
    elif measure == "keskar":
        options["epsilon"] = [
            _number("analysis.keskar.epsilon", v, positive=True)
            for v in _as_list("analysis.keskar.epsilon", options.get("epsilon", [1e-3, 5e-4]))
        ]
    elif measure == "landscape":
        dims = _as_list("analysis.landscape.dims", options.get("dims", [1]))
        for d in dims:
            if isinstance(d, bool) or d not in (1, 2):  # true == 1
                raise _fail(f"analysis.landscape.dims must be 1 or 2, got {d!r}")
        options["dims"] = dims
        if "grid" in options:
            from ..analysis.landscape import MIN_GRID

            grid = _positive_int("analysis.landscape.grid", options["grid"])
            if grid < MIN_GRID:
                raise _fail(
                    f"analysis.landscape.grid must be at least {MIN_GRID} points per axis, "
                    f"got {grid}"
                )
        directions = options.get("directions", "random")
        if directions not in ("random", "eigen"):
            raise _fail(
                f"unknown analysis.landscape.directions '{directions}'; choose one of: random, eigen"
            )
        from typing import get_args

        from ..analysis.directions import BiasMode, DirectionNorm

        for key, kinds in (("norm", DirectionNorm), ("bias", BiasMode)):
            if key in options and options[key] not in get_args(kinds):
                raise _fail(
                    f"unknown analysis.landscape.{key} '{options[key]}'; choose one of: "
                    + ", ".join(get_args(kinds))
                )
        pairs = options.get("interpolate", [])
        if pairs and not all(isinstance(p, list) and len(p) == 2 for p in pairs):
            raise _fail(
                "analysis.landscape.interpolate must be a list of optimizer pairs, "
                'e.g. [["sgd", "sam"]]'
            )
    return options


def _validate_executor(values: Mapping[str, Any]) -> dict[str, Any]:
    for key in values:
        if key not in EXECUTOR_KEYS and not key.startswith(EXECUTOR_PREFIXES):
            raise _fail(
                f"unknown key '{key}' in [executor]; valid keys: {', '.join(EXECUTOR_KEYS)} "
                "or any slurm_* / local_* parameter of submitit"
            )
    return dict(values)


def _check_executor_types(executor: Mapping[str, Any]) -> None:
    """Type-check submitit's named parameters (a wrong one failed only when the executor
    started, after the study folder was written); ``slurm_*``/``local_*`` go as they are."""
    for key, value in executor.items():
        where = f"executor.{key}"
        if key == "mem_gb":
            _number(where, value, positive=True)
        elif key == "gpus_per_node":
            _nonnegative_int(where, value)
        elif key == "name" and not isinstance(value, str):
            raise _fail(f"{where} must be a string, got {value!r}")
        elif key == "stderr_to_stdout":
            _flag(where, value)
        elif key in ("timeout_min", "cpus_per_task", "nodes", "tasks_per_node"):
            _positive_int(where, value)


def _check_measure_values_distinct(plan: AnalysisPlan) -> None:
    """Refuse a measure option that lists a value twice (``m = [32, 32]``): it was
    computed twice and gave one column, as the sweep refuses an axis value twice."""
    for measure, options in plan.measures.items():
        for key, values in (options or {}).items():
            if isinstance(values, list) and key != "skip":
                seen = [json.dumps(v) for v in values]
                if len(set(seen)) != len(seen):
                    raise _fail(f"analysis.{measure}.{key} lists a value twice: {values}")


def _study_name(name: Any) -> str:
    """The study's name, the folder of its default --out (``runs/studies/<name>``): one
    path component. ``""`` wrote the study into ``runs/studies`` itself, ``"../../x"``
    outside it."""
    if (
        not isinstance(name, str)
        or not name.strip()
        or name in (".", "..")
        or any(c in name for c in "/\\")
        or any(ord(c) < 32 for c in name)
    ):
        raise _fail(
            "study.name must be a non-empty folder name (no '/' or '\\', not '.' or '..'), "
            f"got {name!r}"
        )
    return name


def study_config_from_dict(
    values: Mapping[str, Any], *, name: str = "study", check_files: bool = True
) -> StudyConfig:
    """Validate a parsed TOML document and build a :class:`StudyConfig`.

    Every run's data set, model and loss are resolved too (names, options, and with
    ``check_files`` that factory files exist), so that a config naming something that
    does not exist fails here, before a study folder is written or a run starts.

    Args:
        values: the parsed TOML sections.
        name: the study's name when ``[study]`` gives none.
        check_files: check that factory files exist (off when reading back a study
            folder, whose report needs no factory).

    Raises:
        SharpscopeError: the first unknown section, key or value, in one line.
    """
    _check_keys("the study config (top level)", values, SECTIONS)
    for section in SECTIONS:
        if section in values and not isinstance(values[section], Mapping):
            raise _fail(f"[{section}] must be a table")
    study = dict(values.get("study", {}))
    _check_keys("[study]", study, STUDY_KEYS)
    keep = study.get("keep_checkpoints", "all")
    if keep not in KEEP_CHECKPOINTS:
        raise _fail(
            f"unknown study.keep_checkpoints '{keep}'; choose one of: {', '.join(KEEP_CHECKPOINTS)}"
        )
    reproduction = study.get("reproduction")
    if reproduction is not None and reproduction not in REPRODUCTIONS:
        raise _fail(
            f"unknown study.reproduction '{reproduction}'; choose one of: {', '.join(REPRODUCTIONS)}"
        )
    train = _validate_train(values.get("train", {}))
    optimizers = _validate_optimizers(values.get("optimizers", {}))
    sweep = _validate_sweep(values.get("sweep", {}), optimizers)
    analysis = _validate_analysis(values.get("analysis", {}))
    for pair in (analysis.measures.get("landscape") or {}).get("interpolate", []):
        for label in pair:
            if label not in sweep["optimizer"]:
                raise _fail(
                    f"analysis.landscape.interpolate names optimizer '{label}', which is not in "
                    f"sweep.optimizer ({', '.join(sweep['optimizer'])})"
                )
    executor = _validate_executor(values.get("executor", {}))
    description = study.get("description", "")
    if not isinstance(description, str):
        raise _fail(f"study.description must be a string, got {description!r}")
    config = StudyConfig(
        name=_study_name(study.get("name", name)),
        description=description,
        keep_checkpoints=keep,
        reproduction=reproduction,
        train=train,
        optimizers=optimizers,
        sweep=sweep,
        analysis=analysis,
        executor=executor,
    )
    from .sweep import check_axes_apply, expand_sweep, warn_if_lets_holds_out_alone

    if check_files:  # a config about to run; a study folder read back keeps its runs
        _check_measure_values_distinct(analysis)
        _check_executor_types(executor)
        check_axes_apply(config)
        warn_if_lets_holds_out_alone(config)
    runs = expand_sweep(config)  # validates the combination (epochs, labels, m) up front
    _check_run_specs(runs, check_files, analysis if check_files else None)
    return config


def _check_run_specs(runs: list[Any], check_files: bool, plan: AnalysisPlan | None) -> None:
    """Resolve the data set, model and loss of every distinct run (no data is read), and
    with a ``plan`` (a config about to run, not a study folder read back for its report)
    check each registry model, built on the ``meta`` device, against what the runs and
    the analyses ask of it."""
    from ..data import check_data_spec
    from ..registry import check_loss_spec, check_model_spec

    seen: dict[str, Any] = {}
    for run in runs:
        specs = [run.train["dataset"], run.train["model"], run.train.get("loss")]
        key = json.dumps(specs, sort_keys=True, default=str)
        if key not in seen:
            dataset, model, loss = specs
            shapes = check_data_spec(dataset, check_files=check_files)
            if loss is not None:
                check_loss_spec(loss, check_files=check_files)
            built = check_model_spec(model, shapes, check_files=check_files)
            seen[key] = built if plan is not None else None
            if seen[key] is not None:
                _check_model_fits_analyses(seen[key], run, plan)
        if seen[key] is not None:
            _check_model_fits_run(seen[key], run)


def _check_model_fits_analyses(model: Any, run: Any, plan: AnalysisPlan) -> None:
    """The parameter counts the single-run commands check before their work (``--k``,
    ``--block-size``, ``--deflate``, Keskar's subspace), for a model built on meta."""
    from ..analysis.spectrum import check_sizes_fit
    from ..models import num_parameters

    n = num_parameters(model)
    if n == 0:  # the trainer refuses it in one line
        return
    where = f"the model of run '{run.run_id}' ({run.params['model']})"
    spectrum = plan.measures.get("spectrum")
    if spectrum is not None:
        check_sizes_fit(
            n,
            k=spectrum.get("k", _spectrum_default("k")),
            block_size=spectrum.get("block_size"),
            deflate=spectrum.get("deflate", 0),
            option=lambda name: f"analysis.spectrum.{name}",
            where=f" of {where}",
        )
    subspace = (plan.measures.get("keskar") or {}).get("subspace_dim")
    if subspace is not None and subspace > n:
        raise _fail(
            f"analysis.keskar.subspace_dim {subspace} is larger than the {n} parameters of "
            f"{where}; use a smaller one, or leave it out for the full space"
        )


def _check_model_fits_run(model: Any, run: Any) -> None:
    """What the trainer checks of a model before its first step, here before any run
    trains: SAM-ON needs normalization layers, and m-sharpness groups of one example
    cannot go through BatchNorm (the batch size checked against the data in run_study)."""
    from ..optim.msam import check_groups_for_batchnorm
    from ..optim.samon import check_normalization_layers

    spec = run.train["optimizer"]
    try:
        if spec.get("name") == "samon":
            check_normalization_layers(model, bool(spec.get("exclude_norm", False)))
        if spec.get("name") in M_SUPPORTED and spec.get("m") is not None:
            check_groups_for_batchnorm(model, int(spec["m"]), int(run.params["batch_size"]))
    except SharpscopeError as exc:  # a study's model table takes norm, not --model-opt
        message = str(exc).replace("take --model-opt norm=batch", 'take norm = "batch"')
        raise _fail(f"run '{run.run_id}': {message}") from None


def load_study_config(path: str | Path) -> StudyConfig:
    """Read and validate a study TOML file."""
    path = Path(path)
    values = read_toml(path)
    if not any(values.get(section) for section in ("train", "sweep")):
        raise _fail(
            f"{path} has no [train] or [sweep] table; a study config names at least what to "
            "train (see `sharpscope study list` for examples)"
        )
    config = study_config_from_dict(values, name=path.stem)
    config.source = str(path)
    return config


def builtin_config_names() -> list[str]:
    """Names of the configs shipped in ``sharpscope/study/configs``."""
    folder = resources.files("sharpscope.study") / "configs"
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def builtin_config_path(name: str) -> Path:
    """Path of a shipped config, e.g. ``"quick"`` or ``"a-spectra-quick"``."""
    names = builtin_config_names()
    if name not in names:
        raise _fail(f"unknown built-in study '{name}'; choose one of: {', '.join(names)}")
    return Path(str(resources.files("sharpscope.study") / "configs" / f"{name}.toml"))


def load_builtin_config(name: str) -> StudyConfig:
    """A shipped config by name."""
    return load_study_config(builtin_config_path(name))


def dataset_name(config: StudyConfig) -> str:
    """The name (or factory) of a study config's training data set."""
    dataset = config.train.get("dataset", {"name": "mnist1d"})
    return dataset.get("name", "data") if isinstance(dataset, Mapping) else str(dataset)
