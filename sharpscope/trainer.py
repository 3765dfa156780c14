"""The training loop: the sole caller of ``optimizer.step``.

``train(TrainConfig(...))`` trains one model and writes ``OUT/last.pt``,
``OUT/epoch_NNN.pt`` (every ``save_every`` epochs) and ``OUT/metrics.jsonl`` (one
JSON object per evaluation; LETS, whose ρ is learned, also one ``"kind": "step"`` object
per step, written with the evaluation row that ends its epoch).

Exact resumption: the data order and the augmentation of epoch ``e`` are drawn from
generators seeded by ``(seed, e)``, and checkpoints (written atomically at the end of
each epoch) hold the model, optimizer, scheduler and RNG states, so a resumed run ends
with the same weights as an uninterrupted one on the CPU, and on a GPU with
``deterministic`` (:mod:`sharpscope.determinism`). The last incomplete batch of an
epoch is dropped, so every step sees ``batch_size`` examples (and under ``torchrun``
each of the W ranks sees ``batch_size / W`` of them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .data import SPEC_DEFAULTS, DataSplit, data_root_option, load_data, one_factory_call
from .data.augment import random_crop_flip
from .data.fingerprint import warn_if_not_as_trained
from .determinism import deterministic_algorithms
from .device_memory import is_out_of_memory
from .distributed import (
    DistInfo,
    barrier,
    check_device_name,
    check_same_data,
    gather_to_main,
    init_from_env,
    is_multi_process,
    peers_checked,
    reduce_each_gradient,
)
from .errors import SharpscopeError, check_seed, first_line, torchscript_problem
from .evaluation import check_model_on_data, evaluate
from .io import (
    FORMAT,
    VERSION,
    load_training_state,
    load_weights,
    save_checkpoint,
    stop_signals_held,
)
from .locking import exclusive_lock, locked_on_main, make_folder
from .modes import batchnorm_on_one_value
from .precision import HALF_DTYPES, float_dtype
from .registry import absolute_factory, absolute_spec, build_model, get_loss, normalize_spec
from .results import atomic_write_bytes, eval_rows, read_metrics_rows, write_json

log = logging.getLogger(__name__)  # one line per epoch when there is no progress bar
SCHEDULES = ("cosine", "step", "constant")
# settings a resumed run must share with its checkpoint (the device, progress bar, output
# folder, evaluation batch size and the like may change; epochs has its own rule)
SAME_ON_RESUME = (
    "dataset",
    "model",
    "optimizer",
    "loss",
    "batch_size",
    "seed",
    "schedule",
    "augment",
    "precision",
    "sync_bn",
)
#: what training takes for a schedule key left out (milestones: see lr_factor; a run with
#: milestones of its own may grow, so they are never filled in)
SCHEDULE_DEFAULTS = {"name": "cosine", "warmup_epochs": 0, "gamma": 0.1}
PRECISIONS = ("fp32", "bf16", "fp16")
AUGMENTED_BY_DEFAULT = ("cifar10", "cifar100")


class TrainingDiverged(SharpscopeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (also the ``--config`` TOML keys).

    Attributes:
        dataset: data spec, e.g. ``{"name": "mnist1d", "label_noise": 0.4}``.
        model: model spec, e.g. ``{"name": "cnn1d", "norm": "batch"}``.
        optimizer: optimizer spec, e.g. ``{"name": "sam", "rho": 0.05,
            "base": {"name": "sgd", "lr": 0.1, "momentum": 0.9}}``.
        loss: ``cross_entropy``, ``mse`` or ``module:function``.
        epochs: passes over the training split.
        batch_size: global batch size (split over ranks under torchrun).
        seed: seeds the model initialisation, data order, augmentation and the
            optimizers' own noise (bSAM, dropout). Not the data: label noise follows the
            data spec's ``noise_seed`` and a ``samples`` subset its ``seed`` (both 0 by
            default), so every seed of a study sees the same noisy labels and examples.
        out: output folder (``None``: nothing written).
        save_every: also keep ``epoch_NNN.pt`` every this many epochs (0: never).
        schedule: ``{"name": "cosine"|"step"|"constant", "warmup_epochs": 0,
            "milestones": [...], "gamma": 0.1}`` (step: epochs at which lr *= gamma).
        augment: random crop + flip; ``None`` means on for CIFAR, off otherwise.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:1``.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + GradScaler, CUDA).
        data_root: folder of the CIFAR files.
        eval_batch_size: batch size of evaluation.
        bsam_samples: Monte-Carlo samples of bSAM's Bayesian model average at evaluation.
        sync_bn: under torchrun, convert BatchNorm to SyncBatchNorm.
        progress: show a progress bar.
        deterministic: deterministic kernels only (:mod:`sharpscope.determinism`):
            bit-identical repeats and resumes on a GPU too, at some speed cost.
    """

    dataset: dict[str, Any] = field(default_factory=lambda: {"name": "mnist1d"})
    model: dict[str, Any] = field(default_factory=lambda: {"name": "cnn1d"})
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    )
    loss: str = "cross_entropy"
    epochs: int = 10
    batch_size: int = 128
    seed: int = 0
    out: str | None = None
    save_every: int = 0
    schedule: dict[str, Any] = field(default_factory=lambda: {"name": "cosine", "warmup_epochs": 0})
    augment: bool | None = None
    device: str = "auto"
    precision: str = "fp32"
    data_root: str | None = None
    eval_batch_size: int = 1000
    bsam_samples: int = 32
    sync_bn: bool = False
    progress: bool = True
    deterministic: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Build a config from a dict (e.g. a TOML file), refusing unknown keys."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise SharpscopeError(
                    f"unknown training config key '{key}'; valid keys: {', '.join(names)}"
                )
        config = cls(**dict(values))
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the config."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Check the values; raise one clear line for the first bad one."""
        # file-path factories are recorded absolute: the checkpoint then loads from any folder
        self.dataset = absolute_spec(normalize_spec(self.dataset, "data set"))
        self.model = absolute_spec(normalize_spec(self.model, "model"))
        self.optimizer = normalize_spec(self.optimizer, "optimizer")
        if not isinstance(self.schedule, Mapping):
            raise SharpscopeError(
                f'schedule must be a table such as {{name = "cosine", warmup_epochs = 0}}, '
                f"got {self.schedule!r}"
            )
        self.schedule = dict(self.schedule)
        for name in ("epochs", "batch_size", "eval_batch_size", "bsam_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SharpscopeError(f"{name} must be a positive integer, got {value!r}")
        check_seed("seed", self.seed)
        every = self.save_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise SharpscopeError(f"save_every must be an integer >= 0, got {every!r}")
        self._move_data_root_option()
        self._check_split_option()
        for name in ("out", "data_root"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, Path)):
                raise SharpscopeError(f"{name} must be a path, got {value!r}")
            if isinstance(value, str) and not value.strip():  # it meant the working folder
                raise SharpscopeError(f"{name} must be a folder path, got an empty one")
        for name in ("loss", "device"):
            if not isinstance(getattr(self, name), str):
                raise SharpscopeError(f"{name} must be a string, got {getattr(self, name)!r}")
        self.loss = absolute_factory(self.loss)
        if self.data_root is not None:  # recorded absolute: a resume from elsewhere finds it
            self.data_root = str(Path(self.data_root).expanduser().resolve())
        check_device_name(self.device)  # its form; whether it exists, when training starts
        if self.augment is not None and not isinstance(self.augment, bool):
            raise SharpscopeError(f"augment must be true, false or unset, got {self.augment!r}")
        _check_schedule(self.schedule)
        for name in ("sync_bn", "progress", "deterministic"):
            if not isinstance(getattr(self, name), bool):
                raise SharpscopeError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.precision not in PRECISIONS:
            raise SharpscopeError(
                f"unknown precision '{self.precision}'; choose one of: {', '.join(PRECISIONS)}"
            )

    def _check_split_option(self) -> None:
        """``split`` is an analysis' choice (an analysis' ``meta.data`` records it): a run
        trains on the train split whatever the data spec says. ``split=test`` was taken,
        ignored and recorded, so ``load_data(checkpoint.data_spec)`` gave the test split
        (bug B7, session 28); ``split=train``, which says what training does, is dropped."""
        if "split" not in self.dataset:
            return
        split = self.dataset["split"]
        if split != "train":
            raise SharpscopeError(
                f"split {split!r} is not a training data option: a run trains on the train "
                "split (and evaluates on the test split); give a split to an analysis (--split)"
            )
        self.dataset = {k: v for k, v in self.dataset.items() if k != "split"}

    def _move_data_root_option(self) -> None:
        """The data option ``data_root`` (``--data-opt data_root=DIR``, a TOML dataset
        table's key) is the setting ``data_root``: it moves there, to be recorded absolute
        and read by the analyses unless their ``--data-root`` says otherwise, and to be a
        machine setting that a resume or a study may change. It was kept in the data spec
        as given (relative), where it beat every later ``--data-root`` (bug B3, session 28)."""
        if "data_root" not in self.dataset:
            return
        self.dataset = dict(self.dataset)
        given = data_root_option(self.dataset.pop("data_root"), "the data option data_root")
        if given is None:
            return
        if self.data_root is not None and not (
            isinstance(self.data_root, (str, Path))
            and Path(self.data_root).expanduser().resolve() == Path(given).expanduser().resolve()
        ):
            raise SharpscopeError(
                f"data_root is given twice, as {self.data_root} and as the data option "
                f"data_root={given}; give it once (--data-root DIR)"
            )
        self.data_root = given


