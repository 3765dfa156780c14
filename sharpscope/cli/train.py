"""``sharpscope train``: one training run from flags or a TOML config."""

from __future__ import annotations

import contextlib
import errno
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import typer

from ._common import (
    check_number,
    check_output_folder,
    console,
    echo,
    fail,
    guarded,
    interrupt_exit_code,
    os_error_line,
    parse_options,
    speaks_for_the_job,
    spec_from_flag,
    stop_reason,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

# errno of a write that found no room: a full disk, a quota, a file size limit
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)

# Optimizer hyperparameters exposed as flags: flag name -> spec key (optimizers.md).
OPTIMIZER_FLAGS = {
    "rho": "rho",
    "eta": "eta",
    "theta": "theta",
    "m": "m",
    "adaptive_form": "adaptive",
    "normalize_bias": "normalize_bias",
    "bn_policy": "bn_policy",
    "perturbation": "perturbation",
    "same_noise": "same_noise",
    "max_grad_norm": "max_grad_norm",
    "rho_lr": "rho_lr",
    "rho_min": "rho_min",
    "rho_max": "rho_max",
    "hypergrad": "hypergrad",
    "inner": "inner",
    "exclude_norm": "exclude_norm",
    "fast_first_pass": "fast_first_pass",
    "prior_precision": "prior_precision",
    "damping": "damping",
    "s_init": "s_init",
    "splits": "splits",
    "data_aug_factor": "data_aug_factor",
}


def _flag_over_table(flag: str, value: str | None, table: dict[str, Any]) -> dict[str, Any]:
    """The spec a ``--dataset``/``--model``/``--base`` flag gives over the config's table:
    the table itself (its options kept) when the flag names the same thing, else the
    flag's, with a warning naming the options left behind."""
    given = spec_from_flag(value, None)
    if given is None or given == {k: table.get(k) for k in given}:
        return dict(table)
    dropped = sorted(set(table) - {"name", "factory"})
    if dropped:
        warnings.warn(
            f"{flag} {value} replaces the config's {table.get('name') or table.get('factory')} "
            f"and its options ({', '.join(dropped)})",
            UserWarning,
            stacklevel=2,
        )
    return given


def _switch_optimizer(
    previous: dict[str, Any], name: str, base_names: tuple[str, ...] | list[str]
) -> dict[str, Any]:
    """The config's optimizer table with ``--optimizer NAME`` of another name: the base
    optimizer's settings (a plain sgd/adam table, or a SAM variant's ``base``) carry over
    to the new one (sweeping the variants over one shared config keeps its lr, momentum and
    weight decay); the old optimizer's own options are left behind, with a warning."""
    old = previous.get("name", "sgd")
    if old in base_names:
        settings, held = dict(previous), set(previous)  # the table is the settings
    else:
        base = previous.get("base") or {"name": "sgd"}
        settings = {"name": base} if isinstance(base, str) else {"name": "sgd", **base}
        held = {"base"}
    if name in base_names and settings["name"] == name:
        switched = settings
    elif name not in base_names and name != "bsam":  # bSAM has its own update, no base
        switched = {"name": name, "base": settings}
    else:  # nothing carries over
        switched, held = {"name": name}, set()
    dropped = sorted(set(previous) - {"name"} - held)
    if dropped:
        warnings.warn(
            f"--optimizer {name} replaces the config's {old} and its options ({', '.join(dropped)})",
            UserWarning,
            stacklevel=2,
        )
    return switched


