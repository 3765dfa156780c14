"""Running a study: the study folder, one job per run, resumption, and the results table.

Folder layout (format version :data:`VERSION`)::

    DIR/study.json                 format, version, the validated config, run ids
    DIR/config.toml                the config, for people
    DIR/runs/<run_id>/run.json     hyperparameters, TrainConfig, analysis epochs
    DIR/runs/<run_id>/last.pt, epoch_NNN.pt, metrics.jsonl, config.json   (from train)
    DIR/runs/<run_id>/analysis/epoch_NNN/<measure>.json
    DIR/runs/<run_id>/status.json  {"state": "trained" | "done" | "failed" | "error", ...}
    DIR/pairs/<a>__<b>__<key>.npz  interpolations between two runs' final weights
    DIR/results.csv                one row per run and analysed checkpoint

**Resumption.** A run whose status is ``done`` with every analysis file present (and
made with the same options) is skipped; a run interrupted during training resumes
from its ``last.pt``; an analysis whose JSON exists with the same options is not
recomputed. A run that diverges (:class:`~sharpscope.trainer.TrainingDiverged`) is
recorded as ``failed`` (kept on resume: divergence is deterministic) and the study goes
on; a run that raised another error is recorded as ``error`` and retried next time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import SharpscopeError
from ..locking import is_locked, transient_lock
from ..registry import absolute_spec, factory_of
from ..results import (
    RunMeta,
    atomic_write_bytes,
    eval_rows,
    read_metrics_rows,
    rows_to_csv_bytes,
    to_jsonable,
    write_json,
)
from .config import StudyConfig, dataset_name, study_config_from_dict
from .sweep import PARAM_COLUMNS, RunSpec, expand_sweep, id_parts, sanitize_name, swept_axes

FORMAT = "sharpscope-study"
VERSION = 1
LOCK_NAME = "study.lock"  # held by a running `study run`
# training keys that may name a user's factory file (recorded absolute)
FACTORY_KEYS = ("dataset", "model", "loss")
# training keys that may differ when a study is resumed on another machine
MACHINE_KEYS = ("data_root", "device", "progress")
# training keys that only evaluate a run (train --resume lets them change too): another
# value keeps a study's trained runs
EVALUATION_KEYS = ("eval_batch_size", "bsam_samples")
# run.json params that record a training setting (the optimizer's rho, m, lr, momentum and
# weight decay, the model's label, width and depth): compared through that setting, resolved
_SETTING_PARAMS = ("rho", "m", "lr", "momentum", "weight_decay", "model", "width", "depth")
# run states after which training is over: a run.json then keeps the save_every it trained with
_TRAINING_OVER = ("done", "trained", "failed")
Log = Callable[[str], None]

# Always present in results.csv, in this order after the hyperparameters.
CORE_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "test_loss",
    "test_acc",
    "gen_gap",
    "loss_gap",
    "lambda_max",
    "lambda_5",
    "ratio",
    "trace",
    "m_sharpness",
)
METRIC_COLUMNS = (
    "train_clean_acc",
    "train_clean_loss",
    "train_nll",
    "train_ece",
    "test_nll",
    "test_ece",
    "test_acc_bma",
    "test_nll_bma",
    "test_ece_bma",
)
LEADING = ("run_id", "status")


def _read_json(path: Path) -> dict[str, Any] | None:
    """A study file's JSON object; None if the file is missing. Every study file holds an
    object: anything else (invalid JSON, a list, a number) is one line naming the file."""
    # a run's result files are recomputed when missing; study.json is the study itself
    remedy = (
        "restore it, or start the study again in a new folder"
        if path.name == "study.json"
        else "delete it to recompute"
    )
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise SharpscopeError(f"{path} is not valid JSON ({exc}); {remedy}") from exc
    if not isinstance(value, dict):
        raise SharpscopeError(f"{path} holds {type(value).__name__} JSON, not an object; {remedy}")
    return value


# --------------------------------------------------------------------------- the folder
def read_study_dir(out: str | Path) -> dict[str, Any]:
    """Read ``DIR/study.json`` and check its format and version.

    Raises:
        SharpscopeError: not a study folder, or a folder from another format version.
    """
    out = Path(out)
    path = out / "study.json"
    if out.is_file():
        raise SharpscopeError(f"{out} is a file, not a study folder (give the folder of --out)")
    if not out.is_dir():
        raise SharpscopeError(f"study folder not found: {out}")
    if not path.is_file():
        raise SharpscopeError(
            f"{out} is not a sharpscope study folder (no study.json); "
            "run `sharpscope study run CONFIG.toml --out DIR` first"
        )
    meta = _read_json(path) or {}
    if meta.get("format") != FORMAT:
        raise SharpscopeError(
            f"{path} is not a sharpscope study file (format {meta.get('format')!r})"
        )
    version = meta.get("version")
    if version != VERSION:
        if isinstance(version, int) and version > VERSION:
            raise SharpscopeError(
                f"{out} was written by a newer sharpscope (study format {version}); this "
                f"version reads format {VERSION}: upgrade sharpscope"
            )
        raise SharpscopeError(
            f"{out} has study format version {version!r}, from an older sharpscope; this "
            f"version reads format {VERSION}: rerun the study into a new folder (--out)"
        )
    return meta


def check_study_dir(
    out: str | Path, config: StudyConfig, runs: list[RunSpec], flag: str = "--out"
) -> None:
    """Raise unless ``out`` is new, empty, or a folder of this study that can take ``runs``.

    A study folder holds one study: the same name, every run it lists still in the sweep
    (a sweep may grow, e.g. by more seeds, but not lose runs), and each run's training
    settings unchanged. ``flag`` is the option named in the errors, beside the words a
    Python caller reads (``run_study``'s folder argument has no flag): "another output
    folder (--out)".

    Raises:
        SharpscopeError: the folder holds something else, another format version,
            another study, or a run of the same id made with a different configuration.
    """
    out = Path(out)
    if out.exists() and not (out / "study.json").exists():
        if not out.is_dir() or any(p.name != LOCK_NAME for p in out.iterdir()):
            raise SharpscopeError(
                f"{out} exists and is not a sharpscope study folder; choose {_another(flag)}"
            )
    if (out / "study.json").exists():
        meta = read_study_dir(out)
        if meta.get("name") != config.name:
            raise SharpscopeError(
                f"{out} holds the study '{meta.get('name')}', not '{config.name}'; "
                f"choose {_another(flag)}"
            )
        dropped = sorted(set(meta.get("runs", [])) - {run.run_id for run in runs})
        if dropped:
            more = ", ..." if len(dropped) > 3 else ""
            renamed = _renamed_run(dropped, [run.run_id for run in runs])
            why = (
                f"; this config names its runs differently ({renamed[0]} is now {renamed[1]}): "
                "an axis that gains a second value enters every run's id"
                if renamed
                else ""
            )
            raise SharpscopeError(
                f"{out} holds {len(dropped)} run(s) that this config does not have "
                f"({', '.join(dropped[:3])}{more}){why}; choose {_another(flag)}"
            )
    for run in runs:
        existing = _read_json(out / "runs" / run.run_id / "run.json")
        if existing is not None:
            _check_same_run(run.run_id, existing, to_jsonable(run.to_dict()), out, flag)


def _renamed_run(dropped: list[str], ids: list[str]) -> tuple[str, str] | None:
    """A folder's run that a new config names with more id parts (``sgd-s0`` as
    ``sgd-lr0.1-s0``, when lr gains a value), as ``(old, new)``, or None.

    >>> _renamed_run(["sgd-s0"], ["sgd-lr0.1-s0", "sgd-lr0.2-s0"])
    ('sgd-s0', 'sgd-lr0.1-s0')
    >>> _renamed_run(["sam-s0"], ["sgd-s0"]) is None
    True
    """

    def contains(new: list[str], old: list[str]) -> bool:
        parts = iter(new)
        return all(part in parts for part in old)  # old's parts in order, others between

    for old in dropped:
        for new in ids:
            if contains(new.split("-"), old.split("-")):
                return old, new
    return None


def _another(flag: str) -> str:
    """The advice for another folder, in words that a ``run_study(config, folder)`` caller
    reads as well as the command line's flag: "another output folder (--out)"."""
    what = {"--out": "output folder", "--cache": "cache folder"}.get(flag, "folder")
    return f"another {what} ({flag})"


