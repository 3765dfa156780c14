"""Whether two reads of a data set gave the same examples.

* Under torchrun every process must read bit-identical data: their :func:`data_digest`
  (a hash of the bytes) must agree (:func:`sharpscope.distributed.check_same_data`).
* An analysis of a trained run reads a user's data factory again, and should see the
  data the run trained on. A checkpoint records a few float64 sums of its factory's data
  (:func:`data_summary`, compared to rounding: another machine may sum in another
  order), and :func:`reading_as_trained` repeats the random state in which training
  called the factory, so a factory that draws from torch's global generator without a
  seed of its own gives the same data again; any other change is said in one warning
  (:func:`warn_if_not_as_trained`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = [
    "data_digest",
    "data_summary",
    "same_summary",
    "reading_as_trained",
    "warn_if_not_as_trained",
]


def data_summary(inputs: Tensor, targets: Tensor) -> list[float]:
    """A few float64 sums that tell data sets apart: the size, the sums of the examples'
    values and of their targets, each plain and weighted by the example's position (so
    a reordering shows too). Summed in chunks of examples, without a float64 copy."""
    n = len(inputs)
    totals = torch.zeros(4, dtype=torch.float64)
    for start in range(0, n, 4096):
        rows = inputs[start : start + 4096].reshape(min(4096, n - start), -1)
        labels = targets[start : start + 4096].reshape(len(rows), -1)
        weight = torch.arange(start + 1, start + len(rows) + 1, dtype=torch.float64)
        for i, part in enumerate((rows, labels)):
            sums = part.sum(1, dtype=torch.float64).cpu()
            totals[2 * i] += sums.sum()
            totals[2 * i + 1] += (sums * weight).sum()
    return [float(n), *totals.tolist()]


def data_digest(inputs: Tensor, targets: Tensor) -> str:
    """A BLAKE2 digest of the examples' and targets' bytes (and dtypes and shapes): equal
    only for bit-identical data. Processes of one torchrun job read their data the same
    way, so they compare this; the sums of :func:`data_summary` miss a change that keeps
    each example's total (a flip, a roll, a channel shuffle drawn from numpy's unseeded
    generator). Hashed in chunks of examples, without a copy of the whole set."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    for tensor in (inputs, targets):
        digest.update(f"{tensor.dtype} {tuple(tensor.shape)};".encode())
        for start in range(0, len(tensor), 4096):
            chunk = tensor[start : start + 4096].detach().cpu().contiguous()
            digest.update(chunk.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def same_summary(a: Sequence[float], b: Sequence[float]) -> bool:
    """Equal sums, to rounding (NaN equal to NaN: data with NaN in them are not "other").

    >>> same_summary([1.0, float("nan")], [1.0 + 1e-12, float("nan")]), same_summary([1.0], [1.1])
    (True, False)
    """
    return len(a) == len(b) and all(
        x == y or (x != x and y != y) or abs(x - y) <= 1e-9 * max(abs(x), abs(y))
        for x, y in zip(a, b)
    )


@contextlib.contextmanager
def reading_as_trained(training_seed: int | None) -> Iterator[None]:
    """Seed torch's generator as training did just before it read its data (the trainer
    calls ``torch.manual_seed(config.seed)`` and then the data factory), and give the
    caller's generator state back afterwards. Nothing happens for ``None``."""
    if training_seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(training_seed))
        yield


def warn_if_not_as_trained(
    summary: Sequence[float] | None,
    trained: Sequence[float] | None,
    factory: str,
    run: str,
    consequence: str = "the analysis is of the data read now",
) -> bool:
    """Warn in one line when a factory's data (``summary``) differ from those the run
    trained on (``trained``, the checkpoint's ``data_summary``); True when it warned.
    Nothing is said where either is unknown (a built-in data set, an older checkpoint)."""
    if summary is None or not trained or same_summary(summary, trained):
        return False
    warnings.warn(
        f"data factory {factory} gave other data than when {run} was trained (unseeded "
        f"random draws, or its data changed): {consequence}; seed the factory's draws "
        "(e.g. torch.Generator().manual_seed(0)) to read the same data each time",
        stacklevel=2,
    )
    return True