def _read_config(path: Path) -> dict[str, Any]:
    """TrainConfig keys from a TOML file, or from the ``config.json`` a run wrote."""
    import json

    from ..errors import SharpscopeError

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SharpscopeError(f"config file not found: {path}") from exc
    except UnicodeDecodeError as exc:
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise SharpscopeError(f"{path} is not a {kind} file (not UTF-8 text)") from exc
    if path.suffix == ".json":
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SharpscopeError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(values, dict):
            raise SharpscopeError(f"{path} must hold an object of TrainConfig keys")
        from ..trainer import RESOLVED_MODEL_KEY, RESOLVED_OPTIMIZER_KEY

        for record in (RESOLVED_OPTIMIZER_KEY, RESOLVED_MODEL_KEY):
            values.pop(record, None)  # a record of the run, not a setting
    else:
        try:
            values = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise SharpscopeError(f"{path} is not valid TOML: {exc}") from exc
    if isinstance(values.get("train"), dict) and "study" in values:
        raise SharpscopeError(
            f"{path} is a study config: run it with `sharpscope study run {path}` (train's "
            "--config takes TrainConfig keys at the top level)"
        )
    if not values:
        warnings.warn(
            f"{path} sets nothing: the run takes the defaults and its flags", stacklevel=2
        )
    return values


#: the train flags that name a model, data set or loss instead of a checkpoint's own
FACTORY_FLAGS = {"model": "--model", "data set": "--dataset", "loss": "--loss"}
#: where a training config (and this command's values) keeps each kind
CONFIG_KEYS = {"model": "model", "data set": "dataset", "loss": "loss"}


def _check_resumed_factories(resumed: dict[str, Any], values: dict[str, Any], path: Path) -> None:
    """Refuse, in one line, the module:function factories that a checkpoint's own config
    names and no flag replaces: resuming someone else's run folder would run their code."""
    from ..registry import check_trusted_factories

    recorded = {kind: resumed.get(key) for kind, key in CONFIG_KEYS.items()}
    given = {kind: values[key] for kind, key in CONFIG_KEYS.items()}
    check_trusted_factories(
        recorded, path, False, given=given, flags=FACTORY_FLAGS, what="the run folder"
    )


def _check_not_a_study_folder(out: Path) -> None:
    """Refuse a study's folder or one of its run folders: ``sharpscope study run`` trains
    there, and a run of other settings would fail the study later (or sit beside study.json)."""
    from ..errors import SharpscopeError

    if (out / "study.json").is_file():
        raise SharpscopeError(
            f"{out} is a study folder (study.json): train into another --out "
            f"(`sharpscope study run` trains the study's runs)"
        )
    if (out / "run.json").is_file():
        raise SharpscopeError(
            f"{out} is a run folder of a study (run.json): `sharpscope study run` on the study "
            "folder trains and resumes it; train into another --out"
        )