def config_toml_text(recorded: Mapping[str, Any]) -> str:
    """``DIR/config.toml``: the config that ``study.json`` records, as TOML for people
    (``study run DIR`` refuses the folder when the file no longer reads as this)."""
    import tomli_w

    return tomli_w.dumps(to_jsonable(recorded))


def prepare_study_dir(out: str | Path, config: StudyConfig, runs: list[RunSpec]) -> Path:
    """Create (or reopen) a study folder and write ``study.json`` and every ``run.json``.

    Raises:
        SharpscopeError: as :func:`check_study_dir`.
    """
    out = Path(out)
    check_study_dir(out, config, runs)
    out.mkdir(parents=True, exist_ok=True)
    write_json(
        out / "study.json",
        {
            "format": FORMAT,
            "version": VERSION,
            "name": config.name,
            "sharpscope_version": __version__,
            "config": config.to_dict(),
            "runs": [r.run_id for r in runs],
            "swept": swept_axes(runs, config.sweep),
            "source": config.source,
            "builtin": _builtin_name(config.source),
        },
    )
    try:
        atomic_write_bytes(out / "config.toml", config_toml_text(config.to_dict()).encode())
    except (ImportError, TypeError):  # pragma: no cover - config.toml is for people only
        pass
    for run in runs:
        path = out / "runs" / run.run_id / "run.json"
        wanted = to_jsonable(run.to_dict())
        existing = _read_json(path)
        if existing == wanted:
            continue
        trained = _status(path.parent).get("state") in _TRAINING_OVER
        if existing is not None and trained and _only_save_every_differs(existing, wanted):
            # new analysis epochs or a restated default: the record keeps the save_every
            # and the evaluation settings the run was trained with
            for key in ("save_every", *EVALUATION_KEYS):
                if key in existing.get("train", {}):
                    wanted["train"][key] = existing["train"][key]
                else:
                    wanted["train"].pop(key, None)
        write_json(path, wanted)  # new, or the same training settings (checked above)
    return out


def _builtin_name(source: str | None) -> str | None:
    """The name of a shipped config (``quick``, ``a-spectra-quick``), else None."""
    if not source:
        return None
    path = Path(source).resolve()
    shipped = (Path(__file__).parent / "configs").resolve()
    return path.stem if path.parent == shipped else None


def _check_same_run(
    run_id: str, existing: dict, wanted: dict, out: Path, flag: str = "--out"
) -> None:
    lines = _differences(existing, wanted)
    if not lines:
        return
    if not _differences(existing, wanted, ignored=("save_every",)):
        _check_saved_epochs(run_id, wanted, out, flag)
        return  # every epoch asked for that the run has passed has its checkpoint
    more = f" and {len(lines) - 4} more" if len(lines) > 4 else ""
    raise SharpscopeError(
        f"run '{run_id}' in {out} was trained with a different configuration: "
        f"{'; '.join(lines[:4])}{more}; use {_another(flag)} or delete that run "
        f"({_run_dir(out, run_id)})"
    )


def _only_save_every_differs(existing: dict, wanted: dict) -> bool:
    """Whether two run.json records train alike but for ``save_every`` (which the study
    derives from analysis.epochs), compared as :func:`_check_same_run` compares them."""
    return not _differences(existing, wanted, ignored=("save_every",))


