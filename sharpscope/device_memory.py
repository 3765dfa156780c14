"""Vectorized work that adapts to device memory.

The analyses evaluate many rows at once (grid points of a landscape, subsets of
m-sharpness, vectors of a block of Hessian-vector products), one ``vmap`` call per
chunk, and their default chunk sizes are guesses: what fits depends on the model, the
batch and the device. :class:`FittingRows` runs a chunk whole and, when a call runs out
of memory (:func:`is_out_of_memory`), halves the rows per call from then on and redoes
the rows that failed. Each row's value is the same function of its own inputs in any
company, so only the rounding of the vectorized kernels can differ. (HessianOperator
also halves its batches, in eval mode, when a single product does not fit.)
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

R = TypeVar("R")


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` says the memory ran out: ``torch.OutOfMemoryError`` (CUDA), or the
    CPU allocator refusing an allocation (a ``RuntimeError``, "can't allocate memory").

    >>> is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    True
    >>> is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    False
    """
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)
    )


class FittingRows:
    """The most rows one vectorized call may take: unbounded until a call runs out of
    device memory, then halved each time that happens (down to one row, whose failure
    is final).

    >>> fit = FittingRows("points")
    >>> [(s.start, s.stop, r) for s, r in fit.run(lambda s: s.stop - s.start, 2, 7)]
    [(2, 7, 5)]
    >>> fit.most is None
    True
    """

    def __init__(self, what: str, most: int | None = None) -> None:
        self.what = what
        self.most = most
        self.halvings = 0

    def run(self, compute: Callable[[slice], R], start: int, stop: int) -> list[tuple[slice, R]]:
        """``compute`` on consecutive slices covering ``range(start, stop)``, each as large
        as fits; returns ``(slice, result)`` in order."""
        parts: list[tuple[slice, R]] = []
        while start < stop:
            size = stop - start if self.most is None else min(self.most, stop - start)
            part = slice(start, start + size)
            try:
                parts.append((part, compute(part)))
            except RuntimeError as exc:
                if size <= 1 or not is_out_of_memory(exc):
                    raise
            else:
                start += size
                continue
            # here the failed call's tensors are free (the exception is gone)
            self.most = (size + 1) // 2
            self.halvings += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(
                f"out of device memory with {size} {self.what} per call; "
                f"{self.most} per call from now on",
                RuntimeWarning,
                stacklevel=2,
            )
        return parts


# --------------------------------------------------------------- CPU memory budget
# Peak bytes of a Hessian-vector product (pre-flight and HVP-mode timing included) per
# byte that autograd saves in one forward pass, measured 2.9-4.9 on ResNet-20 and
# 3.9-8 on an MLP (peak RSS growth per example over the forward's saved bytes).
HVP_MEMORY_FACTOR = 8
# The share of the free memory one analysis process plans to use by default.
CPU_MEMORY_SHARE = 0.5


def available_memory_bytes() -> int | None:
    """Free memory the kernel could give this process now (``MemAvailable`` of
    ``/proc/meminfo``, Linux); elsewhere the machine's physical memory (an upper bound;
    macOS), None where neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, OSError, ValueError):
        return None


def saved_bytes_per_example(
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
) -> float:
    """Bytes autograd keeps per example for one forward pass of ``loss_of(inputs, targets)``.

    Counted with ``torch.autograd.graph.saved_tensors_hooks`` (each storage once) on
    the first 2 and the first 4 examples; the difference over 2 leaves out what does
    not grow with the batch: the weights, and the inputs (views of data already in
    memory). Here the residual's 3 float32 values per example are what the square saves:

    >>> w = torch.ones(3, 5, requires_grad=True)
    >>> x, y = torch.ones(8, 5), torch.zeros(8, 3)
    >>> saved_bytes_per_example(lambda a, b: ((a @ w.T - b) ** 2).mean(), x, y)
    12.0
    """

    def saved(count: int) -> int:
        storages: dict[tuple[int, int], int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[(storage.data_ptr(), storage.nbytes())] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.enable_grad():
            loss_of(inputs[:count], targets[:count])
        return sum(storages.values())

    return max(0.0, (saved(4) - saved(2)) / 2)