def build_config(
    values: dict[str, Any], config_file: Path | None, resumed: dict[str, Any] | None = None
) -> Any:  # returns TrainConfig
    """Merge a TOML config (or, on ``--resume`` without one, the settings stored in the
    checkpoint, ``resumed``) with the flags the user gave (flags win)."""
    from ..errors import SharpscopeError
    from ..optim.factory import BASE_NAMES
    from ..registry import normalize_spec
    from ..trainer import TrainConfig

    base: dict[str, Any] = _read_config(config_file) if config_file else dict(resumed or {})
    base = {k.replace("-", "_"): v for k, v in base.items()}
    if resumed is not None and not config_file:
        base["progress"] = True  # --no-progress applies to this call only
    config = TrainConfig.from_dict(base) if base else TrainConfig()

    if values["dataset"] is not None or values["data_opts"]:
        dataset = _flag_over_table("--dataset", values["dataset"], config.dataset)
        config.dataset = {**dataset, **values["data_opts"]}
        if "data_root" in values["data_opts"]:  # the flag wins over the config's (or resumed) one
            config.data_root = None
    for key in ("label_noise", "val_fraction", "samples"):
        if values[key] is not None:
            given = values["data_opts"].get(key, values[key])
            if given != values[key]:  # the flag silently won
                flag = f"--{key.replace('_', '-')}"
                raise SharpscopeError(
                    f"{flag} {values[key]} and --data-opt {key}={given} disagree; give one"
                )
            config.dataset = {**config.dataset, key: values[key]}
    if values["model"] is not None or values["model_opts"]:
        model = _flag_over_table("--model", values["model"], config.model)
        config.model = {**model, **values["model_opts"]}

    optimizer = dict(config.optimizer)
    if values["optimizer"] is not None and values["optimizer"] != optimizer.get("name"):
        if "optimizer" in base:  # a table the user wrote: its base settings carry over
            optimizer = _switch_optimizer(optimizer, values["optimizer"], BASE_NAMES)
        else:  # the built-in default
            optimizer = {"name": values["optimizer"]}
    name = optimizer.get("name", "sgd")
    base_keys = {
        "lr": values["lr"],
        "momentum": values["momentum"],
        "weight_decay": values["weight_decay"],
        "nesterov": values["nesterov"],
    }
    # Unset hyperparameters are filled by the optimizer factory (resolve_optimizer_spec),
    # and the checkpoint stores that resolved spec.
    if name in BASE_NAMES:
        if values["base"] is not None:
            raise SharpscopeError(
                f"--base is the base optimizer of a SAM variant; {name} is a base optimizer "
                "itself (use --optimizer for it)"
            )
        optimizer.update({k: v for k, v in base_keys.items() if v is not None})
    elif name == "bsam":
        ignored = [
            k for k in ("momentum", "weight_decay", "nesterov", "base") if values[k] is not None
        ]
        if ignored:
            flags = ", ".join("--" + k.replace("_", "-") for k in ignored)
            raise SharpscopeError(
                f"bsam has its own update (Adam-like moments, prior precision as weight decay): "
                f"{flags} {'does' if len(ignored) == 1 else 'do'} not apply; use "
                "--prior-precision, --damping, --opt betas=..."
            )
        if values["lr"] is not None:
            optimizer["lr"] = values["lr"]
    else:
        # a name ("adam") or a table; a table without a name is over sgd, as `{}` is
        base_given = optimizer.get("base") or "sgd"
        if isinstance(base_given, dict) and "name" not in base_given:
            base_given = {"name": "sgd", **base_given}
        base_spec = normalize_spec(base_given, "base optimizer")
        if values["base"] is not None and values["base"] != base_spec["name"]:
            # another base: the options of the config's (momentum for sgd, ...) stay behind
            base_spec = _flag_over_table("--base", values["base"], base_spec)
        if base_spec["name"] not in BASE_NAMES:
            raise SharpscopeError(
                f"unknown base optimizer '{base_spec['name']}'; choose one of: {', '.join(BASE_NAMES)}"
            )
        base_spec.update({k: v for k, v in base_keys.items() if v is not None})
        optimizer["base"] = base_spec
    for flag, key in OPTIMIZER_FLAGS.items():
        if values[flag] is not None:
            optimizer[key] = values[flag]
    optimizer.update(values["opt"])
    config.optimizer = optimizer

    for key in (
        "epochs",
        "batch_size",
        "seed",
        "save_every",
        "device",
        "precision",
        "data_root",
        "loss",
        "augment",
        "deterministic",
        "bsam_samples",
    ):
        if values[key] is not None:
            setattr(config, key, values[key])
    if values["out"] is not None:
        config.out = str(values["out"])
    if values["schedule"] is not None or values["warmup_epochs"] is not None:
        schedule = dict(config.schedule)
        if values["schedule"] is not None and values["schedule"] != schedule.get("name"):
            schedule = {"name": values["schedule"]}
        if values["warmup_epochs"] is not None:
            schedule["warmup_epochs"] = values["warmup_epochs"]
        config.schedule = schedule
    if values["no_progress"]:
        config.progress = False
    config.validate()
    return config


# Number flags checked before anything is loaded: NaN is never a meaningful value (an
# optimizer given one trains to a NaN loss and reports a divergence), and these have a
# lower bound of their own.
NUMBER_MINIMUMS = {"weight_decay": 0.0, "momentum": 0.0, "lr": 0.0}
FLOAT_FLAGS = (
    "rho",
    "lr",
    "momentum",
    "weight_decay",
    "warmup_epochs",
    "label_noise",
    "val_fraction",
    "eta",
    "theta",
    "max_grad_norm",
    "rho_lr",
    "rho_min",
    "rho_max",
    "prior_precision",
    "damping",
    "s_init",
    "data_aug_factor",
)