def _differences(existing: Mapping, wanted: Mapping, ignored: Iterable[str] = ()) -> list[str]:
    """``"train.optimizer.lr 0.2 (trained: 0.1)"`` for each setting in which the run.json
    record ``wanted`` differs from the ``existing`` one, leaf by leaf as ``train --resume``
    names them (:func:`~sharpscope.trainer.differing_settings`).

    The training settings are compared as training resolves them (:func:`_trained_settings`),
    less :data:`MACHINE_KEYS`, :data:`EVALUATION_KEYS` and ``ignored``; then, when they
    agree, the ``params`` that are not read off them (:data:`_SETTING_PARAMS` are: a
    restated default changes their record, not the run)."""
    from ..trainer import differing_settings

    skip = {*MACHINE_KEYS, *EVALUATION_KEYS, *ignored}
    old, new = (
        {k: v for k, v in _trained_settings(r.get("train", {})).items() if k not in skip}
        for r in (existing, wanted)
    )
    lines = differing_settings("train", old, new, "trained")
    if lines:
        return lines
    old, new = (
        {k: v for k, v in r.get("params", {}).items() if k not in _SETTING_PARAMS}
        for r in (existing, wanted)
    )
    return differing_settings("params", old, new, "trained")


def _trained_settings(train: Mapping[str, Any]) -> dict[str, Any]:
    """A run.json's training settings as training reads them: every default of
    :class:`~sharpscope.trainer.TrainConfig` filled in and each spec resolved
    (:func:`~sharpscope.trainer.as_trained`), so that a setting restating its default
    (``nesterov = false``, ``schedule = {name = "cosine"}``, ``activation = "relu"``) is
    the same setting. Factory paths that an older sharpscope recorded relative are made
    absolute; a record that no longer validates (an older version's) is compared as given."""
    from ..trainer import TrainConfig, as_trained

    settings = {
        k: absolute_spec(v) if k in FACTORY_KEYS else v for k, v in copy.deepcopy(train).items()
    }
    try:
        settings = TrainConfig.from_dict(settings).to_dict()
    except (SharpscopeError, TypeError, ValueError):
        settings = _without_data_root_option(settings)
    out = {}
    for key, value in settings.items():
        try:
            out[key] = as_trained(key, value, settings)
        except SharpscopeError:  # an option an older version took: compared as it is
            out[key] = value
    return out


def _without_data_root_option(train: Mapping[str, Any]) -> dict[str, Any]:
    """A run's training settings less the dataset's ``data_root``, which an older sharpscope
    kept there (now the machine key data_root)."""
    out = dict(train)
    if isinstance(out.get("dataset"), Mapping):
        out["dataset"] = {k: v for k, v in out["dataset"].items() if k != "data_root"}
    return out


def _check_saved_epochs(run_id: str, wanted: dict, out: Path, flag: str) -> None:
    """One line when analysis.epochs now asks for an epoch a run has passed without saving
    it (the study derives ``save_every`` from analysis.epochs, and the generic message
    blamed that key). Fewer epochs are fine, and so are epochs a run has yet to train: it
    saves them with the new ``save_every``."""
    run_dir = _run_dir(out, run_id)
    last = int(wanted["train"].get("epochs", 0))
    state = _status(run_dir).get("state")
    trained = last if state in _TRAINING_OVER else max(_eval_rows(run_dir), default=0)
    missing = [
        e
        for e in wanted.get("analysis_epochs", [])
        if e < last
        and e <= trained
        and not (run_dir / f"epoch_{e:03d}.pt").exists()
        and not (run_dir / "analysis" / f"epoch_{e:03d}").exists()
    ]
    if missing:
        raise SharpscopeError(
            f"run '{run_id}' in {out} has no checkpoint of epoch "
            f"{', '.join(map(str, missing))} that analysis.epochs asks for (it was not saved, or "
            f"was deleted); ask only for epochs it has, or use {_another(flag)}"
        )


def load_study_config_from_dir(out: str | Path) -> StudyConfig:
    """The validated config stored in a study folder (an edited one's error names its file)."""
    meta = read_study_dir(out)
    if not isinstance(meta.get("config"), dict):
        raise SharpscopeError(
            f"{Path(out) / 'study.json'} holds no study config (its 'config' table is "
            "missing); restore it, or start the study again in a new folder"
        )
    try:
        return study_config_from_dict(
            meta["config"], name=meta.get("name", "study"), check_files=False
        )
    except SharpscopeError as exc:
        raise SharpscopeError(f"{Path(out) / 'study.json'}: {exc}") from exc


# --------------------------------------------------------------------------- one run
def _run_dir(study_dir: Path, run_id: str) -> Path:
    return study_dir / "runs" / run_id


def _status(run_dir: Path) -> dict[str, Any]:
    return _read_json(run_dir / "status.json") or {"state": "pending"}


def _analysis_params(measure: str, config: StudyConfig) -> dict[str, Any]:
    plan = config.analysis
    return {
        "options": plan.measures[measure],
        "samples": plan.samples,
        "split": plan.split,
        "seed": plan.seed,
        "batch_size": plan.batch_size,
    }


def _analysis_path(run_dir: Path, epoch: int, measure: str) -> Path:
    return run_dir / "analysis" / f"epoch_{epoch:03d}" / f"{measure}.json"


def current_record(path: Path, config: StudyConfig) -> dict[str, Any] | None:
    """The analysis record at ``path`` (``.../epoch_NNN/<measure>.json``) if it was made
    with ``config``'s current settings for that measure; None if missing or stale (made
    before an ``[analysis]`` change, and not yet redone)."""
    measure = path.stem
    if measure != "basic" and measure not in config.analysis.measures:
        return None
    record = _read_json(path)
    if record is None:
        return None
    wanted = {"basic": 1} if measure == "basic" else to_jsonable(_analysis_params(measure, config))
    return record if record.get("params") == wanted else None


