"""Turn whatever the user passes as data into a fixed list of batches.

The analyses accept three forms of data (interface.md): a pair of tensors
``(inputs, targets)``, a map-style ``torch.utils.data.Dataset`` returning
``(input, target)`` pairs, or an iterable of ``(inputs, targets)`` batches. All three
become a list of batches in a fixed order, with no augmentation and no dropped last
batch (analysis.md section 0), optionally moved to a device once.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ..errors import SharpscopeError, caller_level, first_line

Batch = tuple[Tensor, Tensor]
T = TypeVar("T")


FORMS = "(inputs, targets), a Dataset of (input, target) pairs or an iterable of (inputs, targets) batches"


def is_pair_of_tensors(data: Any) -> bool:
    """A pair ``(inputs, targets)`` of tensors with a batch dimension.

    Raises:
        SharpscopeError: a pair whose inputs and targets differ in length.
    """
    if not (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
        and data[0].dim() > 0
        and data[1].dim() > 0
    ):
        return False
    _check_lengths(data[0], data[1], "")
    return True


def _check_lengths(inputs: Tensor, targets: Tensor, where: str) -> None:
    if inputs.shape[:1] != targets.shape[:1]:
        raise SharpscopeError(
            f"the inputs and targets{where} differ in length: {len(inputs)} inputs, "
            f"{len(targets)} targets (each input needs one target)"
        )


def _describe(item: Any) -> str:
    """``dict with keys 'x', 'y'``, ``tuple of 3``, ``Tensor of shape (3,)``, ``str``."""
    if isinstance(item, dict):
        keys = ", ".join(repr(k) for k in list(item)[:4]) + (", ..." if len(item) > 4 else "")
        return f"a dict with keys {keys}"
    if isinstance(item, (tuple, list)):
        return f"a {type(item).__name__} of {len(item)}"
    if isinstance(item, Tensor):
        return f"a tensor of shape {tuple(item.shape)}"
    return f"a {type(item).__name__}"


def _tensor(value: Any, what: str) -> Tensor:
    """``torch.as_tensor(value)``, or one line saying ``what`` could not be converted."""
    try:
        return torch.as_tensor(value)
    except Exception as exc:  # strings, dicts, ragged lists, ...
        raise SharpscopeError(
            f"cannot turn {what} ({_describe(value)}) into a tensor: {first_line(exc)}; "
            f"data must be {FORMS}"
        ) from exc


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """Stack a map-style dataset of ``(input, target)`` pairs into two tensors.

    A ``TensorDataset`` is taken apart without a per-example loop.

    Raises:
        SharpscopeError: no length, empty, or items that are not ``(input, target)``
            pairs of same-shaped inputs and class (or tensor) targets.
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        inputs, targets = dataset.tensors
        _check_lengths(inputs, targets, " of the TensorDataset")
        return inputs, targets
    tensors = getattr(dataset, "tensors", None)
    if (
        isinstance(tensors, (tuple, list))
        and len(tensors) == 2
        and all(isinstance(t, Tensor) and t.dim() > 0 for t in tensors)
    ):
        _check_lengths(tensors[0], tensors[1], " of the Dataset")
        return tensors[0], tensors[1]
    try:
        length = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise SharpscopeError("the data set has no length; pass a map-style Dataset") from exc
    if length == 0:
        raise SharpscopeError("the data set is empty")
    items = [dataset[i] for i in range(length)]
    for index, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            hint = " (return (x, y) instead of a dict)" if isinstance(item, dict) else ""
            raise SharpscopeError(
                f"item {index} of the Dataset is {_describe(item)}; each item must be an "
                f"(input, target) pair{hint}"
            )
    inputs = [_tensor(x, f"the input of item {i}") for i, (x, _) in enumerate(items)]
    try:
        stacked = torch.stack(inputs)
    except RuntimeError as exc:
        raise SharpscopeError(
            f"the Dataset's inputs cannot be stacked into one tensor: {first_line(exc)} "
            "(every input must have the same shape)"
        ) from exc
    try:
        stacked_targets = torch.as_tensor(
            [int(t) if not isinstance(t, Tensor) or t.dim() == 0 else t for _, t in items]
        )
    except Exception as exc:  # a string label, a dict, a multi-element target, ...
        raise SharpscopeError(
            f"the Dataset's targets cannot be read as class labels: {first_line(exc)}; each "
            "item must be an (input, target) pair with an integer class target"
        ) from exc
    return stacked, stacked_targets


