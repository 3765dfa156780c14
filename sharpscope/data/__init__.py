"""Data sets by name, offline, as tensors (interface.md, "Specifying ... data").

Built-ins: ``mnist1d`` (generated locally, standard 4000/1000 split, cached),
``digits`` (scikit-learn, fixed seeded 1437/360 split), ``cifar10`` and ``cifar100``
(read from ``data_root`` in the standard python-pickle layout, never downloaded).
A ``module:function`` factory returning ``(inputs, targets)`` or a Dataset also works
(one set, which is then its own test set too), or ``{"train": ..., "test": ...}`` of two
such sets.

Options of every spec: ``label_noise`` (symmetric, fraction of training labels),
``noise_seed``, ``val_fraction`` (seeded hold-out of the training split, served as
split ``"val"``), ``samples`` (first N after a seeded shuffle), ``data_root``.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from numbers import Integral
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from ..errors import MAX_SEED, SharpscopeError, first_line
from ..registry import (
    EXIT_HINT,
    calling_user_code,
    normalize_spec,
    resolve_factory,
    unknown_name,
)
from .batches import as_batches, as_tensors, is_pair_of_tensors, num_examples
from .fingerprint import data_summary
from .noise import symmetric_label_noise
from .sources import CIFAR_LAYOUT, SOURCES, RawData, cifar_folder

SPLITS = ("train", "val", "test", "all")
SPEC_OPTIONS = ("label_noise", "noise_seed", "val_fraction", "samples", "seed", "data_root")
#: what :func:`load_data` takes for an option a spec leaves out (``data_root``: the caller's)
SPEC_DEFAULTS = {
    "label_noise": 0.0,
    "noise_seed": 0,
    "val_fraction": 0.0,
    "samples": None,
    "seed": 0,
}

__all__ = [
    "DataSplit",
    "load_data",
    "one_factory_call",
    "subset_size_and_seed",
    "recorded_data_spec",
    "dataset_names",
    "check_data_spec",
    "check_data_files",
    "as_batches",
    "as_tensors",
    "num_examples",
    "SPLITS",
]


class DataSplit(TensorDataset):
    """One split of a data set, held as two tensors.

    It is a ``TensorDataset`` (so it works anywhere a Dataset does) with the facts a
    model and a report need: ``num_classes``, ``input_shape``, the ``spec`` that made
    it, and under label noise the ``clean_targets`` and the ``noisy_mask``.
    """

    def __init__(
        self,
        inputs: Tensor,
        targets: Tensor,
        *,
        num_classes: int,
        spec: dict[str, Any],
        split: str,
        clean_targets: Tensor | None = None,
        subset: Mapping[str, int] | None = None,
        test_is_train: bool = False,
        source_summary: list[float] | None = None,
    ) -> None:
        super().__init__(inputs, targets)
        self.inputs = inputs
        self.targets = targets
        self.num_classes = int(num_classes)
        self.input_shape = tuple(inputs.shape[1:])
        self.spec = dict(spec)
        self.split = split
        self.clean_targets = clean_targets
        # the seeded subset load_data took ({"samples": N, "seed": S}; empty: all)
        self.subset = dict(subset or {})
        # a data factory's one set: its test split is its training data
        self.test_is_train = test_is_train
        # a data factory's: data_summary of all it returned (the checkpoint records it)
        self.source_summary = source_summary

    @property
    def noisy_mask(self) -> Tensor | None:
        """Boolean mask of the examples whose label was flipped (None without noise)."""
        if self.clean_targets is None:
            return None
        return self.clean_targets != self.targets

    def pair(self) -> tuple[Tensor, Tensor]:
        """``(inputs, targets)``."""
        return self.inputs, self.targets

    def to(
        self, device: torch.device | str | None, *, dtype: torch.dtype | None = None
    ) -> DataSplit:
        """A copy living on ``device`` (None: where it is), with floating-point inputs in
        ``dtype`` (None: as they are)."""
        inputs = self.inputs.to(device)
        if dtype is not None and inputs.is_floating_point():
            inputs = inputs.to(dtype)
        return DataSplit(
            inputs,
            self.targets.to(device),
            num_classes=self.num_classes,
            spec=self.spec,
            split=self.split,
            clean_targets=None if self.clean_targets is None else self.clean_targets.to(device),
            subset=self.subset,
            test_is_train=self.test_is_train,
            source_summary=self.source_summary,
        )

    def __repr__(self) -> str:
        return (
            f"DataSplit({self.spec.get('name', self.spec.get('factory'))!r}, split={self.split!r}, "
            f"n={len(self)}, input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def dataset_names() -> list[str]:
    """Names of the built-in data sets."""
    return sorted(SOURCES)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise SharpscopeError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")


def _check_fraction(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError) as exc:
        raise SharpscopeError(f"{name} must be a number in [0, 1), got {value!r}") from exc
    if not 0.0 <= value < 1.0:
        raise SharpscopeError(f"{name} must be in [0, 1), got {value}")
    return value


def _check_count(name: str, value: Any, low: int = 0) -> int:
    """``value`` as an integer >= ``low`` (``"16"`` and ``16.0`` are fine), else one line."""
    if isinstance(value, bool):
        raise SharpscopeError(f"{name} must be an integer >= {low}, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise SharpscopeError(f"{name} must be an integer >= {low}, got {value!r}") from None
    if not number.is_integer() or number < low:
        raise SharpscopeError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(number)


def _check_seed_option(name: str, value: Any) -> int:
    """A data spec's ``seed`` or ``noise_seed`` as an integer from 0 to 2^62, the bound of
    ``--seed`` (``"16"`` and ``16.0`` are fine), else one line: a larger one ended in a
    traceback from torch's generator (bug B5, session 28).

    >>> _check_seed_option("seed", "7"), _check_seed_option("seed", 2**62)
    (7, 4611686018427387904)
    """
    number: Any = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                number = None
    if isinstance(number, float) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, Integral) or not 0 <= number <= MAX_SEED:
        raise SharpscopeError(f"{name} must be an integer from 0 to 2^62, got {value!r}")
    return int(number)


def data_root_option(value: Any, name: str = "data_root") -> str | None:
    """A folder given as ``data_root`` (``None``: not given) as a path string, else one
    line: ``--data-opt data_root=2024`` parses as an integer, which is still a folder name.

    >>> data_root_option(2024), data_root_option(None)
    ('2024', None)
    """
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, (str, os.PathLike)):
        raise SharpscopeError(f"{name} must be a folder path, got {value!r}")
    value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():  # "" meant the working folder
        raise SharpscopeError(f"{name} must be a folder path, got {value!r}")
    return value


def _seeded_permutation(n: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))


#: the data each factory gave inside :func:`one_factory_call` (None outside it)
_FACTORY_DATA: dict[str, RawData] | None = None


@contextlib.contextmanager
def one_factory_call() -> Iterator[None]:
    """Within the block, a data factory is called once however many splits are loaded
    from it: a factory that draws unseeded random data would give each split other data
    (a one-set factory's "test" set, said to be its train set, would not be)."""
    global _FACTORY_DATA
    outer, _FACTORY_DATA = _FACTORY_DATA, {} if _FACTORY_DATA is None else _FACTORY_DATA
    try:
        yield
    finally:
        _FACTORY_DATA = outer


def _raw_from_factory(path: str) -> RawData:
    """The data a user's factory returns: one set (``(inputs, targets)``, a Dataset or
    batches), which then serves as train, test and all, or ``{"train": set, "test": set}``."""
    factory = resolve_factory(path, "data set")
    try:
        with calling_user_code(f"data factory '{path}'", EXIT_HINT):
            produced = factory()
    except SharpscopeError:
        raise
    except Exception as exc:  # the user's factory raised
        raise SharpscopeError(
            f"data factory '{path}' failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    try:
        if isinstance(produced, Mapping):
            if set(produced) != {"train", "test"}:
                raise SharpscopeError(
                    "a dict of data sets needs exactly the keys 'train' and 'test', got "
                    f"{sorted(map(str, produced))}"
                )
            parts = {key: _factory_part(produced[key], f"'{key}': ") for key in produced}
        else:
            parts = {"train": _factory_part(produced, "")}
    except SharpscopeError as exc:
        raise SharpscopeError(f"data factory '{path}': {exc}") from exc
    train_inputs, train_targets = parts["train"]
    test_inputs, test_targets = parts.get("test", parts["train"])
    if train_targets.is_floating_point() != test_targets.is_floating_point():
        raise SharpscopeError(
            f"data factory '{path}': the train and test targets must both be class "
            "indices or both be floats"
        )
    if train_inputs.shape[1:] != test_inputs.shape[1:]:
        raise SharpscopeError(
            f"data factory '{path}': train inputs of shape {tuple(train_inputs.shape[1:])} "
            f"and test inputs of shape {tuple(test_inputs.shape[1:])} per example differ"
        )
    num_classes = (
        int(max(train_targets.max().item(), test_targets.max().item())) + 1
        if not train_targets.is_floating_point()
        else 1
    )
    summary = data_summary(train_inputs, train_targets)
    if "test" in parts:
        summary += data_summary(test_inputs, test_targets)
    return RawData(
        train_inputs,
        train_targets,
        test_inputs,
        test_targets,
        num_classes,
        test_is_train="test" not in parts,
        summary=summary,
    )


def _factory_part(produced: Any, where: str) -> tuple[Tensor, Tensor]:
    """One set of a factory as ``(inputs, targets)``, integer targets as ``long``;
    ``where`` names the part in errors."""
    try:
        inputs, targets = as_tensors(produced, warn_negative=False)  # train refuses them
        one_shot = isinstance(produced, Iterator)  # a generator cannot be read twice
        if not (one_shot or is_pair_of_tensors(produced) or isinstance(produced, TensorDataset)):
            # a Dataset or batches read per item: a second read must give the same data
            # (random augmentation or shuffling would freeze one unseeded draw)
            again_inputs, again_targets = as_tensors(produced, warn_negative=False)
            if not (torch.equal(inputs, again_inputs) and torch.equal(targets, again_targets)):
                raise SharpscopeError(
                    "the data changed between two reads (shuffling or random augmentation); "
                    "return fixed tensors, or a Dataset without random transforms"
                )
        if len(inputs) == 0:  # before the class count, which reads the largest label
            raise SharpscopeError("the data set is empty")
    except SharpscopeError as exc:
        raise SharpscopeError(f"{where}{exc}") from exc
    return inputs, targets.long() if not targets.is_floating_point() else targets


# input shape and class count of the built-in data sets, known without reading them
SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "mnist1d": ((40,), 10),
    "digits": ((1, 8, 8), 10),
    "cifar10": ((3, 32, 32), 10),
    "cifar100": ((3, 32, 32), 100),
}


def _check_option_names(spec: Mapping[str, Any]) -> None:
    unknown = sorted(set(spec) - set(SPEC_OPTIONS) - {"name", "factory"})
    if unknown:
        raise SharpscopeError(
            f"unknown data option '{unknown[0]}'; valid options: {', '.join(SPEC_OPTIONS)}"
        )


def check_data_spec(
    spec: str | Mapping[str, Any], *, check_files: bool = True
) -> tuple[tuple[int, ...], int] | None:
    """Check a data spec without reading any data: the name (or that a factory file
    exists), the option names and values. For checking a configuration up front.

    Args:
        spec: as for :func:`load_data`.
        check_files: also check that a ``file.py:function`` factory's file exists and a
            ``module:function`` factory's top-level package can be found.

    Returns:
        ``(input_shape, num_classes)`` of a built-in data set; ``None`` for a factory.

    Raises:
        SharpscopeError: what :func:`load_data` would refuse, except missing CIFAR files.

    >>> check_data_spec({"name": "mnist1d", "label_noise": 0.2})
    ((40,), 10)
    """
    from ..registry import check_factory

    spec = normalize_spec(spec, "data set")
    split = spec.pop("split", None)  # as an analysis' meta.data records it (load_data takes it)
    if split is not None:
        _check_split(split)
    _check_option_names(spec)
    if "factory" in spec:
        if check_files:
            check_factory(spec["factory"], "data set")
        shapes = None
    else:
        if spec["name"] not in SOURCES:
            raise unknown_name("data set", spec["name"], list(SOURCES))
        shapes = SHAPES.get(spec["name"])
    _check_fraction("label_noise", spec.get("label_noise", 0.0))
    _check_fraction("val_fraction", spec.get("val_fraction", 0.0))
    _check_seed_option("noise_seed", spec.get("noise_seed", 0))
    _check_seed_option("seed", spec.get("seed", 0))
    data_root_option(spec.get("data_root"))
    if spec.get("samples") is not None:
        _check_count("samples", spec["samples"], low=1)
    return shapes


def check_data_files(spec: str | Mapping[str, Any], data_root: str | None = None) -> None:
    """Check that a data set read from files finds them, without reading them: for
    CIFAR-10/100 every python-pickle file under the root (a spec's ``data_root`` wins).
    Generated and packaged data sets and factories need nothing.

    Raises:
        SharpscopeError: the folder or some of its files are missing, as in :func:`load_data`.

    >>> check_data_files("mnist1d")
    """
    spec = normalize_spec(spec, "data set")
    if spec.get("name") in CIFAR_LAYOUT:
        cifar_folder(spec["name"], data_root_option(spec.get("data_root", data_root)))


def subset_size_and_seed(
    spec: Mapping[str, Any], samples: int | None, seed: int
) -> tuple[int | None, int]:
    """How many examples :func:`load_data` keeps (None: all) and the seed of its shuffle.

    A spec's own ``samples`` belongs to the data set (a run trained on that subset): it is
    shuffled with the spec's ``seed`` (0 when absent), never with the ``seed`` argument,
    and ``samples`` takes a prefix of it, at most all of it, so an analysis of the train
    split only sees examples the run trained on. Without it, ``samples`` takes the first
    N after a shuffle seeded by the spec's ``seed`` or else by ``seed``.

    >>> subset_size_and_seed({"name": "mnist1d", "samples": 256}, 1024, 3)
    (256, 0)
    >>> subset_size_and_seed({"name": "mnist1d"}, 1024, 3)
    (1024, 3)
    """
    own = spec.get("samples")
    if own is None:
        n = None if samples is None else _check_count("samples", samples, low=1)
        return n, _check_seed_option("seed", spec.get("seed", seed))
    own = _check_count("samples", own, low=1)
    own_seed = _check_seed_option("seed", spec.get("seed", 0))
    if samples is None:
        return own, own_seed
    return min(_check_count("samples", samples, low=1), own), own_seed


def recorded_data_spec(
    spec: dict[str, Any],
    split: str,
    samples: int | None,
    seed: int,
    split_data: DataSplit,
    *,
    samples_name: str = "--samples",
) -> dict[str, Any]:
    """The data spec to record in ``meta.data``: one that reloads the same examples
    (``load_data(recorded, recorded["split"])``).

    Its ``samples`` is ``--samples``, or else the spec's own (``None``: all), at most the
    examples there are (``load_data`` caps it: the number used is recorded instead, with a
    one-line warning that calls ``samples`` by ``samples_name``), and with a subset its
    ``seed`` is the seed of that subset's shuffle.
    """
    wanted = samples if samples is not None else spec.get("samples")
    used = wanted
    if wanted is not None and int(wanted) > len(split_data):
        own = spec.get("samples")
        if samples is not None and own is not None and int(samples) > int(own):
            why = f"more than the data set's own samples={own} (the examples the run used)"
        else:
            why = f"more than the {len(split_data)} examples of the {split_data.split} split"
        flag = samples_name if samples is not None else "the data spec's samples"
        warnings.warn(f"{flag} {wanted} is {why}; using all {len(split_data)}", stacklevel=2)
        used = len(split_data)
    recorded = {**spec, "split": split, "samples": used}
    if used is not None:
        recorded["seed"] = subset_size_and_seed(spec, samples, seed)[1]
    return recorded


def load_data(
    spec: str | Mapping[str, Any],
    split: str | None = None,
    *,
    samples: int | None = None,
    seed: int = 0,
    data_root: str | None = None,
    device: torch.device | str | None = None,
) -> DataSplit:
    """Load ``split`` of the data set named by ``spec``.

    Args:
        spec: ``"mnist1d"``, ``{"name": "cifar10", "label_noise": 0.4}``, or a
            ``module:function`` factory path.
        split: ``train`` (minus the validation hold-out), ``val`` (the hold-out),
            ``test``, or ``all`` (train and test together, no noise); default: the
            spec's own ``split`` key (as an analysis' ``meta.data`` records it), else ``train``.
        samples: keep the first N examples after a shuffle seeded by ``seed``; within
            a spec's own ``samples`` (the subset a run trained on), see
            :func:`subset_size_and_seed`.
        seed: seed of that shuffle (a spec's own ``seed`` key wins; unused when the
            spec has its own ``samples``).
        data_root: folder holding CIFAR files (a spec's ``data_root`` wins).
        device: move the tensors there once.

    Raises:
        SharpscopeError: unknown name, option or split, missing files, bad fractions.
    """
    spec = normalize_spec(spec, "data set")
    recorded_split = spec.pop("split", None)  # meta.data records the split beside the options
    split = split if split is not None else (recorded_split or "train")
    _check_split(split)
    _check_option_names(spec)
    root = data_root_option(spec.get("data_root", data_root))
    if "factory" in spec:
        path = spec["factory"]
        if _FACTORY_DATA is None:
            raw = _raw_from_factory(path)
        else:
            if path not in _FACTORY_DATA:
                _FACTORY_DATA[path] = _raw_from_factory(path)
            raw = _FACTORY_DATA[path]
    else:
        name = spec["name"]
        if name not in SOURCES:
            raise unknown_name("data set", name, list(SOURCES))
        raw = SOURCES[name](root)

    noise = _check_fraction("label_noise", spec.get("label_noise", 0.0))
    noise_seed = _check_seed_option("noise_seed", spec.get("noise_seed", 0))
    val_fraction = _check_fraction("val_fraction", spec.get("val_fraction", 0.0))
    if split == "val" and val_fraction == 0.0:
        raise SharpscopeError("split 'val' needs a data option val_fraction > 0 (e.g. 0.1)")

    clean = None
    if split == "test":
        inputs, targets = raw.test_inputs, raw.test_targets
    elif split == "all" and raw.test_is_train:  # one set, not twice
        inputs, targets = raw.train_inputs, raw.train_targets
    elif split == "all":
        inputs = torch.cat([raw.train_inputs, raw.test_inputs])
        targets = torch.cat([raw.train_targets, raw.test_targets])
    else:
        inputs, targets = raw.train_inputs, raw.train_targets
        if noise > 0:
            clean = targets
            targets = symmetric_label_noise(targets, noise, raw.num_classes, seed=noise_seed)
        if val_fraction > 0:
            order = _seeded_permutation(len(targets), 12345)
            num_val = max(1, round(val_fraction * len(targets)))
            if num_val >= len(targets):
                raise SharpscopeError(
                    f"val_fraction {val_fraction} leaves no training examples of {len(targets)}"
                )
            keep = order[:num_val] if split == "val" else order[num_val:]
            keep = keep.sort().values
            inputs, targets = inputs[keep], targets[keep]
            clean = None if clean is None else clean[keep]

    n, shuffle_seed = subset_size_and_seed(spec, samples, seed)
    subset: dict[str, int] = {}
    if n is not None:
        if n < len(targets):
            keep = _seeded_permutation(len(targets), shuffle_seed)[:n]
            inputs, targets = inputs[keep], targets[keep]
            clean = None if clean is None else clean[keep]
            subset = {"samples": n, "seed": shuffle_seed}
    out = DataSplit(
        inputs.contiguous(),
        targets.contiguous(),
        num_classes=raw.num_classes,
        spec=spec,
        split=split,
        clean_targets=clean,
        subset=subset,
        test_is_train=raw.test_is_train,
        source_summary=raw.summary,
    )
    return out.to(device) if device is not None else out