def _pending_measures(run: RunSpec, run_dir: Path, config: StudyConfig) -> list[tuple[int, str]]:
    pending = []
    measures = [m for m in config.analysis.measures if m != "landscape"] + ["basic"]
    if "landscape" in config.analysis.measures:
        measures.append("landscape")
    for epoch in run.analysis_epochs:
        for measure in measures:
            if current_record(_analysis_path(run_dir, epoch, measure), config) is None:
                pending.append((epoch, measure))
    return pending


def run_is_complete(study_dir: Path, run: RunSpec, config: StudyConfig) -> bool:
    """Whether a run needs no work: failed for good, or done with every analysis."""
    run_dir = _run_dir(study_dir, run.run_id)
    state = _status(run_dir).get("state")
    if state == "failed":
        return True
    return state == "done" and not _pending_measures(run, run_dir, config)


def run_states(study_dir: str | Path) -> list[dict[str, Any]]:
    """Where every run of a study folder stands, for ``sharpscope study status``.

    One dict per run, in sweep order: ``run_id``, ``state`` (``done``, ``failed``
    (diverged), ``error`` (retried by the next ``study run``), ``analysing`` (trained,
    analyses missing), ``training`` or ``pending``), ``epoch`` (last evaluated) and
    ``epochs`` (``epoch`` is None before the first evaluation), and ``error`` (the first
    line of a failure).
    """
    folder = Path(study_dir)
    config = load_study_config_from_dir(folder)
    out = []
    for run in expand_sweep(config):
        run_dir = _run_dir(folder, run.run_id)
        status = _status(run_dir)
        evaluated = _eval_rows(run_dir)
        state = status.get("state", "pending")
        if state == "done" and not run_is_complete(folder, run, config):
            state = "analysing"  # the analyses asked for changed since
        elif state == "trained":
            state = "analysing"
        elif state == "pending" and evaluated:
            state = "training"
        out.append(
            {
                "run_id": run.run_id,
                "state": state,
                "epoch": max(evaluated, default=None),
                "epochs": run.train.get("epochs"),
                "error": status.get("error", ""),
            }
        )
    return out


def _checkpoint_for(run_dir: Path, epoch: int, total: int) -> Path:
    path = run_dir / f"epoch_{epoch:03d}.pt"
    if path.exists():
        return path
    if epoch == total and (run_dir / "last.pt").exists():
        return run_dir / "last.pt"
    raise SharpscopeError(
        f"{run_dir} has no checkpoint for epoch {epoch} (deleted?); delete the run folder "
        "to retrain it"
    )


def _train_run(run: RunSpec, run_dir: Path) -> dict[str, Any] | None:
    """Train (or resume) one run; return a failure record when it diverges."""
    from ..io import safe_load
    from ..trainer import TrainConfig, TrainingDiverged, train

    config = TrainConfig.from_dict({**run.train, "out": str(run_dir)})
    resume = False
    last = run_dir / "last.pt"
    if last.exists():
        done_epoch = int(safe_load(last).get("epoch", 0))
        if done_epoch >= config.epochs:
            return None
        resume = True
    try:
        train(config, resume=resume)
    except TrainingDiverged as exc:
        return {"state": "failed", "error": str(exc).splitlines()[0], "reason": "diverged"}
    return None


def _analysis_split(run: RunSpec, config: StudyConfig) -> tuple[Any, dict[str, Any]]:
    """The examples a run's analyses use, and the data spec that reloads them (recorded in
    the results' ``meta``, as the stand-alone commands record it)."""
    from ..data import load_data, recorded_data_spec
    from ..data.fingerprint import reading_as_trained

    plan = config.analysis
    dataset = run.train["dataset"]
    # a factory is called as the run's training called it (torch seeded with its seed)
    with reading_as_trained(run.train.get("seed", 0) if factory_of(dataset) else None):
        split = load_data(
            dataset,
            plan.split,
            samples=plan.samples,
            seed=plan.seed,
            data_root=run.train.get("data_root"),
        )
    recorded = recorded_data_spec(
        dataset, plan.split, plan.samples, plan.seed, split, samples_name="analysis.samples"
    )
    return split, recorded


def _warn_if_other_data(run: RunSpec, split: Any, checkpoint: Any) -> None:
    """One warning when the run's data factory gave other data than it trained on."""
    from ..data.fingerprint import warn_if_not_as_trained

    factory = factory_of(run.train["dataset"])
    if factory is not None:
        trained = checkpoint.raw.get("data_summary")
        warn_if_not_as_trained(split.source_summary, trained, factory, str(checkpoint.path))


def _provenance(checkpoint: Any, data_spec: dict[str, Any]) -> dict[str, Any]:
    """What a result's ``meta`` records of its inputs: the checkpoint (path, sha256) and
    the data."""
    return {
        "checkpoint": str(checkpoint.path),
        "checkpoint_sha256": checkpoint.sha256,
        "data": data_spec,
    }


def _fill_meta(value: Any, known: dict[str, Any]) -> None:
    """Fill the provenance a measure function cannot know (it gets a model and tensors)
    into every result ``meta`` inside ``value``: the checkpoint, its sha256 and the data."""
    if isinstance(value, dict):
        if "checkpoint_sha256" in value:
            value.update({k: v for k, v in known.items() if value.get(k) is None})
        for item in value.values():
            _fill_meta(item, known)
    elif isinstance(value, list):
        for item in value:
            _fill_meta(item, known)


def _device(run: RunSpec, config: StudyConfig) -> Any:
    from ..distributed import pick_device

    return pick_device(config.analysis.device or run.train.get("device", "auto"))