def as_tensors(data: Any, warn_negative: bool = True) -> tuple[Tensor, Tensor]:
    """Inputs and targets of ``data`` as two tensors (concatenating batches);
    ``warn_negative``: warn about negative labels (:func:`as_batches`).

    Raises:
        SharpscopeError: data of an unknown form, or batches that do not fit together.
    """
    if is_pair_of_tensors(data) or (isinstance(data, Dataset) and hasattr(data, "__len__")):
        inputs, targets = data if is_pair_of_tensors(data) else dataset_tensors(data)
        if warn_negative:
            _warn_if_ignored_labels([(inputs, targets)])
        return inputs, targets
    batches = as_batches(data, warn_negative=warn_negative)
    try:
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    except RuntimeError as exc:
        raise SharpscopeError(
            f"the batches cannot be joined into one tensor: {first_line(exc)} (every batch "
            "must hold inputs of the same shape)"
        ) from exc


def as_batches(
    data: Any,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    warn_negative: bool = True,
) -> list[Batch]:
    """Return ``data`` as a list of ``(inputs, targets)`` batches in a fixed order.

    Args:
        data: a pair of tensors, a map-style Dataset, or an iterable of batches.
        batch_size: split tensors/datasets into batches of this size (last one may be
            smaller; never dropped). ``None`` keeps a single batch. Ignored for an
            iterable of batches, whose batching is kept as given.
        device: move every batch there once.
        warn_negative: warn about negative integer labels (cross_entropy's
            ``ignore_index``), which the analyses' per-example batch weights do not skip;
            off for a loader that refuses or passes them on (training refuses them).

    Raises:
        SharpscopeError: when the data is empty or of an unknown form.

    >>> x, y = torch.zeros(5, 2), torch.arange(5)
    >>> [len(b[1]) for b in as_batches((x, y), batch_size=2)]
    [2, 2, 1]
    """
    if batch_size is not None and batch_size < 1:
        raise SharpscopeError(f"batch size must be >= 1, got {batch_size}")
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(type(part).__module__ == "numpy" for part in data)
    ):
        raise SharpscopeError(
            "the data are NumPy arrays; give tensors: (torch.as_tensor(inputs), "
            "torch.as_tensor(targets))"
        )
    if is_pair_of_tensors(data) or (isinstance(data, Dataset) and hasattr(data, "__len__")):
        inputs, targets = as_tensors(data)
        if len(inputs) == 0:
            raise SharpscopeError("the data set is empty")
        # a size above the data is one batch (split() cannot take sizes beyond int64)
        size = len(inputs) if batch_size is None else min(batch_size, len(inputs))
        batches = list(zip(inputs.split(size), targets.split(size)))
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor)):
        if getattr(data, "drop_last", False) is True:  # a DataLoader that loses examples
            raise SharpscopeError(
                "the DataLoader has drop_last=True, which leaves out the last examples; "
                "use drop_last=False (an analysis takes every example once)"
            )
        batches = []
        for index, item in enumerate(data):
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise SharpscopeError(
                    f"batch {index} of the data is {_describe(item)}; data must be {FORMS}"
                )
            inputs = _tensor(item[0], f"the inputs of batch {index}")
            targets = _tensor(item[1], f"the targets of batch {index}")
            if inputs.dim() == 0 or targets.dim() == 0:
                raise SharpscopeError(
                    f"batch {index} of the data holds a single number, not a batch; data "
                    f"must be {FORMS}"
                )
            _check_lengths(inputs, targets, f" of batch {index}")
            batches.append((inputs, targets))
        if not batches:
            raise SharpscopeError("the data iterable produced no batches")
    else:
        raise SharpscopeError(
            f"cannot use {type(data).__name__} as data: pass (inputs, targets), a Dataset "
            "or an iterable of (inputs, targets) batches"
        )
    if warn_negative:
        _warn_if_ignored_labels(batches)
    if device is not None:
        batches = [(x.to(device), y.to(device)) for x, y in batches]
    return batches