def check_float_flags(values: dict[str, Any]) -> None:
    """Refuse NaN in any number flag, infinity in all but the limits (``--max-grad-norm``,
    ``--rho-max``: no limit), and a negative weight decay, momentum or learning rate, in
    one line naming the flag."""
    from ..errors import SharpscopeError

    for name in FLOAT_FLAGS:
        value = values.get(name)
        flag = "--" + name.replace("_", "-")
        if value is None:
            continue
        if name in NUMBER_MINIMUMS:
            check_number(flag, value, minimum=NUMBER_MINIMUMS[name])
        elif value != value:
            raise SharpscopeError(f"{flag} must be a number, got nan")
        elif name not in ("max_grad_norm", "rho_max") and abs(value) == float("inf"):
            raise SharpscopeError(f"{flag} must be a finite number, got {value:g}")


@contextlib.contextmanager
def flags_named(values: dict[str, Any]) -> Iterator[None]:
    """An error about a setting the user gave as a flag names the flag: "epochs must be a
    positive integer" -> "--epochs must be ...", as the other commands' errors do (a value
    from --config keeps its key's name)."""
    from ..errors import SharpscopeError

    try:
        yield
    except SharpscopeError as exc:
        key, _, rest = str(exc).partition(" ")
        param, flag = RENAMED_FLAGS.get(key, (key, f"--{key.replace('_', '-')}"))
        given = values.get(param)
        if rest and given is not None and not isinstance(given, (bool, dict, Path)):
            raise SharpscopeError(f"{flag} {rest}") from exc
        raise


# optimizer options whose flag has another name: option -> (parameter, flag)
RENAMED_FLAGS = {"adaptive": ("adaptive_form", "--form")}