def _analyse_run(run: RunSpec, run_dir: Path, config: StudyConfig) -> None:
    import torch

    from ..io import load_checkpoint
    from .measures import run_measure, weight_norm

    pending = _pending_measures(run, run_dir, config)
    if not pending:
        return
    device = _device(run, config)
    split, data_spec = _analysis_split(run, config)
    data = split.inputs.to(device), split.targets.to(device)
    loss = run.train.get("loss", "cross_entropy")
    common = {"seed": config.analysis.seed, "batch_size": config.analysis.batch_size}
    total = int(run.params["epochs"])
    for i, epoch in enumerate(sorted({e for e, _ in pending})):
        # a run this study trained from its config: its factories are the user's own
        checkpoint = load_checkpoint(_checkpoint_for(run_dir, epoch, total), trust_factories=True)
        if i == 0:
            _warn_if_other_data(run, split, checkpoint)
        model = checkpoint.model.to(device).eval()
        provenance = _provenance(checkpoint, data_spec)
        for _, measure in [p for p in pending if p[0] == epoch]:
            path = _analysis_path(run_dir, epoch, measure)
            torch.manual_seed(config.analysis.seed)
            if measure == "basic":
                record = {
                    "measure": "basic",
                    "columns": {
                        "weight_norm": weight_norm(model),
                        "num_params": sum(p.numel() for p in model.parameters()),
                    },
                    "params": {"basic": 1},
                }
            elif measure == "landscape":
                meta = RunMeta(**provenance)
                record = _landscape_record(model, data, loss, config, path, meta)
                record["params"] = to_jsonable(_analysis_params(measure, config))
            else:
                options = config.analysis.measures[measure]
                record = run_measure(measure, model, data, loss, options, common)
                record["params"] = to_jsonable(_analysis_params(measure, config))
            record["checkpoint"] = str(checkpoint.path.name)
            record["epoch"] = epoch
            _fill_meta(record, provenance)
            write_json(path, record)


def _landscape_record(
    model, data, loss, config: StudyConfig, path: Path, meta: Any = None
) -> dict[str, Any]:
    """1-D/2-D slices around a checkpoint, saved as ``.npz`` beside the record."""
    from ..analysis.landscape import landscape

    options = dict(config.analysis.measures["landscape"])
    files = {}
    started = time.perf_counter()
    for dims in options.get("dims", [1]):
        kwargs = {
            k: options[k] for k in ("grid", "span", "directions", "norm", "bias") if k in options
        }
        result = landscape(
            model,
            data,
            dims=int(dims),
            loss=loss,
            seed=int(options.get("seed", config.analysis.seed)),
            batch_size=config.analysis.batch_size,
            meta=meta,
            **kwargs,
        )
        target = path.with_name(f"landscape_{dims}d.npz")
        result.save(target)
        files[f"{dims}d"] = target.name
    return {
        "measure": "landscape",
        "columns": {},
        "result": {"files": files},
        "seconds": time.perf_counter() - started,
    }


def _prune_checkpoints(run: RunSpec, run_dir: Path) -> None:
    keep = {f"epoch_{e:03d}.pt" for e in run.analysis_epochs}
    for path in run_dir.glob("epoch_*.pt"):
        if path.name not in keep:
            path.unlink()


def run_job(study_dir: str, run_id: str) -> dict[str, Any]:
    """Train and analyse one run of a study; the unit of work of every executor.

    Takes only strings so that it pickles cheaply to worker processes and cluster jobs;
    everything else is read from ``DIR/study.json`` and ``DIR/runs/<run_id>/run.json``.

    Returns:
        The run's status record (``state`` done, failed or error, ``seconds``).
    """
    started = time.perf_counter()
    folder = Path(study_dir)
    run_dir = _run_dir(folder, run_id)
    status_path = run_dir / "status.json"
    try:
        config = load_study_config_from_dir(folder)
        data = _read_json(run_dir / "run.json")
        if data is None:
            raise SharpscopeError(f"{run_dir / 'run.json'} is missing")
        run = RunSpec(**data)
        status = _status(run_dir)
        if status.get("state") == "failed":
            return status
        if status.get("state") not in ("trained", "done"):
            failure = _train_run(run, run_dir)
            if failure is not None:
                failure["seconds"] = time.perf_counter() - started
                write_json(status_path, failure)
                return failure
            write_json(status_path, {"state": "trained"})
            if config.keep_checkpoints == "analysed":
                _prune_checkpoints(run, run_dir)
        _analyse_run(run, run_dir, config)
        status = {"state": "done", "seconds": time.perf_counter() - started}
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # recorded, retried on the next `study run`
        message = str(exc).splitlines()[0] if str(exc) else ""
        if not isinstance(exc, SharpscopeError):  # a bug: name the exception
            message = f"{type(exc).__name__}: {message}"
        status = {
            "state": "error",
            "error": message,
            "traceback": traceback.format_exc(),
            "seconds": time.perf_counter() - started,
        }
    if run_dir.exists():
        write_json(status_path, status)
    return status


# --------------------------------------------------------------------------- pairs
#: hyperparameters that belong to one optimizer (its radius, its group size): a pair's two
#: runs may differ in them whatever values they take
_OWN_AXES = ("optimizer", "optimizer_name", "base", "rho", "m")