SCHEDULE_KEYS = ("name", "warmup_epochs", "milestones", "gamma")


def _check_schedule(schedule: Mapping[str, Any]) -> None:
    """The schedule table: known keys and name, warmup_epochs a number >= 0, milestones a
    list of epochs, gamma a number > 0 (a typo such as ``gama`` was ignored, ``gamma = -1``
    trained at a negative lr)."""
    unknown = sorted(set(schedule) - set(SCHEDULE_KEYS))
    if unknown:
        raise SharpscopeError(
            f"unknown schedule key '{unknown[0]}'; the schedule takes {', '.join(SCHEDULE_KEYS)}"
        )
    warmup = schedule.get("warmup_epochs", 0)
    if (
        isinstance(warmup, bool)
        or not isinstance(warmup, (int, float))
        or not 0 <= warmup < float("inf")
    ):
        raise SharpscopeError(f"warmup_epochs must be a finite number >= 0, got {warmup!r}")
    if schedule.get("name", "cosine") not in SCHEDULES:
        raise SharpscopeError(
            f"unknown schedule '{schedule.get('name')}'; choose one of: {', '.join(SCHEDULES)}"
        )
    milestones = schedule.get("milestones", [])
    if not isinstance(milestones, (list, tuple)) or not all(
        isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in milestones
    ):
        raise SharpscopeError(
            f"schedule milestones must be a list of epochs (integers >= 0), got {milestones!r}"
        )
    gamma = schedule.get("gamma", 0.1)
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < math.inf:
        raise SharpscopeError(f"schedule gamma must be a number > 0, got {gamma!r}")


@dataclass
class TrainSummary:
    """What a finished run returns."""

    out: Path | None
    metrics: dict[str, float]
    history: list[dict[str, Any]]
    epochs: int
    steps: int
    model: nn.Module
    is_main: bool = True  # rank 0 (or a single process): the one that reports
    start_epoch: int = 0  # epochs already done when this call began (resume)