def _warn_if_ignored_labels(batches: Sequence[Batch]) -> None:
    """Warn about negative integer labels, such as ``cross_entropy``'s ``ignore_index=-100``.

    Every analysis takes the loss as a per-example mean, L = Σ_b (n_b/N)·L_b over batches
    (and subsets), as analysis.md section 0 defines it. A loss that skips some examples
    averages over the others only, so its batches would need other weights and the
    result would depend on the batch size. Dropping those examples keeps it exact.
    """
    ignored = sum(
        int((y < 0).sum()) for _, y in batches if not (y.is_floating_point() or y.is_complex())
    )
    if ignored:
        total = num_examples(batches)
        warnings.warn(
            f"{ignored} of {total} targets are negative labels (such as cross_entropy's "
            "ignore_index -100); the analyses weight every example alike (n_b/N per batch), "
            "so a loss that skips them gives values that depend on the batching; drop those "
            "examples from the data",
            stacklevel=caller_level(),
        )


def num_examples(batches: Sequence[Batch]) -> int:
    """Total number of examples in a list of batches."""
    return sum(len(b[1]) for b in batches)


def rereadable(data: Any) -> bool:
    """Data whose second read could differ from the first (a shuffling DataLoader, a
    Dataset with random transforms): not plain tensors or a list of fixed batches."""
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        return False
    if isinstance(data, TensorDataset) or hasattr(data, "tensors"):
        return False
    if isinstance(data, (list, tuple)):
        return False  # a list of fixed batches
    if isinstance(data, Dataset):
        return True
    try:
        return iter(data) is not data  # a DataLoader re-iterates; a generator does not
    except TypeError:
        return False


def same_batches(a: Sequence[Batch], b: Sequence[Batch]) -> bool:
    """Whether two reads gave the same batches (shapes and values, in order)."""
    if len(a) != len(b):
        return False
    for (x1, y1), (x2, y2) in zip(a, b):
        if x1.shape != x2.shape or y1.shape != y2.shape:
            return False
        if not (torch.equal(x1, x2) and torch.equal(y1, y2)):
            return False
    return True


def same_tensors(a: Batch, b: Batch) -> bool:
    """Whether two reads of a data set as one ``(inputs, targets)`` pair gave the same."""
    return same_batches([a], [b])


def read_fixed(
    data: Any, read: Callable[[Any], T], same: Callable[[T, T], bool], why: str = ""
) -> T:
    """``read(data)``, read a second time and compared (``same``) when the data could
    change between reads (:func:`rereadable`): a shuffling loader or random augmentation
    is refused, since the analysis would be of no fixed function. ``why`` adds the
    caller's reason to the message."""
    first = read(data)
    if not rereadable(data):
        return first
    try:
        second = read(data)
    except SharpscopeError as exc:  # an iterable that streams once ("produced no batches")
        raise SharpscopeError(
            f"the data can be read only once ({exc}){why}: pass tensors or a list of batches"
        ) from exc
    if not same(first, second):
        raise SharpscopeError(
            f"the data changed between two reads (shuffling or random augmentation){why}; "
            "pass fixed tensors, or a DataLoader with shuffle=False and no random transforms"
        )
    return first


_NARROW_INTEGERS = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32)


def class_indices(targets: Tensor) -> Tensor:
    """Integer and bool targets as ``int64``, the type ``cross_entropy`` and ``gather``
    index with (uint8 labels ran in some analyses and failed inside others, and so did bool
    labels, which ``train`` takes as classes 0 and 1); others as they are."""
    return targets.long() if targets.dtype in _NARROW_INTEGERS else targets


def fixed_batches(data: Any, batch_size: int | None, device: Any, why: str = "") -> list[Batch]:
    """:func:`as_batches`, refused by :func:`read_fixed` when a second read differs; both
    reads stay on the CPU (two copies of the data never sit on a GPU at once), and the
    batches then move to ``device`` (None: stay where they are), integer targets as
    :func:`class_indices`."""
    batches = read_fixed(data, lambda d: as_batches(d, batch_size), same_batches, why)
    return [(x.to(device), class_indices(y).to(device)) for x, y in batches]