def pair_runs(runs: list[RunSpec], a: str, b: str) -> list[tuple[RunSpec, RunSpec, str]]:
    """Every run of optimizer ``a`` with every run of ``b`` that agrees with it on the swept
    hyperparameters the two optimizers share values of (seed, lr, label noise, ...): SGD's
    missing ρ matches each of SAM's, and an lr that each optimizer sweeps over values of
    its own (or keeps fixed: SGD 0.1 against Adam 1e-3) pairs every value with every value.
    With ``a == b`` (SAM's radii against each other) each unordered pair comes once and no
    run is paired with itself. The tag tells the pairs apart: the swept values, e.g.
    ``"rho0.1-lr0.05-s0"`` (``"s0"`` when only the seed is swept)."""
    firsts = [r for r in runs if r.params["optimizer"] == a]
    seconds = [r for r in runs if r.params["optimizer"] == b]
    swept = runs[0].swept if runs else []

    def values(group: list[RunSpec], key: str) -> set[str]:
        return {json.dumps(r.params.get(key)) for r in group if r.params.get(key) is not None}

    matched = [k for k in swept if k not in _OWN_AXES and values(firsts, k) & values(seconds, k)]

    def shared(x: RunSpec, y: RunSpec) -> bool:
        return all(
            x.params.get(k) is None or y.params.get(k) is None or x.params[k] == y.params[k]
            for k in matched
        )

    def tag(x: RunSpec, y: RunSpec) -> str:
        seeds = dict.fromkeys(f"s{run.params['seed']}" for run in (x, y))  # both, if they differ
        return sanitize_name("-".join([*id_parts(swept, x, y), *seeds]))

    order = {id(r): i for i, r in enumerate(runs)}
    return [
        (x, y, tag(x, y))
        for x in firsts
        for y in seconds
        if x is not y and (a != b or order[id(x)] < order[id(y)]) and shared(x, y)
    ]


def pair_path(study_dir: Path, a: str, b: str, tag: str) -> Path:
    """Where the interpolation between optimizers ``a`` and ``b`` is saved."""
    return study_dir / "pairs" / f"{a}__{b}__{tag}.npz"


@contextlib.contextmanager
def _study_advice(first: Path, second: Path) -> Iterator[None]:
    """Re-issue the interpolation's warnings with advice a study can follow: it takes no
    ``states`` option and interpolates BatchNorm statistics too, so a pair is redone
    without them by the landscape command (:data:`~sharpscope.analysis.landscape.STATES_ADVICE`
    names ``states=False`` and a span, which a study config cannot set)."""
    from ..analysis.landscape import STATES_ADVICE

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for warning in caught:
        text = str(warning.message).replace(
            STATES_ADVICE,
            "a study interpolates them too; 'sharpscope landscape "
            f"{first} --directions {second} --no-states' redoes this pair without them",
        )
        warnings.warn(text, warning.category, stacklevel=3)


def run_pairs(study_dir: Path, config: StudyConfig, runs: list[RunSpec], log: Log) -> None:
    """Interpolations L((1−α)θ_a + αθ_b) between final solutions, as configured."""
    options = config.analysis.measures.get("landscape") or {}
    pairs = options.get("interpolate") or []
    if not pairs:
        return
    from ..analysis.landscape import landscape
    from ..io import load_checkpoint

    for a, b in pairs:
        matched = pair_runs(runs, a, b)
        if not matched:
            log(
                f"interpolation {a} -> {b}: no two runs to pair (they differ in the seed or another swept value)"
            )
        for run_a, run_b, tag in matched:
            path = pair_path(study_dir, a, b, tag)
            if path.exists():
                continue
            states = [_status(_run_dir(study_dir, r.run_id)).get("state") for r in (run_a, run_b)]
            if any(s != "done" for s in states):
                continue
            device = _device(run_a, config)
            split, data_spec = _analysis_split(run_a, config)
            start = load_checkpoint(
                _run_dir(study_dir, run_a.run_id) / "last.pt", trust_factories=True
            )
            _warn_if_other_data(run_a, split, start)
            end = load_checkpoint(
                _run_dir(study_dir, run_b.run_id) / "last.pt", trust_factories=True
            )
            meta = RunMeta(  # the line starts at the first checkpoint; the second in extra
                **_provenance(start, data_spec),
                extra={"second_checkpoint": str(end.path), "second_sha256": end.sha256},
            )
            kwargs = {k: options[k] for k in ("grid",) if k in options}
            kwargs["batch_size"] = config.analysis.batch_size
            with _study_advice(start.path, end.path):
                result = landscape(
                    start.model.to(device).eval(),
                    (split.inputs.to(device), split.targets.to(device)),
                    dims=1,
                    directions=end.model.to(device).eval(),
                    loss=run_a.train.get("loss", "cross_entropy"),
                    meta=meta,
                    **kwargs,
                )
            result.save(path)
            log(f"interpolation {a} -> {b} ({tag}) written to {path}")


