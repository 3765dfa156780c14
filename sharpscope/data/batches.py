"""Turn whatever the user passes as data into a fixed list of batches.

The analyses accept three forms of data (interface.md): a pair of tensors
``(inputs, targets)``, a map-style ``torch.utils.data.Dataset`` returning
``(input, target)`` pairs, or an iterable of ``(inputs, targets)`` batches. All three
become a list of batches in a fixed order, with no augmentation and no dropped last
batch (analysis.md section 0), optionally moved to a device once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from ..errors import SharpscopeError

Batch = tuple[Tensor, Tensor]


def _is_pair_of_tensors(data: Any) -> bool:
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
        and data[0].shape[:1] == data[1].shape[:1]
        and data[0].dim() > 0
    )


def dataset_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """Stack a map-style dataset of ``(input, target)`` pairs into two tensors.

    A ``TensorDataset`` is taken apart without a per-example loop.
    """
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    tensors = getattr(dataset, "tensors", None)
    if isinstance(tensors, (tuple, list)) and len(tensors) == 2:
        return tensors[0], tensors[1]
    try:
        length = len(dataset)  # type: ignore[arg-type]
    except TypeError as exc:
        raise SharpscopeError("the data set has no length; pass a map-style Dataset") from exc
    if length == 0:
        raise SharpscopeError("the data set is empty")
    inputs, targets = zip(*(dataset[i] for i in range(length)))
    return torch.stack([torch.as_tensor(x) for x in inputs]), torch.as_tensor(
        [int(t) if not isinstance(t, Tensor) or t.dim() == 0 else t for t in targets]
    )


def as_tensors(data: Any) -> tuple[Tensor, Tensor]:
    """Inputs and targets of ``data`` as two tensors (concatenating batches)."""
    if _is_pair_of_tensors(data):
        return data[0], data[1]
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return dataset_tensors(data)
    batches = as_batches(data)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def as_batches(
    data: Any,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> list[Batch]:
    """Return ``data`` as a list of ``(inputs, targets)`` batches in a fixed order.

    Args:
        data: a pair of tensors, a map-style Dataset, or an iterable of batches.
        batch_size: split tensors/datasets into batches of this size (last one may be
            smaller; never dropped). ``None`` keeps a single batch. Ignored for an
            iterable of batches, whose batching is kept as given.
        device: move every batch there once.

    Raises:
        SharpscopeError: when the data is empty or of an unknown form.

    >>> x, y = torch.zeros(5, 2), torch.arange(5)
    >>> [len(b[1]) for b in as_batches((x, y), batch_size=2)]
    [2, 2, 1]
    """
    if batch_size is not None and batch_size < 1:
        raise SharpscopeError(f"batch size must be >= 1, got {batch_size}")
    if _is_pair_of_tensors(data) or (isinstance(data, Dataset) and hasattr(data, "__len__")):
        inputs, targets = as_tensors(data)
        if len(inputs) == 0:
            raise SharpscopeError("the data set is empty")
        size = len(inputs) if batch_size is None else batch_size
        batches = list(zip(inputs.split(size), targets.split(size)))
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes, Tensor)):
        if getattr(data, "drop_last", False) is True:  # a DataLoader that loses examples
            raise SharpscopeError(
                "the DataLoader has drop_last=True, which leaves out the last examples; "
                "use drop_last=False (an analysis takes every example once)"
            )
        batches = []
        for item in data:
            if not (isinstance(item, (tuple, list)) and len(item) >= 2):
                raise SharpscopeError(
                    "data must be (inputs, targets), a Dataset or an iterable of "
                    "(inputs, targets) batches"
                )
            batches.append((torch.as_tensor(item[0]), torch.as_tensor(item[1])))
        if not batches:
            raise SharpscopeError("the data iterable produced no batches")
    else:
        raise SharpscopeError(
            f"cannot use {type(data).__name__} as data: pass (inputs, targets), a Dataset "
            "or an iterable of (inputs, targets) batches"
        )
    if device is not None:
        batches = [(x.to(device), y.to(device)) for x, y in batches]
    return batches


def num_examples(batches: Sequence[Batch]) -> int:
    """Total number of examples in a list of batches."""
    return sum(len(b[1]) for b in batches)