def lr_factor(schedule: Mapping[str, Any], step: int, steps_per_epoch: int, epochs: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step``.

    Linear warm-up over ``warmup_epochs``, then cosine to 0 (Loshchilov & Hutter
    2017), step decay at ``milestones`` (epochs) by ``gamma``, or constant.

    >>> s = {"name": "cosine", "warmup_epochs": 1}
    >>> [round(lr_factor(s, k, 10, 3), 3) for k in (0, 9, 10, 20, 29)]
    [0.1, 1.0, 1.0, 0.5, 0.006]
    """
    name = schedule.get("name", "cosine")
    warmup_steps = int(round(float(schedule.get("warmup_epochs", 0)) * steps_per_epoch))
    total = epochs * steps_per_epoch
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    if name == "step":
        epoch = step // max(steps_per_epoch, 1)
        # default: after half and three quarters of the run (never before the first epoch
        # ends, and once per epoch: 1 or 2 epochs would otherwise start decayed)
        default = sorted({max(1, int(epochs * 0.5)), max(1, int(epochs * 0.75))})
        milestones = schedule.get("milestones", default)
        gamma = float(schedule.get("gamma", 0.1))
        return gamma ** sum(epoch >= m for m in milestones)
    progress = (step - warmup_steps) / max(total - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _mean_over_ranks(value: float, device: torch.device, world_size: int) -> float:
    """The mean of each process's ``value`` (their local batch losses: equal batch shares).

    Every rank then decides alike whether training diverged (one rank alone stopping left
    the others in a collective that ended in a gloo traceback), and the running loss is the
    global batch's, as in one process.
    """
    import torch.distributed as dist

    pooled = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(pooled)
    return float(pooled) / world_size


def _optimizer_spec(config: TrainConfig) -> dict[str, Any]:
    """``config.optimizer`` with bSAM's noise seeded by the run's seed unless it names one."""
    spec = dict(config.optimizer)
    if str(spec.get("name", "")).lower() == "bsam" and "seed" not in spec:
        spec["seed"] = config.seed
    return spec


#: the key of ``OUT/config.json`` with the optimizer's every option (``--config`` skips it)
RESOLVED_OPTIMIZER_KEY = "optimizer_resolved"
#: the key of ``OUT/config.json`` with the model's every option (``--config`` skips it)
RESOLVED_MODEL_KEY = "model_resolved"


def _written_config(config: TrainConfig) -> dict[str, Any]:
    """``config`` as ``OUT/config.json`` holds it: the settings as given (``--config`` takes
    them back, and ``--optimizer`` can switch them), and under ``optimizer_resolved`` the
    optimizer with every default filled in and a wrapper's base nested, as the checkpoint
    records it, so that a script reads rho or the base momentum of any run; under
    ``model_resolved`` a registry model with every option (``norm``, ``shortcut``, ...) as
    it was built, which a later default cannot change."""
    from .models import resolved_model_spec

    return {
        **config.to_dict(),
        RESOLVED_OPTIMIZER_KEY: _resolved_optimizer(config),
        RESOLVED_MODEL_KEY: _json_shaped(resolved_model_spec(config.model)),
    }


def _resolved_optimizer(config: TrainConfig) -> dict[str, Any]:
    """The run's optimizer spec with every option (the checkpoint's and config.json's),
    in plain JSON shapes: tuples (Adam's ``betas``) as lists, so that the checkpoint's
    ``optimizer`` and config.json's ``optimizer_resolved`` compare equal once loaded."""
    from .optim.factory import resolve_optimizer_spec

    return _json_shaped(resolve_optimizer_spec(_optimizer_spec(config)))


def _json_shaped(value: Any) -> Any:
    """``value`` with every tuple a list, as JSON reads it back.

    >>> _json_shaped({"betas": (0.9, 0.999), "base": {"t": ((1, 2),)}})
    {'betas': [0.9, 0.999], 'base': {'t': [[1, 2]]}}
    """
    if isinstance(value, Mapping):
        return {k: _json_shaped(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_shaped(v) for v in value]
    return value


def _generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """The seeded stream ``stream`` of ``epoch`` (data order, augmentation, noise).

    Kept as it is, not moved to ``SeedSequence`` like the analyses' generators: every
    saved run's data order depends on it, and resumes must stay bit-identical.
    """
    # modulo 2^63: the streams of seeds below about 2^41 stay as they were; larger ones
    # overflowed torch's 64-bit seed
    return torch.Generator().manual_seed((((seed * 1_000_003) + epoch) * 7 + stream) % 2**63)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    # the checkpoint is loaded onto the training device; RNG states are CPU byte tensors
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _resume_position(state: Mapping[str, Any], path: Path) -> tuple[int, int]:
    """The epoch and optimizer step a checkpoint ends at, refused in one line unless they
    are whole numbers >= 0 (a hand-edited epoch -1 trained an extra epoch "0")."""
    values = []
    for key in ("epoch", "step"):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SharpscopeError(
                f"{path} cannot be resumed: its {key} is {value!r}, not a whole number >= 0"
            )
        values.append(value)
    return values[0], values[1]


def _restore(path: Path, key: str, load: Any, state: Mapping[str, Any]) -> None:
    """``load(state[key])``, a failure in one line: a file that loads but whose ``key``
    does not fit this run (another optimizer's state, a damaged RNG state)."""
    try:
        load(state[key])
    except SharpscopeError as exc:  # the optimizer's own checks: name the file
        raise SharpscopeError(f"{path} cannot be resumed: {exc}") from exc
    except Exception as exc:  # torch's own errors, of several types
        raise SharpscopeError(
            f"{path} cannot be resumed: its {key} does not fit this run ({type(exc).__name__}: "
            f"{first_line(exc)}); resume from an epoch_NNN.pt copied to last.pt, or train "
            "into another output folder (--out)"
        ) from exc


def _unwrap(model: nn.Module) -> nn.Module:
    return (
        model.module
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel)
        else model
    )


def _read_history(path: Path, last_step: int) -> list[dict[str, Any]]:
    """The rows of ``metrics.jsonl`` up to ``last_step``; a cut-off last line is dropped."""
    if not path.exists():
        return []
    return [row for row in read_metrics_rows(path) if row.get("step", 0) <= last_step]


def schedule_extends(schedule: Mapping[str, Any]) -> bool:
    """Whether a run on this learning-rate schedule may resume with more epochs: its rate
    at each step does not depend on the total (constant, or step decay at explicit
    milestones; cosine decays to the total it was given).

    >>> schedule_extends({"name": "constant"}), schedule_extends({"name": "cosine"})
    (True, False)
    """
    name = schedule.get("name", "cosine")
    return name == "constant" or (name == "step" and "milestones" in schedule)


def check_resume(config: TrainConfig, saved: Mapping[str, Any], epoch: int, path: Path) -> None:
    """Refuse to resume with settings that differ from the checkpoint's.

    ``epochs`` may grow only when the schedule does not depend on it (constant, or step
    decay with explicit milestones), and must exceed the checkpoint's epoch.

    Raises:
        SharpscopeError: one line naming the settings that differ.
    """
    now = config.to_dict()
    changed = []
    for key in SAME_ON_RESUME:
        old, new = saved.get(key), now.get(key)
        if key in ("dataset", "model", "loss"):
            old = absolute_spec(old)  # recorded relative before paths were made absolute
        if key == "dataset" and isinstance(old, Mapping):  # now the machine setting data_root
            old = {k: v for k, v in old.items() if k != "data_root"}
        changed += differing_settings(key, as_trained(key, old, saved), as_trained(key, new, now))
    old_epochs = saved.get("epochs")
    schedule = config.schedule
    if config.epochs != old_epochs and not schedule_extends(schedule):  # one refusal for all
        changed.append(
            f"epochs {config.epochs} (checkpoint: {old_epochs}; its "
            f"{schedule.get('name', 'cosine')} schedule depends on the total)"
        )
    if changed:
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise SharpscopeError(
            f"cannot resume {path} with other settings: {'; '.join(changed[:4])}{more}; drop "
            "those options to continue the run as it was, or train into another output folder (--out)"
        )
    if config.epochs < epoch:
        raise SharpscopeError(
            f"cannot resume {path} with epochs {config.epochs}: it is already at epoch {epoch}"
        )


def _warn_unusual_settings(config: TrainConfig, base_lrs: list[float], world_size: int) -> None:
    """Warn about settings that train but hardly as meant: a zero learning rate, a warm-up
    as long as the run, step milestones at or past its end, and m-sharpness groups no
    smaller than the batch."""
    if all(lr == 0 for lr in base_lrs):
        warnings.warn("lr is 0: the weights never change", stacklevel=3)
    warmup = float(config.schedule.get("warmup_epochs", 0))
    if warmup > 0 and warmup >= config.epochs:
        warnings.warn(
            f"warmup_epochs {warmup:g} is not shorter than the run ({config.epochs} "
            f"epoch{'s' if config.epochs != 1 else ''}): "
            "the learning rate rises for the whole run and its schedule after the warm-up "
            "never starts",
            stacklevel=3,
        )
    if config.schedule.get("name") == "step":
        late = sorted({m for m in config.schedule.get("milestones", []) if m >= config.epochs})
        if late:
            many = "s" if len(late) > 1 else ""
            warnings.warn(
                f"schedule milestone{many} {', '.join(map(str, late))} "
                f"{'are' if many else 'is'} not before the end of the run ({config.epochs} "
                f"epoch{'s' if config.epochs != 1 else ''}): the learning rate never decays there",
                stacklevel=3,
            )
    m = config.optimizer.get("m")
    per_rank = config.batch_size // world_size
    if isinstance(m, (int, float)) and not isinstance(m, bool) and m >= per_rank:  # 32.0 from JSON
        where = " per process" if world_size > 1 else ""
        warnings.warn(
            f"m {m:g} is not smaller than the batch of {per_rank} examples{where}: every step "
            "perturbs with the whole batch's gradient, as without m",
            stacklevel=3,
        )


def _warn_half_weights(model: nn.Module) -> None:
    """Warn when the model's own weights are float16/bfloat16 (a factory's ``.half()``): an
    update smaller than the weight's rounding step (2^-11 relative in float16, 2^-8 in
    bfloat16) is lost, so most small steps change nothing. Mixed precision keeps float32
    weights and computes in half (``--precision fp16|bf16``)."""
    half = sorted({p.dtype for p in model.parameters()} & set(HALF_DTYPES), key=str)
    if half:
        step = " and ".join(f"{torch.finfo(d).eps / 2:.0e}".replace("e-0", "e-") for d in half)
        names = " and ".join(str(d).removeprefix("torch.") for d in half)
        warnings.warn(
            f"the model's weights are {names}: an update below their rounding "
            f"step (about {step} relative) is lost, so small steps change nothing; build a "
            "float32 model and train with --precision bf16 (or fp16 on a GPU): half-precision "
            "compute, float32 weights",
            stacklevel=3,
        )


def _warn_other_world_size(state: Mapping[str, Any], info: DistInfo, path: Path) -> None:
    """Warn when a run resumes with another number of processes than wrote its checkpoint:
    the per-rank batch changes (BatchNorm statistics, a per-rank perturbation, bSAM's
    per-rank noise), so the resumed run is not the uninterrupted one."""
    ranks = state.get("rank_states")
    saved = state.get("world_size", len(ranks) if isinstance(ranks, list) else None)
    if saved is None or int(saved) == info.world_size or not info.is_main:
        return
    warnings.warn(
        f"{path} was written by {int(saved)} process(es), this run has {info.world_size}: "
        "the per-rank batch (BatchNorm statistics, a per-rank perturbation or noise) "
        "changes, so the resumed run is not bit-identical to an uninterrupted one (a new "
        "process starts from rank 0's optimizer state, with bSAM noise of its own)",
        stacklevel=2,
    )


def _warn_other_model_average(
    config: TrainConfig, saved: Mapping[str, Any], epoch: int, path: Path
) -> None:
    """Warn when a bSAM run resumes with another ``bsam_samples`` or ``eval_batch_size``:
    both decide the weight samples of the model average (drawn per evaluation batch), so its
    metrics (``test_*_bma``) from the next epoch on are not those of the uninterrupted run,
    and nothing in the rows says so. Evaluation settings may change on a resume (they do
    not touch training), as the process count may; such a change warns as that one does."""
    if str(config.optimizer.get("name", "")).lower() != "bsam":
        return
    changed = [
        f"{name} {getattr(config, name)} (checkpoint: {saved[name]})"
        for name in ("bsam_samples", "eval_batch_size")
        if saved.get(name) is not None and saved[name] != getattr(config, name)
    ]
    if changed:
        warnings.warn(
            f"{path} is resumed with {' and '.join(changed)}: the model-average metrics "
            f"(test_*_bma) from epoch {epoch + 1} on are drawn from other weight samples than "
            "the rows before, so metrics.jsonl mixes the two",
            stacklevel=2,
        )


def _load_rank_state(optimizer: Any, saved: Any, info: DistInfo) -> None:
    """Give each rank its own saved optimizer state (see ``SharpnessAware.rank_state``).

    With another process count, a rank that was saved still gets its own; a new one keeps
    the state loaded from the checkpoint (rank 0's), except what must differ between
    ranks, which it derives from it (``SharpnessAware.derive_rank_state``: bSAM's noise
    stream; every rank drawing rank 0's noise would be one shared draw)."""
    if not info.enabled or optimizer.rank_state() is None:
        return
    if isinstance(saved, list) and info.rank < len(saved):
        optimizer.load_rank_state(saved[info.rank])
    elif info.rank > 0:  # rank 0's own state is the one the checkpoint holds
        optimizer.derive_rank_state(info.rank)


def as_trained(key: str, value: Any, settings: Mapping[str, Any]) -> Any:
    """The setting ``key`` of ``settings`` with the defaults that training fills in, so that
    an option restating its default (``--warmup-epochs 0``, ``--data-opt seed=0``,
    ``--augment`` on CIFAR, ``--model-opt norm=batch`` on cnn1d) is not another setting:
    the optimizer and a registered model resolved, the data set's options and the
    schedule's keys filled in, ``augment`` None as the data set's default (``train
    --resume`` and a resumed study compare settings so)."""
    from .models import resolved_model_spec
    from .optim.factory import resolve_optimizer_spec

    if key == "optimizer":
        return resolve_optimizer_spec(value)
    if key == "model" and isinstance(value, Mapping):
        try:
            return resolved_model_spec(value)
        except SharpscopeError:  # an option of an older version, say: compared as it is
            return value
    if key == "dataset" and isinstance(value, Mapping):
        return {**SPEC_DEFAULTS, **value}
    if key == "schedule" and isinstance(value, Mapping):
        return {**SCHEDULE_DEFAULTS, **value}
    if key == "augment" and value is None:
        dataset = settings.get("dataset")
        name = dataset.get("name") if isinstance(dataset, Mapping) else dataset
        return name in AUGMENTED_BY_DEFAULT
    return value


#: a key that one spec leaves out (its default), unlike one given as None: a model's
#: ``norm=none`` is not its default norm
_NOT_GIVEN = object()


def _shown(value: Any) -> str:
    """A setting's value as a refusal names it."""
    return "the default" if value is _NOT_GIVEN else json.dumps(value, default=str)


def differing_settings(key: str, old: Any, new: Any, was: str = "checkpoint") -> list[str]:
    """``"optimizer.rho 0.5 (checkpoint: 0.05)"`` for every leaf where two settings differ;
    ``"model.width null (checkpoint: the default)"`` for a key that one of them leaves out
    (``was`` names where the old value comes from: ``train --resume`` and a study's
    refusal of a changed run name them so)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping) and old.get("name") == new.get("name"):
        return [
            line
            for name in sorted(set(old) | set(new), key=str)
            for line in differing_settings(
                f"{key}.{name}", old.get(name, _NOT_GIVEN), new.get(name, _NOT_GIVEN), was
            )
        ]
    if old is new or (old is not _NOT_GIVEN and new is not _NOT_GIVEN and old == new):
        return []
    if isinstance(old, Mapping) and isinstance(new, Mapping) and "name" in old and "name" in new:
        old, new = old["name"], new["name"]  # another optimizer, model, ...: the names say it
    return [f"{key} {_shown(new)} ({was}: {_shown(old)})"]


#: the share of the training set LETS holds out for its radius where the data spec sets none
LETS_VAL_FRACTION = 0.1


def training_data_spec(dataset: Mapping[str, Any], optimizer: Mapping[str, Any]) -> dict:
    """The data spec a run trains on: LETS, which learns its radius on held-out data, gets
    ``val_fraction = 0.1`` where the spec gives none (training then uses the other 90%).

    >>> training_data_spec({"name": "digits"}, {"name": "lets"})
    {'name': 'digits', 'val_fraction': 0.1}
    """
    dataset = dict(dataset)
    if optimizer.get("name") == "lets" and not dataset.get("val_fraction"):
        dataset["val_fraction"] = LETS_VAL_FRACTION
    return dataset


def _prepare_data(
    config: TrainConfig, info: DistInfo
) -> tuple[DataSplit, DataSplit, DataSplit | None]:
    needs_val = config.optimizer.get("name") == "lets"
    dataset = training_data_spec(config.dataset, config.optimizer)
    if dataset != dict(config.dataset):
        config.dataset = dataset
    with one_factory_call():  # a factory's splits come from one call of it
        return _load_splits(config, dataset, needs_val, info)


def _load_splits(
    config: TrainConfig, dataset: dict[str, Any], needs_val: bool, info: DistInfo
) -> tuple[DataSplit, DataSplit, DataSplit | None]:
    train = load_data(dataset, "train", data_root=config.data_root, device=info.device)
    if train.targets.is_floating_point() or train.targets.dim() != 1:
        why = (
            "regression is not trained here (its accuracy, NLL and ECE are undefined); the "
            "analyses accept float targets"
            if train.targets.dim() == 1
            else "pass one class index per example, not one-hot or soft labels"
        )
        raise SharpscopeError(
            f"training needs class labels (integer targets of shape (N,)); the data gives "
            f"{str(train.targets.dtype).replace('torch.', '')} targets of shape "
            f"{tuple(train.targets.shape)}: {why}"
        )
    _check_no_negative_labels(train, "train")
    if train.num_classes < 2:  # one output: cross-entropy is 0 whatever the weights
        raise SharpscopeError(
            f"training needs at least 2 classes; the data hold a single class (every label is "
            f"{train.num_classes - 1}), so the model would get one output, whose cross-entropy "
            "is 0 whatever the weights: nothing would train"
        )
    # after the checks: a factory that fails says so in one line, without this first
    if train.test_is_train and info.is_main:
        warnings.warn(
            f"data factory {dataset['factory']} gives one data set: it is also the test set, "
            "so the test metrics are training metrics (gen_gap 0); return "
            '{"train": ..., "test": ...} for a test set of its own',
            stacklevel=2,
        )
    samples = dataset.get("samples")
    if samples is not None and int(samples) > len(train) and info.is_main:
        warnings.warn(
            f"samples {samples} is more than the {len(train)} examples of the train split; "
            f"using all {len(train)}",
            stacklevel=2,
        )
    test = load_data(dataset, "test", data_root=config.data_root, device=info.device)
    val = (
        load_data(dataset, "val", data_root=config.data_root, device=info.device)
        if needs_val
        else None
    )
    for name, split in (("test", test), ("val", val)):
        if split is not None and not split.targets.is_floating_point():
            _check_no_negative_labels(split, name)
    return train, test, val


def _check_no_negative_labels(split: DataSplit, name: str) -> None:
    """Refuse class labels below 0 when the data are loaded. cross_entropy skips -100 (its
    ignore_index), so such a run trained and then failed in its first evaluation, with a
    traceback and the epoch lost; the analyses only warn (README)."""
    negative = int((split.targets < 0).sum())
    if negative:
        raise SharpscopeError(
            f"the {name} data hold {negative} negative label{'s' if negative > 1 else ''} "
            f"(such as cross_entropy's ignore_index -100) among {len(split)} examples: "
            "training needs a class index from 0 for every example; drop the unlabelled ones"
        )


def _check_finite_inputs(split: DataSplit, name: str) -> None:
    """Refuse NaN or infinite inputs when the data are loaded: the first step's loss was
    NaN and the run was said to diverge, "lower the learning rate or rho" (bug B9,
    session 28)."""
    if not split.inputs.is_floating_point():
        return
    bad = int((~torch.isfinite(split.inputs)).sum())
    if bad:
        rows = int((~torch.isfinite(split.inputs.reshape(len(split), -1))).any(1).sum())
        raise SharpscopeError(
            f"the {name} data hold {bad} non-finite input value{'s' if bad > 1 else ''} (NaN "
            f"or inf) in {rows} of {len(split)} examples: training on them gives a NaN loss, "
            "not a model; clean or drop them in the data"
        )


def _in_model_dtype(split: DataSplit | None, model: nn.Module) -> DataSplit | None:
    """``split`` with floating-point inputs in the model's floating-point dtype, as the
    analyses read them: float64 data (``torch.from_numpy``'s) failed against float32
    weights in ``train`` alone (bug B8, session 28). The fingerprint the checkpoint records
    is of the data as the factory gave them."""
    if split is None or not split.inputs.is_floating_point():
        return split
    dtype = float_dtype(model)
    if dtype is None or dtype == split.inputs.dtype:
        return split
    return split.to(None, dtype=dtype)


def _cycling_batches(split: DataSplit, batch_size: int, seed: int):
    """Endless seeded batches of a split (LETS' validation stream)."""
    epoch = 0
    while True:
        order = torch.randperm(len(split), generator=_generator(seed, epoch, 3)).to(
            split.inputs.device
        )
        for start in range(0, len(split) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            yield split.inputs[idx], split.targets[idx]
        epoch += 1


def _epoch_files(out: Path) -> list[Path]:
    """``out``'s ``epoch_NNN.pt`` checkpoints in epoch order (epoch_999 before epoch_1000)."""
    files = [p for p in out.glob("epoch_*.pt") if p.stem[len("epoch_") :].isdigit()]
    return sorted(files, key=lambda p: int(p.stem[len("epoch_") :]))


def _check_no_earlier_run(out: Path) -> None:
    """Refuse to start a new run in a folder that holds an earlier one's checkpoints
    (``last.pt`` or ``epoch_NNN.pt``): they would be overwritten, or left beside the new
    run's (a PCA of the folder would then mix two runs). A run stopped before its first
    checkpoint left only config.json and metrics.jsonl: the same command starts it again."""
    if (out / "last.pt").exists():
        raise SharpscopeError(
            f"{out} already holds a training run (last.pt); continue it with --resume "
            "(Python: train(..., resume=True)), or train into another output folder (--out; "
            "or delete that one)"
        )
    earlier = [p.name for p in _epoch_files(out)]
    if earlier:
        shown = ", ".join(earlier[:3]) + (", ..." if len(earlier) > 3 else "")
        raise SharpscopeError(
            f"{out} holds checkpoints of an earlier run ({shown}); train into another "
            f"output folder (--out), or delete them (to resume, copy {earlier[-1]} to last.pt and add --resume)"
        )


def _mend_after_a_kill(out: Path, epoch: int, save_every: int) -> None:
    """Before a resume: write ``epoch_NNN.pt`` of the checkpoint's own epoch if a kill cut
    its write short (``last.pt`` is written first and holds the same state), and remove
    the temporary files that killed writes left (``.last.pt.*.tmp``, one checkpoint each)."""
    snapshot = out / f"epoch_{epoch:03d}.pt"
    if save_every and epoch % save_every == 0 and not snapshot.exists():
        atomic_write_bytes(snapshot, (out / "last.pt").read_bytes())
    for leftover in out.glob(".*.pt.*.tmp"):
        leftover.unlink(missing_ok=True)


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    before_training: Callable[[], None] | None = None,
) -> TrainSummary:
    """Train one model as ``config`` says; see the module docstring for the files written.

    ``before_training`` is called once (on the main process) when the data, model and
    optimizer are ready and their options checked, just before the first step: the command
    line warns there that nothing will be saved, so bad input still gives one line only.

    Raises:
        SharpscopeError: bad configuration or data; :class:`TrainingDiverged` when the
            loss becomes non-finite (the last good checkpoint is kept).
    """
    config.validate()
    with deterministic_algorithms(config.deterministic), _out_locked(config.out, config.device):
        return _train(config, resume, before_training)


def _out_locked(out: str | Path | None, device: str = "auto") -> contextlib.AbstractContextManager:
    """Hold a lock on the ``out`` folder for the whole run (on the main process), so that a
    second ``train`` into the same folder is refused instead of mixing two runs' files
    there; a folder made here for a run that stopped before writing anything is removed.

    Under torchrun the processes form their group first and rank 0 shares the outcome
    (:func:`~sharpscope.locking.locked_on_main`), so that a refusal stops every rank at once."""
    if out is None:
        return contextlib.nullcontext()
    return locked_on_main(Path(out), _hold_out_folder, device)


def _hold_out_folder(out: Path, held: contextlib.ExitStack) -> None:
    """Create ``out`` if needed and lock it until ``held`` closes, which then removes the
    folders made here (``out`` and the parents it needed) that are still empty (a refused
    run leaves the holder's folder alone; a lock that could not be tried removes them at
    once)."""
    remove_if_empty = make_folder(out)
    busy = (
        f"another `sharpscope train` is writing into {out}; wait for it to finish or "
        "train into another --out"
    )
    try:
        held.enter_context(exclusive_lock(out, busy))
    except SharpscopeError:
        raise  # busy: the folder is the holder's
    except BaseException:
        remove_if_empty()  # the lock could not be tried (out of file descriptors, ...)
        raise
    held.callback(remove_if_empty)  # runs before the lock is released


def _check_trainable(model: nn.Module) -> None:
    """Refuse, before any file is written, a model that trains but could not be analysed
    (TorchScript), or that has nothing to train (its first step failed in backward)."""
    problem = torchscript_problem(model, "return the Python nn.Module (not scripted) to train")
    if problem is not None:
        raise SharpscopeError(problem)
    if not any(p.requires_grad for p in model.parameters()):
        which = (
            "no trainable parameters (all requires_grad=False?)"
            if any(True for _ in model.parameters())
            else "no parameters at all"
        )
        raise SharpscopeError(f"the model has {which}: there is nothing to train")


def _to_device(model: nn.Module, device: torch.device) -> nn.Module:
    """``model.to(device)``; a model too large for the device is one line that says so
    (the out-of-memory advice of a training step, a smaller batch, would not help)."""
    try:
        return model.to(device)
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        count = sum(p.numel() for p in model.parameters())
        raise SharpscopeError(
            f"the model ({count:,} parameters) does not fit in the memory of {device}; "
            "choose a smaller model"
        ) from exc


def _refuse_sparse_embeddings(model: nn.Module) -> None:
    """Refuse ``nn.Embedding(sparse=True)`` in one line before the first step: weight decay,
    momentum, Adam and the sharpness-aware perturbations all add dense tensors to the
    gradient, and PyTorch failed there with "add(sparse, dense) is not supported"."""
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            raise SharpscopeError(
                f"the model's {type(module).__name__} '{name}' has sparse=True: training "
                "adds dense tensors to its gradient (weight decay, momentum, Adam, the "
                "sharpness-aware perturbation); build it with sparse=False"
            )


def _resume_with(batch_size: int, per_process: int = 1) -> str:
    """The advice for a resume under torchrun that cannot split the run's batch: its batch
    size and bSAM splits are the checkpoint's, so only the process count can change: to
    one that divides the batch and leaves each process ``per_process`` examples.

    >>> _resume_with(32), _resume_with(12, 4), _resume_with(720)
    ('resume with 1, 2, 4, 8, 16 or 32 processes', 'resume with 1, 2 or 3 processes', \
'resume with 1, 2, 3, 4, 5, 6 or 8 processes (or another divisor of 720)')
    """
    counts = [
        n
        for n in range(1, batch_size + 1)
        if batch_size % n == 0 and batch_size // n >= per_process
    ]
    if len(counts) < 2:
        return "resume with one process"
    shown = [str(n) for n in counts[:7]]
    more = f" (or another divisor of {batch_size})" if len(counts) > 7 else ""
    return f"resume with {', '.join(shown[:-1])} or {shown[-1]} processes{more}"


def _check_batchnorm_examples(
    model: nn.Module,
    split: DataSplit,
    config: TrainConfig,
    info: DistInfo,
    splits: int,
    resume: bool = False,
) -> None:
    """Refuse, before any file is written, a step whose forward pass holds one example when
    a BatchNorm in train mode sees one value per channel (over plain features): PyTorch
    fails there with a traceback. The examples per forward pass are the batch, per process
    under torchrun (all processes with SyncBatchNorm), per bSAM split (m-sharpness's
    ``m`` is checked by the optimizer itself)."""
    per_rank = config.batch_size // info.world_size
    per_pass = per_rank // splits
    if info.enabled and config.sync_bn:
        per_pass *= info.world_size
    if per_pass > 1:
        return
    name = batchnorm_on_one_value(model, split.inputs[:1])
    if name is None:
        return
    if splits > 1:
        why = (
            f"bsam splits {splits} cut a batch of {per_rank}"
            + (" per process" if info.world_size > 1 else "")
            + " into chunks as small as one example"
        )
        fix = f"use splits <= {per_rank // 2} or a larger --batch-size"
    elif info.world_size > 1:
        why = f"--batch-size {config.batch_size} leaves one example per process"
        fix = f"use --batch-size {2 * info.world_size} or more"
    else:
        why = "--batch-size 1 runs the model on one example per step"
        fix = "use --batch-size 2 or more"
    if resume and info.world_size > 1:  # the run's batch and splits are the checkpoint's
        fix = _resume_with(config.batch_size, 2 * splits)
    raise SharpscopeError(
        f"{why}, and BatchNorm '{name}' in train mode cannot normalize a single example "
        f"(one value per channel); {fix}, or a model without BatchNorm"
    )


def _bf16_supported(device: torch.device) -> bool:
    """Whether CUDA ``device`` runs bfloat16 autocast (emulated counts, as for torch.autocast)."""
    if device.index is None:  # the current device
        return torch.cuda.is_bf16_supported()
    with torch.cuda.device(device.index):
        return torch.cuda.is_bf16_supported()


def _check_precision(config: TrainConfig, device: torch.device) -> None:
    """Refuse, before any file is written, a precision that ``device`` or the optimizer's
    options cannot train in (one line each; an m-sharpness run in fp16 was refused only at
    its first step, after config.json and metrics.jsonl were written)."""
    if config.precision == "fp16" and device.type != "cuda":
        raise SharpscopeError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    if config.precision == "bf16" and device.type == "cuda" and not _bf16_supported(device):
        # else torch.autocast refused it inside the first step, after config.json was written
        raise SharpscopeError(
            f"--precision bf16 needs a GPU with bfloat16 support, which "
            f"{torch.cuda.get_device_name(device)} lacks; use --precision fp16 or fp32"
        )
    if config.precision == "fp16" and config.optimizer.get("m") is not None:
        raise SharpscopeError(
            "--m cannot be combined with --precision fp16 (m-sharpness training has no fp16 "
            "GradScaler); use --precision bf16 or fp32"
        )


def _train(
    config: TrainConfig, resume: bool, before_training: Callable[[], None] | None
) -> TrainSummary:
    from .optim.closure import BatchClosure
    from .optim.factory import build_optimizer, optimizer_metrics, step_metrics
    from .optim.msam import check_groups_for_batchnorm

    info = init_from_env(config.device)
    device = info.device
    _check_precision(config, device)
    if config.batch_size % info.world_size:
        lower = config.batch_size - config.batch_size % info.world_size
        near = " or ".join(str(b) for b in (lower, lower + info.world_size) if b > 0)
        fix = (
            _resume_with(config.batch_size)
            if resume
            else f"choose a multiple of {info.world_size}, such as {near}"
        )
        raise SharpscopeError(
            f"batch size {config.batch_size} is not divisible by the {info.world_size} "
            f"processes; {fix}"
        )
    out = Path(config.out) if config.out else None
    if out is not None and not resume:  # nothing is lost
        _check_no_earlier_run(out)
    torch.manual_seed(config.seed)
    train_split, test_split, val_split = _prepare_data(config, info)
    for name, split in (("train", train_split), ("test", test_split), ("val", val_split)):
        if split is not None:
            check_same_data(split.inputs, split.targets, f"{name} data")
            _check_finite_inputs(split, name)
    num_train = len(train_split)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise SharpscopeError(
            f"batch size {config.batch_size} is larger than the {num_train} training examples"
        )
    loss_fn = get_loss(config.loss)
    model = build_model(config.model, train_split.input_shape, train_split.num_classes)
    _check_trainable(model)
    _warn_half_weights(model)
    model = _to_device(model, device)
    train_split, test_split, val_split = (
        _in_model_dtype(split, model) for split in (train_split, test_split, val_split)
    )
    check_model_on_data(
        model, train_split.inputs, train_split.targets, loss_fn, train_split.num_classes
    )
    _refuse_sparse_embeddings(model)
    if info.enabled:
        if config.sync_bn:
            if device.type != "cuda":  # PyTorch's SyncBatchNorm runs on GPU modules only
                raise SharpscopeError(
                    "sync_bn needs CUDA devices (SyncBatchNorm runs on GPU modules only); "
                    "drop sync_bn to train on the CPU, where each process keeps its own statistics"
                )
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        wrapped: nn.Module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
        if device.type == "cpu" or config.deterministic:  # a resume sums in the same order
            wrapped.register_comm_hook(None, reduce_each_gradient)
    else:
        wrapped = model
    val_batches = (
        _cycling_batches(val_split, min(config.batch_size, len(val_split)), config.seed)
        if val_split is not None
        else None
    )
    optimizer = build_optimizer(
        _optimizer_spec(config),
        wrapped,
        num_data=num_train,
        val_batches=val_batches,
        steps_per_epoch=steps_per_epoch,
    )
    splits, per_rank = getattr(optimizer, "splits", 1), config.batch_size // info.world_size
    if splits > per_rank:  # else refused at the first step, after config.json is written
        fix = (
            _resume_with(config.batch_size, splits)
            if resume
            else f"use splits <= {per_rank} or a larger --batch-size"
        )
        raise SharpscopeError(
            f"bsam splits {splits} is more than the {per_rank} examples of a batch"
            + (" per process" if info.world_size > 1 else "")
            + f"; {fix}"
        )
    _check_batchnorm_examples(model, train_split, config, info, splits, resume)
    if getattr(optimizer, "hypergrad", None) == "hvp":  # else a traceback at the first step
        from .optim.lets import check_second_derivatives

        few = train_split.inputs[:2].to(device), train_split.targets[:2].to(device)
        check_second_derivatives(model, *few, loss_fn)
    if getattr(optimizer, "m", None) is not None:  # else refused at the first step
        check_groups_for_batchnorm(model, optimizer.m, min(per_rank, num_train // info.world_size))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(config.schedule, step, steps_per_epoch, config.epochs),
    )
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
    scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
    augment = (
        config.augment
        if config.augment is not None
        else config.dataset.get("name") in AUGMENTED_BY_DEFAULT
    )
    if augment and len(train_split.input_shape) != 3:
        raise SharpscopeError(
            "augment (random crop + flip) needs images of shape (C, H, W), but the data give "
            f"inputs of shape {tuple(train_split.input_shape)}; drop --augment"
        )

    start_epoch, step, history = 0, 0, []
    last_path = out / "last.pt" if out else None
    if resume:
        if last_path is None or not last_path.exists():
            snapshots = _epoch_files(out) if out is not None else []
            hint = (
                f" ({snapshots[-1].name} is there: copy it to last.pt to resume from it)"
                if snapshots
                else ""
            )
            raise SharpscopeError(
                f"--resume needs {last_path or 'OUT/last.pt'} from an earlier run; none found{hint}"
            )
        state = load_training_state(last_path, map_location=device)
        start_epoch, step = _resume_position(state, last_path)
        check_resume(config, state["config"], start_epoch, last_path)
        load_weights(model, state["state_dict"], source=f"in {last_path}")
        _restore(last_path, "optimizer_state", optimizer.load_state_dict, state)
        _restore(last_path, "scheduler_state", scheduler.load_state_dict, state)
        if scaler is not None and state.get("scaler_state"):
            _restore(last_path, "scaler_state", scaler.load_state_dict, state)
        _restore(last_path, "rng_state", lambda s: _set_rng_state(s, device), state)
        if start_epoch < config.epochs and info.is_main:  # a finished run has nothing to do
            _warn_other_world_size(state, info, last_path)
            _warn_other_model_average(config, state["config"], start_epoch, last_path)
            warn_if_not_as_trained(
                train_split.source_summary,
                state.get("data_summary"),
                str(config.dataset.get("factory")),
                str(last_path),
                "the resumed run trains on the data read now, unlike the uninterrupted run",
            )
        _load_rank_state(optimizer, state.get("rank_states"), info)
        history = _read_history(out / "metrics.jsonl", step)
    if out and info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", _written_config(config))
        # on resume, drop rows logged after the checkpoint we resume from
        rows = "".join(json.dumps(r) + "\n" for r in history) if resume else ""
        atomic_write_bytes(out / "metrics.jsonl", rows.encode())
        if resume:
            _mend_after_a_kill(out, start_epoch, config.save_every)
    if info.is_main:
        _warn_unusual_settings(config, scheduler.base_lrs, info.world_size)
    if before_training is not None and info.is_main:
        before_training()

    per_rank = config.batch_size // info.world_size
    lo, hi = info.rank * per_rank, (info.rank + 1) * per_rank
    is_bsam = config.optimizer.get("name") == "bsam"
    metrics: dict[str, Any] = history[-1] if history else {}
    progress = None
    if config.progress and info.is_main and start_epoch < config.epochs:
        from .progress import progress_bar

        progress = progress_bar(
            config.epochs * steps_per_epoch,
            "step",
            f"train {config.optimizer.get('name')}",
            initial=start_epoch * steps_per_epoch,
        )
    # a lost process stops the run as an interrupt does; the bar is closed however it ends
    with peers_checked(), progress if progress is not None else contextlib.nullcontext():
        for epoch in range(start_epoch, config.epochs):
            started = time.perf_counter()
            wrapped.train()
            order = torch.randperm(num_train, generator=_generator(config.seed, epoch, 1))
            augment_gen = _generator(config.seed, epoch, 2)
            running = 0.0  # the epoch's summed batch losses (host floats)
            step_rows = []  # written with the epoch's evaluation row
            for batch in range(steps_per_epoch):
                idx = order[batch * config.batch_size : (batch + 1) * config.batch_size][lo:hi]
                idx = idx.to(device)
                inputs, targets = train_split.inputs[idx], train_split.targets[idx]
                if augment:
                    inputs = random_crop_flip(inputs, augment_gen)
                closure = BatchClosure(
                    wrapped,
                    loss_fn,
                    inputs,
                    targets,
                    autocast_dtype=autocast_dtype,
                    scaler=scaler,
                )
                loss = optimizer.step(closure)
                lr_used = float(scheduler.get_last_lr()[0])  # the row's lr: this epoch's last
                scheduler.step()
                step += 1
                loss_value = float(loss) if loss is not None else float("nan")
                if info.enabled:  # the mean over the ranks: all of them see a divergence
                    loss_value = _mean_over_ranks(loss_value, device, info.world_size)
                if not math.isfinite(loss_value):
                    kept = (
                        f"; last good checkpoint {last_path} kept"
                        if last_path and last_path.exists()
                        else ""
                    )
                    raise TrainingDiverged(
                        f"training diverged: loss is {loss_value} at epoch {epoch + 1}, step {step}"
                        f"{kept}; lower the learning rate or rho"
                    )
                running += loss_value
                logged = step_metrics(optimizer) if out and info.is_main else {}
                if logged:
                    step_rows.append({"kind": "step", "epoch": epoch + 1, "step": step, **logged})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)

            metrics = _evaluate_epoch(
                model,
                optimizer if is_bsam else None,
                train_split,
                test_split,
                loss_fn,
                config,
                autocast_dtype,
            )
            metrics.update(
                kind="eval",
                epoch=epoch + 1,
                step=step,
                lr=lr_used,
                train_loss_running=running / steps_per_epoch,
                seconds=time.perf_counter() - started,
                **optimizer_metrics(optimizer),
            )
            if scaler is not None:  # fp16: a run whose steps the scaler skips shows it here
                metrics["amp_scale"] = float(scaler.get_scale())
            bad = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise TrainingDiverged(
                    f"training diverged: non-finite evaluation metrics at epoch {epoch + 1}: "
                    f"{', '.join(bad)}; lower the learning rate or rho"
                )
            history.append(metrics)
            line = (
                f"epoch {epoch + 1}/{config.epochs}  train loss {metrics['train_loss']:.4f} "
                f"acc {metrics['train_acc']:.4f}  test loss {metrics['test_loss']:.4f} "
                f"acc {metrics['test_acc']:.4f}"
            )
            if progress is not None:
                progress.write(line, file=sys.stderr)  # progress, like the bar itself
            elif info.is_main:
                log.info(line)  # shown by `train --no-progress` (batch logs); silent by default
            if out is not None:
                # each rank's own optimizer state (bSAM noise, LETS/VaSSO per-rank tensors)
                local = optimizer.rank_state() if info.enabled else None
                rank_states = gather_to_main(local) if local is not None else None
                if info.is_main:
                    payload = _checkpoint_payload(
                        config,
                        model,
                        optimizer,
                        scheduler,
                        scaler,
                        train_split,
                        epoch + 1,
                        step,
                        metrics,
                        device,
                    )
                    payload["world_size"] = info.world_size
                    if rank_states is not None:
                        payload["rank_states"] = rank_states
                    # rows first: a run killed in between resumes from the previous
                    # checkpoint and drops rows past it, so no evaluation row is ever lost;
                    # a Ctrl-C or SIGTERM meanwhile stops the run once the epoch is saved
                    with stop_signals_held():
                        with (out / "metrics.jsonl").open("a") as handle:
                            rows = [*step_rows, metrics]
                            handle.write("".join(json.dumps(r) + "\n" for r in rows))
                        save_checkpoint(out / "last.pt", payload)
                        if config.save_every and (epoch + 1) % config.save_every == 0:
                            save_checkpoint(out / f"epoch_{epoch + 1:03d}.pt", payload)
                barrier()
    evaluations = eval_rows(history)
    return TrainSummary(
        out, metrics, evaluations, config.epochs, step, model, info.is_main, start_epoch
    )


def _evaluate_epoch(
    model: nn.Module,
    bsam: torch.optim.Optimizer | None,
    train_split: DataSplit,
    test_split: DataSplit,
    loss_fn,
    config: TrainConfig,
    autocast_dtype: torch.dtype | None,
) -> dict[str, Any]:
    """Train and test metrics; clean-label train accuracy under noise; bSAM's model average."""
    kwargs = {
        "batch_size": config.eval_batch_size,
        "autocast_dtype": autocast_dtype,
        "distributed": is_multi_process(),  # every rank evaluates its share
    }
    train_m = evaluate(model, train_split.inputs, train_split.targets, loss_fn, **kwargs)
    test_m = evaluate(model, test_split.inputs, test_split.targets, loss_fn, **kwargs)
    metrics: dict[str, Any] = {f"train_{k}": v for k, v in train_m.items()}
    metrics.update({f"test_{k}": v for k, v in test_m.items()})
    if train_split.clean_targets is not None:
        clean = evaluate(model, train_split.inputs, train_split.clean_targets, loss_fn, **kwargs)
        metrics["train_clean_acc"] = clean["acc"]
        metrics["train_clean_loss"] = clean["loss"]
    if bsam is not None:
        generator = torch.Generator(device=test_split.inputs.device).manual_seed(config.seed + 17)

        def average(x: Tensor) -> Tensor:
            return bsam.predict(model, x, num_samples=config.bsam_samples, generator=generator)

        bma = evaluate(
            model, test_split.inputs, test_split.targets, loss_fn, probs_fn=average, **kwargs
        )
        metrics.update({f"test_{k}_bma": v for k, v in bma.items() if k != "loss"})
    # gen_gap as in the studies (analysis.md section 7): test error - train error
    metrics["gen_gap"] = metrics["train_acc"] - metrics["test_acc"]
    metrics["loss_gap"] = metrics["test_loss"] - metrics["train_loss"]
    return metrics


def _checkpoint_payload(
    config: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: Any,
    train_split: DataSplit,
    epoch: int,
    step: int,
    metrics: Mapping[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "sharpscope_version": __version__,
        "model": dict(config.model),
        "data": dict(config.dataset),
        "loss": config.loss,
        "optimizer": _resolved_optimizer(config),
        "config": config.to_dict(),
        "epoch": epoch,
        "step": step,
        "metrics": {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and k not in ("epoch", "step")
        },
        "input_shape": list(train_split.input_shape),
        "num_classes": train_split.num_classes,
        "state_dict": {k: v.detach().cpu() for k, v in _unwrap(model).state_dict().items()},
        "optimizer_state": optimizer.state_dict(),
        "scheduler_state": scheduler.state_dict(),
        "scaler_state": scaler.state_dict() if scaler is not None else None,
        "rng_state": _rng_state(device),
    }
    if train_split.source_summary is not None:  # a data factory's: an analysis compares
        payload["data_summary"] = train_split.source_summary
    return payload