# --------------------------------------------------------------------------- the table
def _eval_rows(run_dir: Path) -> dict[int, dict[str, Any]]:
    """A run's evaluation rows by epoch (none yet: empty; a line being written: skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    return {int(row["epoch"]): row for row in eval_rows(read_metrics_rows(path))}


#: decimals of gen_gap: accuracies are counts over the split sizes, so two models with the
#: same gap (0.90 − 0.60, 0.95 − 0.65) must not differ by rounding, which ranks them
GAP_DECIMALS = 12


def _gaps(row: dict[str, Any]) -> None:
    """gen_gap = test error − train error = train_acc − test_acc (rounded to
    :data:`GAP_DECIMALS`, so equal gaps tie); loss_gap = test loss − train loss."""
    if row.get("train_acc") is not None and row.get("test_acc") is not None:
        row["gen_gap"] = round(float(row["train_acc"]) - float(row["test_acc"]), GAP_DECIMALS)
    if row.get("train_loss") is not None and row.get("test_loss") is not None:
        row["loss_gap"] = float(row["test_loss"]) - float(row["train_loss"])


def collect_rows(study_dir: str | Path, runs: list[RunSpec] | None = None) -> list[dict[str, Any]]:
    """One dict per run and analysed checkpoint (failed runs: one row, no measures).

    Only results made with the config's current ``[analysis]`` settings fill cells; a
    finished run with results still to redo after a change is ``analysing``, as in
    ``study status`` (its old results, of other settings, are left out)."""
    folder = Path(study_dir)
    config = load_study_config_from_dir(folder)
    if runs is None:
        runs = expand_sweep(config)
    # only the measures of the current config (a removed measure's old files are ignored)
    measures = [*config.analysis.measures, "basic"]
    rows = []
    for run in runs:
        run_dir = _run_dir(folder, run.run_id)
        status = _status(run_dir)
        state = status.get("state", "pending")
        # each result file read once: it fills the cells and tells what is still to redo
        records = {
            (epoch, measure): current_record(_analysis_path(run_dir, epoch, measure), config)
            for epoch in run.analysis_epochs
            for measure in measures
            if state != "failed"
        }
        if state == "done" and None in records.values():  # as _pending_measures would say
            state = "analysing"
        base = {"run_id": run.run_id, "status": state, **run.params}
        if state in ("failed", "error"):
            base["error"] = status.get("error", "")
        evals = _eval_rows(run_dir)
        if state == "failed":
            row = dict(base)
            row["epoch"] = max(evals) if evals else None  # diverged before an evaluation
            rows.append(row)
            continue
        for epoch in run.analysis_epochs:
            row = dict(base)
            row["epoch"] = epoch
            metrics = evals.get(epoch, {})
            for key in ("train_loss", "train_acc", "test_loss", "test_acc", *METRIC_COLUMNS):
                if key in metrics:
                    row[key] = metrics[key]
            _gaps(row)
            for measure in measures:
                row.update((records[epoch, measure] or {}).get("columns", {}))
            rows.append(row)
    return rows


_NUMBER = re.compile(r"(\d+(?:\.\d+)?(?:e[-+]?\d+)?)")


def natural_key(name: str) -> tuple[str | float, ...]:
    """Sort key that orders the numbers in a column name by value (``m8`` before ``m64``).

    >>> sorted(["msharp_m64_rho0.1", "msharp_m8_rho0.2", "msharp_m8_rho0.05", "lambda_max"],
    ...        key=natural_key)
    ['lambda_max', 'msharp_m8_rho0.05', 'msharp_m8_rho0.2', 'msharp_m64_rho0.1']
    """
    # split() alternates text and number, starting with text: like types meet in comparisons
    return tuple(float(p) if i % 2 else p for i, p in enumerate(_NUMBER.split(name)))


def _column_order(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    ordered = [*LEADING, *PARAM_COLUMNS, *CORE_COLUMNS]
    metrics = [c for c in METRIC_COLUMNS if c in seen]
    rest = sorted(
        (c for c in seen if c not in ordered and c not in metrics and c != "error"),
        key=natural_key,
    )
    tail = ["error"] if "error" in seen else []
    return [*ordered, *metrics, *rest, *tail]


def write_results(study_dir: str | Path, runs: list[RunSpec] | None = None) -> Path:
    """Collect every run into ``DIR/results.csv`` (atomically); return its path."""
    folder = Path(study_dir)
    rows = collect_rows(folder, runs)
    path = folder / "results.csv"
    atomic_write_bytes(path, rows_to_csv_bytes(rows, _column_order(rows)))
    return path


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """``results.csv`` (or a study folder's) as dicts; numbers parsed, empty cells None.

    Raises:
        SharpscopeError: no such file.
    """
    import csv

    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    if not path.is_file():
        raise SharpscopeError(f"results file not found: {path}")
    out = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            parsed: dict[str, Any] = {}
            for key, value in row.items():
                parsed[key] = _parse_cell(value)
            out.append(parsed)
    return out


def _parse_cell(value: str | None) -> Any:
    if value is None or value == "":
        return None
    if value in ("true", "false"):
        return value == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


# --------------------------------------------------------------------------- the study
@dataclass
class StudySummary:
    """What :func:`run_study` did."""

    out: Path
    results: Path
    num_runs: int
    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0


def default_out(config: StudyConfig) -> Path:
    """``runs/studies/<name>`` (``runs/`` is git-ignored)."""
    return Path("runs") / "studies" / config.name


def _check_data(runs: list[RunSpec], config: StudyConfig) -> None:
    """Before any run starts, for each data set of ``runs``: refuse missing data files
    (CIFAR under ``data_root``), a data factory's single set (its own test set: every
    generalization gap 0, so no correlation is defined), and an ``m`` larger than the
    analysis data (the config check knows only an integer ``analysis.samples``, not the
    split's own size: the 1,000 examples of MNIST-1D's test split under ``samples =
    "all"`` or 1024)."""
    from ..data import check_data_files

    sizes = config.analysis.subset_sizes()
    checked: set[str] = set()
    for run in runs:
        dataset = run.train["dataset"]
        key = json.dumps([dataset, run.train.get("data_root")], default=str)
        if key in checked:
            continue
        checked.add(key)
        check_data_files(dataset, run.train.get("data_root"))
        factory = factory_of(dataset)
        if not sizes and factory is None:
            continue
        split = _analysis_split(run, config)[0]
        if split.test_is_train:
            raise SharpscopeError(
                f"data factory {factory} gives one data set, which would also be every "
                "run's test set (generalization gap 0, so no correlation is defined); "
                'return {"train": ..., "test": ...} from it'
            )
        examples = len(split.targets)
        for measure, m in sizes:
            if m > examples:
                raise SharpscopeError(
                    f"analysis.{measure}.m {m} is larger than the {examples} examples the "
                    f"analyses use (the {config.analysis.split} split of "
                    f"{dataset_name(config)}); choose m <= {examples}"
                )


def _check_devices(runs: list[RunSpec], config: StudyConfig) -> None:
    """Before any run starts on this machine: the devices the runs train and analyse on
    exist here (``cuda`` without a GPU failed every run, the analyses after training)."""
    from ..distributed import pick_device

    wanted = {("train.device", str(r.train.get("device", "auto"))) for r in runs}
    if runs and config.analysis.device is not None:
        wanted.add(("analysis.device", config.analysis.device))
    basis = (config.analysis.measures.get("spectrum") or {}).get("basis_device")
    if runs and basis is not None:
        wanted.add(("analysis.spectrum.basis_device", str(basis)))
    for where, device in sorted(wanted):
        try:
            pick_device(device)
        except SharpscopeError as exc:
            reason = str(exc).split("; use --device")[0]  # the command line's advice
            raise SharpscopeError(f"{where}: {reason}; set {where} to cpu or auto") from None


def _check_batch_sizes(runs: list[RunSpec]) -> None:
    """Before any run starts: no batch larger than the training examples of a built-in
    data set (a data factory is not called for it: that would be the user's code, maybe
    slow; its runs say so when they start). The trainer's check and message."""
    from ..data import load_data
    from ..trainer import training_data_spec

    largest: dict[str, RunSpec] = {}
    for run in runs:
        dataset = training_data_spec(run.train["dataset"], run.train["optimizer"])
        if factory_of(dataset) is not None:
            continue
        dataset = {k: v for k, v in dataset.items() if k not in ("label_noise", "noise_seed")}
        key = json.dumps([dataset, run.train.get("data_root")], sort_keys=True, default=str)
        if key not in largest or run.params["batch_size"] > largest[key].params["batch_size"]:
            largest[key] = run
    for run in largest.values():
        dataset = training_data_spec(run.train["dataset"], run.train["optimizer"])
        examples = len(load_data(dataset, "train", data_root=run.train.get("data_root")))
        if run.params["batch_size"] > examples:
            raise SharpscopeError(
                f"run '{run.run_id}': batch size {run.params['batch_size']} is larger than "
                f"the {examples} training examples"
            )