def _log_epochs() -> None:
    """Send the trainer's per-epoch lines (logger ``sharpscope.trainer``) to stderr."""
    import logging

    class ToStderr(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            sys.stderr.write(self.format(record) + "\n")  # the stream of the moment

    logger = logging.getLogger("sharpscope.trainer")
    if not any(type(h).__name__ == "ToStderr" for h in logger.handlers):
        logger.addHandler(ToStderr())
    logger.setLevel(logging.INFO)


def register(app: typer.Typer) -> None:
    """Add ``sharpscope train``."""

    @app.command("train")
    @guarded
    def train_command(
        dataset: Optional[str] = typer.Option(
            None,
            "--dataset",
            "--data",
            help="mnist1d, digits, cifar10, cifar100 or module:function [default: mnist1d].",
        ),
        model: Optional[str] = typer.Option(
            None,
            "--model",
            help="mlp, cnn1d, cnn, resnet20/32/56, resnet (--model-opt depth=6n+2), wrn, vit or "
            "module:function [default: cnn1d].",
        ),
        optimizer: Optional[str] = typer.Option(
            None,
            "--optimizer",
            help="sgd, adam, adamw, sam, asam, vasso, lets, samon, bsam [default: sgd].",
        ),
        rho: Optional[float] = typer.Option(
            None,
            help="Perturbation radius (initial rho for LETS) [default: 0.05 for sam, vasso, "
            "lets; 0.5 for asam, samon; 0.01 for bsam].",
        ),
        epochs: Optional[int] = typer.Option(None, help="Training epochs [default: 10]."),
        batch_size: Optional[int] = typer.Option(
            None, "--batch-size", help="Global batch size [default: 128]."
        ),
        lr: Optional[float] = typer.Option(
            None,
            help="Learning rate of the (base) optimizer [default: 0.1 with sgd, 0.001 with "
            "adam, adamw; 0.5 for bsam].",
        ),
        seed: Optional[int] = typer.Option(None, help="Random seed [default: 0]."),
        out_text: Optional[str] = typer.Option(  # text: a Path would read "" as "."
            None, "--out", metavar="<path>", help="Output folder for checkpoints and metrics.jsonl."
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt."),
        config: Optional[Path] = typer.Option(
            None,
            "--config",
            help="TOML file with TrainConfig keys at the top level, or a run's OUT/config.json.",
        ),
        save_every: Optional[int] = typer.Option(
            None,
            "--save-every",
            help="Also keep OUT/epoch_NNN.pt every N epochs [default: 0: never].",
        ),
        model_opt: Optional[list[str]] = typer.Option(
            None, "--model-opt", help="Model option KEY=VALUE (repeatable)."
        ),
        data_opt: Optional[list[str]] = typer.Option(
            None, "--data-opt", help="Data option KEY=VALUE (repeatable)."
        ),
        opt: Optional[list[str]] = typer.Option(
            None,
            "--opt",
            help="Any optimizer hyperparameter KEY=VALUE (repeatable); a list as JSON: "
            "--opt 'betas=[0.9, 0.999]'.",
        ),
        base: Optional[str] = typer.Option(
            None, "--base", help="Base optimizer of a SAM variant: sgd, adam, adamw."
        ),
        momentum: Optional[float] = typer.Option(None, help="SGD momentum [default: 0.9]."),
        weight_decay: Optional[float] = typer.Option(
            None,
            "--weight-decay",
            help="Weight decay, in the base optimizer [default: 0.0005 with sgd, 0.0 with adam, "
            "0.01 with adamw].",
        ),
        nesterov: Optional[bool] = typer.Option(
            None, "--nesterov/--no-nesterov", help="Nesterov momentum."
        ),
        schedule: Optional[str] = typer.Option(
            None, help="cosine, step or constant [default: cosine]."
        ),
        warmup_epochs: Optional[float] = typer.Option(
            None, "--warmup-epochs", help="Linear warm-up length in epochs."
        ),
        label_noise: Optional[float] = typer.Option(
            None, "--label-noise", help="Fraction of training labels flipped (symmetric)."
        ),
        val_fraction: Optional[float] = typer.Option(
            None,
            "--val-fraction",
            help="Hold-out fraction of the full training split, cut before --samples (LETS: 0.1).",
        ),
        samples: Optional[int] = typer.Option(
            None,
            "--samples",
            help="Use the first N examples of each split (training and test) after a seeded "
            "shuffle.",
        ),
        augment: Optional[bool] = typer.Option(
            None, "--augment/--no-augment", help="Random crop + flip [default: on for CIFAR]."
        ),
        loss: Optional[str] = typer.Option(
            None, "--loss", help="cross_entropy, mse or module:function."
        ),
        device: Optional[str] = typer.Option(
            None, "--device", help="auto, cpu, cuda [default: auto]."
        ),
        precision: Optional[str] = typer.Option(
            None,
            "--precision",
            help="fp32, bf16 or fp16 (fp16 needs a CUDA GPU) [default: fp32].",
        ),
        deterministic: Optional[bool] = typer.Option(
            None,
            "--deterministic/--no-deterministic",
            help="Deterministic kernels only: bit-identical repeats and resumes on a GPU too "
            "(slower) [default: off].",
        ),
        data_root: Optional[str] = typer.Option(
            None, "--data-root", help="Folder holding the CIFAR python-pickle files."
        ),
        eta: Optional[float] = typer.Option(
            None, help="ASAM/SAM-ON: eta of T = |w| + eta [default: 0.01]."
        ),
        theta: Optional[float] = typer.Option(
            None, help="VaSSO: weight of the new gradient in the EMA, in (0, 1]."
        ),
        m: Optional[int] = typer.Option(
            None,
            "--m",
            "--subset-size",
            help="SAM, ASAM, SAM-ON: compute the perturbation per sub-batch of m examples "
            "(--subset-size under torchrun, whose own parser takes --m).",
        ),
        adaptive_form: Optional[str] = typer.Option(
            None,
            "--form",
            help="ASAM/SAM-ON adaptive form: elementwise, layerwise, linf (SAM-ON also none = plain SAM-ON).",
        ),
        normalize_bias: Optional[bool] = typer.Option(
            None,
            "--normalize-bias/--no-normalize-bias",
            help="ASAM/SAM-ON: scale biases too [default: on for asam, off for samon].",
        ),
        bn_policy: Optional[str] = typer.Option(
            None, "--bn-policy", help="first (default) or both: passes that update BN statistics."
        ),
        perturbation: Optional[str] = typer.Option(
            None,
            "--perturbation",
            help="DDP: local (per-rank) or global perturbation [default: local; global for vasso].",
        ),
        same_noise: Optional[bool] = typer.Option(
            None, "--same-noise/--fresh-noise", help="Same dropout masks in both passes."
        ),
        max_grad_norm: Optional[float] = typer.Option(
            None, "--max-grad-norm", help="Clip the second-pass gradient to this norm."
        ),
        rho_lr: Optional[float] = typer.Option(
            None, "--rho-lr", help="LETS: learning rate of rho."
        ),
        rho_min: Optional[float] = typer.Option(
            None, "--rho-min", help="LETS: lower bound of rho."
        ),
        rho_max: Optional[float] = typer.Option(
            None, "--rho-max", help="LETS: upper bound of rho."
        ),
        hypergrad: Optional[str] = typer.Option(
            None, "--hypergrad", help="LETS: diag, hvp, fd or identity."
        ),
        inner: Optional[str] = typer.Option(
            None, "--inner", help="LETS: inner variant sam, asam, vasso or samon."
        ),
        exclude_norm: Optional[bool] = typer.Option(
            None,
            "--exclude-norm/--include-norm",
            help="SAM-ON ablation: perturb all but norm params.",
        ),
        fast_first_pass: Optional[bool] = typer.Option(
            None,
            "--fast-first-pass/--full-first-pass",
            help="SAM-ON: pass 1 computes only norm gradients.",
        ),
        prior_precision: Optional[float] = typer.Option(
            None, "--prior-precision", help="bSAM: prior precision delta."
        ),
        damping: Optional[float] = typer.Option(None, "--damping", help="bSAM: damping gamma."),
        s_init: Optional[float] = typer.Option(
            None, "--s-init", help="bSAM: initial precision s0."
        ),
        splits: Optional[int] = typer.Option(
            None, "--splits", help="bSAM: number of chunks M per batch."
        ),
        data_aug_factor: Optional[float] = typer.Option(
            None, "--data-aug-factor", help="bSAM: N = num_data x this factor."
        ),
        bsam_samples: Optional[int] = typer.Option(
            None,
            "--bsam-samples",
            help="bSAM: weight samples of the model average evaluated every epoch (each is "
            "a pass over the test split) [default: 32].",
        ),
        no_progress: bool = typer.Option(
            False, "--no-progress", help="No progress bar: one line per epoch on stderr instead."
        ),
        trust_factories: bool = typer.Option(
            False,
            "--trust-factories",
            help="With --resume and no --config: import and call the module:function "
            "factories that OUT/last.pt names (model, data set, loss), code from the run "
            "folder's author. Off: such a run is refused unless --model/--dataset/--loss "
            "name them.",
        ),
    ) -> None:
        """Train a model; write OUT/last.pt, OUT/metrics.jsonl and OUT/config.json (and
        OUT/epoch_NNN.pt with --save-every). Unset hyperparameters take the optimizer's
        defaults; config.json's optimizer_resolved holds every value used."""
        from ..distributed import launched_as_main
        from ..errors import SharpscopeError
        from ..io import load_training_state
        from ..trainer import schedule_extends, train

        if out_text is not None and not out_text.strip():  # it trained into the working folder
            raise SharpscopeError("--out must be a folder path, got an empty one")
        out = Path(out_text) if out_text is not None else None
        del out_text
        values = dict(locals())
        check_float_flags(values)
        holds = "last.pt, the epoch checkpoints and metrics.jsonl"
        check_output_folder("--out", out, holds=holds)
        if out is not None:  # before its last.pt is read
            _check_not_a_study_folder(out)
        values["model_opts"] = parse_options(model_opt, "--model-opt")
        values["data_opts"] = parse_options(data_opt, "--data-opt")
        values["opt"] = parse_options(opt, "--opt")
        resumed = None
        if resume and config is None and out is not None and (out / "last.pt").exists():
            # continue the run as it was: its settings come from the checkpoint
            resumed = load_training_state(out / "last.pt")["config"]
            if not trust_factories:  # the file's factories, as an analysis of it would check
                _check_resumed_factories(resumed, values, out / "last.pt")
        with flags_named(values):
            cfg = build_config(values, config, resumed)
        if out is None and cfg.out is not None:  # the TOML config's own out
            check_output_folder(f"out (from {config})", Path(cfg.out), holds=holds)
            _check_not_a_study_folder(Path(cfg.out))
        if resume and cfg.out is None:  # before data and model are built
            fail("--resume needs --out DIR, the folder of the run to continue")
        if no_progress:  # a batch log still gets one line per epoch
            _log_epochs()

        def warn_nothing_saved() -> None:  # once the options are checked: bad input stays one line
            warnings.warn(
                "no --out: the trained model and its metrics are not saved (give --out DIR "
                "for last.pt, the epoch checkpoints and metrics.jsonl)",
                stacklevel=1,
            )

        # epoch lines on stderr; the summary on stdout
        last = Path(cfg.out) / "last.pt" if cfg.out is not None else None  # said if stopped
        try:
            with flags_named(values):
                summary = train(
                    cfg,
                    resume=resume,
                    before_training=warn_nothing_saved if cfg.out is None else None,
                )
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: say what is kept
            if last is None or not speaks_for_the_job(exc, launched_as_main()):
                raise
            if not last.is_file():
                fail(
                    f"{stop_reason(exc)} before the first epoch ended, so there is no "
                    "checkpoint to resume: run the same command again without --resume",
                    code=interrupt_exit_code(exc),
                )
            epoch = load_training_state(last)["epoch"]
            fail(
                f"{stop_reason(exc)}; {last} holds epoch {epoch}: run the same command with "
                "--resume to continue",
                code=interrupt_exit_code(exc),
            )
        except OSError as exc:  # a full disk or quota: checkpoints are atomic, say what is kept
            if exc.errno not in NO_SPACE or last is None or not last.is_file():
                raise
            epoch = load_training_state(last)["epoch"]
            fail(
                f"{os_error_line(exc)}; {last} holds epoch {epoch}: free space, then run the "
                "same command with --resume to continue"
            )
        if not summary.is_main:  # under torchrun only rank 0 reports
            return
        metrics = summary.metrics
        if summary.start_epoch >= summary.epochs:
            more = (
                "give a larger --epochs to train on"
                if schedule_extends(cfg.schedule)
                else f"its {cfg.schedule.get('name', 'cosine')} schedule ended with the run: "
                "to train longer, start a new run with more --epochs"
            )
            echo(
                f"nothing to do: {summary.out / 'last.pt'} is at epoch {summary.start_epoch} "
                f"of {summary.epochs} already ({more})"
            )
            return
        epochs = f"{summary.epochs} epoch{'s' if summary.epochs != 1 else ''}"
        echo(
            f"{cfg.optimizer['name']} on {cfg.dataset.get('name', cfg.dataset.get('factory'))} "
            f"({cfg.model.get('name', cfg.model.get('factory'))}), {epochs}: "
            f"test accuracy {metrics.get('test_acc', float('nan')):.4f}, "
            f"train accuracy {metrics.get('train_acc', float('nan')):.4f}, "
            f"test loss {metrics.get('test_loss', float('nan')):.4f}"
        )
        if summary.out is not None:
            out = summary.out
            kept = sorted(out.glob("epoch_*.pt"))  # --save-every, this run's and earlier
            also = ""
            if kept:
                names = kept[0].name if len(kept) == 1 else f"{kept[0].name} … {kept[-1].name}"
                also = f", and {len(kept)} epoch checkpoint{'s' if len(kept) > 1 else ''} ({names})"
            console.print(
                f"wrote {out / 'last.pt'}, {out / 'metrics.jsonl'} and {out / 'config.json'}{also}",
                soft_wrap=True,
            )
