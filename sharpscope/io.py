"""Checkpoints: weights + specs + metadata, safe to load.

A sharpscope checkpoint (interface.md, "Checkpoints") is a ``torch.save``d dict of
tensors and plain Python values only, so it loads with
``torch.load(path, weights_only=True)``; nothing is ever unpickled with code
execution. Files are written atomically (temporary file, fsync, rename), so an
interrupted save leaves the previous checkpoint intact.

Beside the keys of interface.md we store ``input_shape`` and ``num_classes`` so the
model can be rebuilt without loading the data.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import pickle
import signal
import threading
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import SharpscopeError, first_line
from .registry import build_model, check_trusted_factory, normalize_spec
from .results import atomic_write

FORMAT = "sharpscope-checkpoint"
VERSION = 1
# the first bytes of what torch.save writes: a zip archive, or (the legacy format,
# _use_new_zipfile_serialization=False) a pickle stream of protocol >= 2
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGIC = b"\x80"


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while the block runs (the end of an epoch: its metrics rows
    and checkpoints being written), then deliver the first one that came. A stop in the
    middle cancelled the atomic write, and the finished epoch was lost (with a line that
    said "before the first epoch ended" after epoch 1 was shown). Signals run their
    handlers in the main thread only; elsewhere, and for an ignored signal, nothing
    changes. The block must not wait on other processes (it would not stop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    held = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        handler = signal.getsignal(number)
        if handler not in (signal.SIG_IGN, None):  # None: set outside Python, kept
            held[number] = signal.signal(number, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        for number, handler in held.items():
            signal.signal(number, handler)
    if received:
        signal.raise_signal(received[0])


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Atomically write ``payload`` (tensors and plain values) to ``path`` (serialised
    straight into the temporary file, so a large model is not held twice in memory)."""
    path = Path(path)

    def write(handle) -> None:
        try:
            torch.save(dict(payload), handle)
        except RuntimeError as exc:
            # torch's zip writer hides what stopped it: an OSError (disk full) or an
            # interrupt (Ctrl-C, SIGTERM), which the command must see as such
            if isinstance(exc.__context__, (OSError, KeyboardInterrupt)):
                raise exc.__context__ from None
            raise

    atomic_write(path, write)
    return path


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def safe_load(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors.

    Raises:
        SharpscopeError: missing file, a truncated or corrupt file, or a file that
            would need code execution to unpickle (it is refused, never run).
    """
    path = Path(path)
    if path.is_dir():
        last = path / "last.pt"
        hint = (
            f"; did you mean {last}?"
            if last.is_file()
            else " (sharpscope train --out DIR writes DIR/last.pt)"
        )
        raise SharpscopeError(f"{path} is a folder, not a checkpoint file{hint}")
    if path.exists() and not path.is_file():  # /dev/null, a pipe
        raise SharpscopeError(
            f"{path} is not a regular file; give a .pt file written by torch.save"
        )
    if not path.is_file():
        raise SharpscopeError(f"checkpoint not found: {path}")
    with path.open("rb") as handle:
        head = handle.read(len(ZIP_MAGIC))
    if not head.startswith((ZIP_MAGIC, PICKLE_MAGIC)):
        what = "empty" if not head else "not a torch checkpoint (torch.save writes a zip file)"
        raise SharpscopeError(f"{path} is {what}; give a .pt file written by torch.save")
    try:
        with warnings.catch_warnings():  # a plain pickle: the outcome below says what matters
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = first_line(exc)
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise SharpscopeError(
                f"refusing to load {path}: it holds Python objects that weights_only=True "
                "loading does not allow (it could run code); save plain tensors/state_dicts"
            ) from exc
        raise SharpscopeError(f"cannot read {path}: {first}") from exc
    except (EOFError, RuntimeError, ValueError, OSError, KeyError) as exc:
        text = first_line(exc) or type(exc).__name__
        raise SharpscopeError(f"{path} is truncated or not a torch checkpoint ({text})") from exc


def strip_ddp_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove the ``module.`` prefix that DistributedDataParallel adds."""
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module.") :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def load_weights(model: nn.Module, state_dict: Mapping[str, Any], source: str = "") -> None:
    """Load ``state_dict`` strictly; on mismatch raise one line naming the keys.

    Raises:
        SharpscopeError: missing, unexpected or wrongly shaped entries.
    """
    state_dict = strip_ddp_prefix(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict
        and isinstance(state_dict[k], torch.Tensor)
        and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:

        def show(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {show(shapes)}")
        where = f" {source}" if source else ""
        raise SharpscopeError(
            f"weights{where} do not fit the model (wrong architecture?): " + "; ".join(parts)
        )
    model.load_state_dict(state_dict, strict=True)


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model with its weights, and what made it.

    ``model`` comes in eval mode (BatchNorm uses its running statistics, as the stored
    ``metrics`` were measured); call ``.train()`` before training it further.
    """

    path: Path
    model: nn.Module
    spec: dict[str, Any]
    data_spec: dict[str, Any] | None
    optimizer_spec: dict[str, Any] | None
    metrics: dict[str, float]
    epoch: int | None
    step: int | None
    sha256: str
    input_shape: tuple[int, ...] | None
    num_classes: int | None
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def data_root(self) -> str | None:
        """The CIFAR folder the run trained from, as its config recorded it (a data spec
        holds no machine's paths): ``ss.load_data(ckpt.data_spec, "train",
        data_root=ckpt.data_root)`` reads the run's own data, as the analysis commands do."""
        return (self.raw.get("config") or {}).get("data_root")

    @property
    def is_bare(self) -> bool:
        """Whether the file was a bare state_dict rather than a sharpscope checkpoint."""
        return self.raw.get("format") != FORMAT


def is_sharpscope_checkpoint(obj: Any) -> bool:
    """Whether a loaded object is a sharpscope checkpoint dict."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def recorded_specs(path: str | Path) -> dict[str, Any]:
    """The model, data set and loss specs a sharpscope checkpoint records (kind -> spec;
    empty for a bare state_dict), read memory-mapped where the file allows it, so that a
    check before :func:`load_checkpoint` does not read the weights twice.

    Raises:
        SharpscopeError: as :func:`safe_load`, for a file it cannot read.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - a legacy file, or one safe_load reports in one line
        raw = safe_load(path)
    if not is_sharpscope_checkpoint(raw):
        return {}
    return {"model": raw.get("model"), "data set": raw.get("data"), "loss": raw.get("loss")}


def _check_version(raw: Mapping[str, Any], path: Path) -> None:
    """One line for a version that is missing, not an integer, below 1 or newer than ours."""
    version = raw.get("version")
    readable = f"an integer from 1 to {VERSION}" if VERSION > 1 else "the integer 1"
    if version is None:
        raise SharpscopeError(
            f"{path} records no checkpoint version (a sharpscope checkpoint holds {readable}); "
            "the file was not written by sharpscope or was edited"
        )
    if isinstance(version, bool) or not isinstance(version, int):
        raise SharpscopeError(
            f"{path} has checkpoint version {version!r} ({type(version).__name__}), not "
            f"{readable}; the file was not written by sharpscope or was edited"
        )
    if version < 1:
        raise SharpscopeError(
            f"{path} has checkpoint version {version}; versions start at 1, so the file was "
            "not written by sharpscope or was edited"
        )
    if version > VERSION:
        raise SharpscopeError(
            f"{path} has checkpoint version {version}; this sharpscope reads versions "
            f"1..{VERSION} (upgrade sharpscope)"
        )


def _check_config(raw: Mapping[str, Any], path: Path) -> None:
    """One line for a ``config`` entry that is not the table of training settings that
    ``train`` records (the analyses read its data_root, a resume all of it)."""
    config = raw.get("config")
    if config is not None and not isinstance(config, Mapping):
        raise SharpscopeError(
            f"{path} has a config entry of type {type(config).__name__}, not the table of "
            "training settings that sharpscope train records; the file was edited"
        )


def _check_format(raw: Any, path: Path) -> None:
    """One line for a dict that names a ``format`` other than a sharpscope checkpoint's."""
    if isinstance(raw, Mapping) and "format" in raw and raw["format"] != FORMAT:
        raise SharpscopeError(
            f"{path} has format {raw['format']!r}, not {FORMAT!r}: it is neither a sharpscope "
            "checkpoint nor a bare state_dict (save the weights alone with "
            "torch.save(model.state_dict(), path) and pass --model)"
        )


# what `train --resume` needs beside the weights
TRAINING_STATE_KEYS = (
    "state_dict",
    "optimizer_state",
    "scheduler_state",
    "rng_state",
    "epoch",
    "step",
    "config",
)


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A training checkpoint to resume from, checked: format, version and every key.

    Raises:
        SharpscopeError: unreadable or unsafe file, not a sharpscope checkpoint (e.g. a
            bare state_dict), a newer version, or a checkpoint without training state.
    """
    path = Path(path)
    raw = safe_load(path, map_location)
    _check_format(raw, path)
    if not is_sharpscope_checkpoint(raw):
        raise SharpscopeError(
            f"{path} is not a sharpscope training checkpoint (a bare state_dict or another "
            "file); --resume needs the last.pt that `sharpscope train` wrote"
        )
    _check_version(raw, path)
    _check_config(raw, path)
    missing = [key for key in TRAINING_STATE_KEYS if key not in raw]
    if missing:
        raise SharpscopeError(
            f"{path} has no {', '.join(missing)}: it can be analysed but not resumed"
        )
    return raw


def _shapes_from_data(data_spec: Mapping[str, Any] | None) -> tuple[tuple[int, ...], int]:
    if data_spec is None:
        raise SharpscopeError(
            "a bare state_dict of a registry model needs --data (data_spec= in Python) to know "
            "the input shape and number of classes (or give the model as a module:function "
            "factory)"
        )
    from .data import check_data_spec, load_data

    # a built-in data set's shape is known without reading it (CIFAR needs no data_root)
    known = check_data_spec(data_spec, check_files=False)
    if known is not None:
        return known
    split = load_data(data_spec, "test" if "name" in data_spec else "train")
    return split.input_shape, split.num_classes


def load_checkpoint(
    path: str | Path,
    *,
    model_spec: str | Mapping[str, Any] | None = None,
    data_spec: str | Mapping[str, Any] | None = None,
    map_location: str | torch.device = "cpu",
    trust_factories: bool = False,
) -> Checkpoint:
    """Load a sharpscope checkpoint or a bare state_dict into a model (in eval mode).

    torch's global random state is left as it was (the model's random initialisation,
    which the weights replace, draws from a fork of it).

    Args:
        path: the ``.pt`` file.
        model_spec: required for a bare state_dict; overrides a checkpoint's spec.
        data_spec: for a bare state_dict of a registry model, to infer input shape
            and class count.
        map_location: where tensors are loaded.
        trust_factories: build the model from a ``module:function`` factory that the
            checkpoint names. Off by default: importing and calling it runs code, which a
            checkpoint from someone else should not do on loading (pass ``model_spec``
            to name the factory yourself instead).

    Raises:
        SharpscopeError: unreadable or unsafe file, missing spec, wrong architecture, a
            model factory named by the checkpoint without ``trust_factories``.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise SharpscopeError(
            f"load_checkpoint takes a file path, got {path!r} ({type(path).__name__})"
        )
    path = Path(path)
    raw = safe_load(path, map_location)
    sha = file_sha256(path)
    _check_format(raw, path)
    if is_sharpscope_checkpoint(raw):
        _check_version(raw, path)
        _check_config(raw, path)
        if model_spec is None and raw.get("model") is None:
            raise SharpscopeError(
                f"{path} records no model spec (its 'model' entry is missing); say which "
                "model the weights belong to with --model (model_spec= in Python): a "
                "registry name or module:function"
            )
        if model_spec is None:
            check_trusted_factory(raw["model"], "model", path, trust_factories)
        spec = normalize_spec(model_spec if model_spec is not None else raw["model"], "model")
        data = raw.get("data")
        data = normalize_spec(data_spec, "data set") if data_spec is not None else data
        input_shape = tuple(raw["input_shape"]) if raw.get("input_shape") else None
        num_classes = raw.get("num_classes")
        if "factory" not in spec and (input_shape is None or num_classes is None):
            if data_spec is None:  # the shapes would come from running the file's data factory
                check_trusted_factory(data, "data set", path, trust_factories)
            input_shape, num_classes = _shapes_from_data(data)
        state_dict = raw.get("state_dict")
        if not isinstance(state_dict, Mapping):
            raise SharpscopeError(
                f"{path} is a sharpscope checkpoint without a 'state_dict' entry (the "
                "model's weights, which every checkpoint holds); give one written by "
                "sharpscope train, or a bare state_dict file with --model"
            )
        metrics = dict(raw.get("metrics") or {})
        optimizer_spec = raw.get("optimizer")
        epoch, step = raw.get("epoch"), raw.get("step")
    else:
        state_dict = raw.get("state_dict", raw) if isinstance(raw, Mapping) else None
        if not isinstance(state_dict, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state_dict.values()
        ):
            raise SharpscopeError(
                f"{path} is neither a sharpscope checkpoint nor a state_dict of tensors"
            )
        if model_spec is None:
            raise SharpscopeError(
                f"{path} is a bare state_dict: say which model it belongs to with --model "
                "(model_spec= in Python): a registry name or module:function"
            )
        spec = normalize_spec(model_spec, "model")
        data = normalize_spec(data_spec, "data set") if data_spec is not None else None
        input_shape, num_classes = (None, None)
        if "factory" not in spec:
            input_shape, num_classes = _shapes_from_data(data)
        metrics, optimizer_spec, epoch, step = {}, None, None, None
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten: leave the
        model = build_model(spec, input_shape or (), num_classes or 0)  # caller's RNG alone
    load_weights(model, state_dict, source=f"in {path.name}")
    return Checkpoint(
        path=path,
        model=model.eval(),  # evaluating it must not move its BatchNorm statistics
        spec=spec,
        data_spec=data,
        optimizer_spec=optimizer_spec,
        metrics=metrics,
        epoch=epoch,
        step=step,
        sha256=sha,
        input_shape=input_shape,
        num_classes=num_classes,
        raw=dict(raw) if isinstance(raw, Mapping) else {},
    )