def run_study(
    config: StudyConfig | str | Path,
    out: str | Path | None = None,
    *,
    workers: int = 1,
    executor: str = "local",
    executor_options: dict[str, Any] | None = None,
    log: Log | None = None,
) -> StudySummary:
    """Run every pending run of a study, then write ``results.csv``.

    Args:
        config: a :class:`StudyConfig` or the path of a study TOML file.
        out: the study folder (default ``runs/studies/<name>``); reused to resume.
        workers: local worker processes (``executor="local"``); each uses one CPU
            thread, and on a machine with GPUs the workers take them round robin.
        executor: ``local``, ``slurm`` (submitit), or for tests ``submitit-local``
            (submitit's LocalExecutor) and ``submitit-debug`` (in-process).
        executor_options: submitit parameters, merged over the config's ``[executor]``.
        log: one-line progress messages (default: silent).

    Returns:
        :class:`StudySummary`; runs that diverged are in ``failed``, runs that raised
        another error in ``errors`` (their message; they are retried next time).
    """
    from .config import load_study_config
    from .executors import check_cluster, check_executor

    started = time.perf_counter()
    if not isinstance(config, StudyConfig):
        config = load_study_config(config)
    log = log or (lambda message: None)
    runs = expand_sweep(config)
    folder = Path(out) if out is not None else default_out(config)
    check_executor(executor, workers)
    check_study_dir(folder, config, runs)  # before the lock creates the folder
    check_cluster(executor)
    if executor != "slurm":  # a cluster's nodes may see the data (and GPUs) elsewhere
        pending = [r for r in runs if not run_is_complete(folder, r, config)]
        _check_devices(pending, config)
        _check_data(pending, config)
        _check_batch_sizes(pending)
    folder.mkdir(parents=True, exist_ok=True)
    with study_lock(folder):  # and write nothing before holding it
        prepare_study_dir(folder, config, runs)
        return _run_locked(config, folder, runs, workers, executor, executor_options, log, started)


def _run_locked(config, folder, runs, workers, executor, executor_options, log, started):
    from .executors import execute

    pending = [r for r in runs if not run_is_complete(folder, r, config)]
    skipped = [r.run_id for r in runs if r not in pending]
    if skipped:
        log(f"{len(skipped)} of {len(runs)} runs already complete; skipping them")
    options = {**config.executor, **(executor_options or {})}
    outcomes = execute(
        str(folder.resolve()),
        [r.run_id for r in pending],
        workers=workers,
        executor=executor,
        options=options,
        log=log,
    )
    run_pairs(folder.resolve(), config, runs, log)  # absolute paths in its records
    results = write_results(folder, runs)
    summary = StudySummary(out=folder, results=results, num_runs=len(runs), skipped=skipped)
    for run_id, status in outcomes.items():
        state = status.get("state")
        if state == "done":
            summary.done.append(run_id)
        elif state == "failed":
            summary.failed.append(run_id)
        else:
            summary.errors[run_id] = str(status.get("error", state))
    summary.seconds = time.perf_counter() - started
    return summary


def study_running(folder: Path) -> bool:
    """Whether a ``study run`` holds ``DIR/study.lock`` now (False where locks do not exist)."""
    return is_locked(Path(folder) / LOCK_NAME)


@contextlib.contextmanager
def study_lock(folder: Path) -> Iterator[None]:
    """Hold ``DIR/study.lock`` so two ``study run`` never work on one folder at once; the
    file holds the PID of the process that has it and is removed when the run ends.

    Raises:
        SharpscopeError: another process holds the lock.
    """
    busy = (
        f"another `sharpscope study run` is working in {folder}; wait for it to finish "
        f"or use {_another('--out')}"
    )
    with transient_lock(folder / LOCK_NAME, busy) as fd:
        if fd >= 0:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
