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
from dataclasses import dataclass
from pathlib import Path
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
    """Free memory the kernel could give this process now: ``MemAvailable`` of
    ``/proc/meminfo`` (Linux), lowered to what the process's memory cgroup still allows
    (:func:`cgroup_memory`: a container's or a Slurm job's limit); elsewhere the
    machine's physical memory (an upper bound; macOS), None where neither can be read."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (AttributeError, OSError, ValueError):
            return None
    cgroup = cgroup_memory()
    bound = cgroup if cgroup is not None and cgroup.headroom < free else None
    _LAST_BOUND[0] = bound
    return free if bound is None else bound.headroom


@dataclass(frozen=True)
class CgroupMemory:
    """The tightest memory cgroup level of this process: its limit, and the bytes still
    free under it (limit − usage + the page cache the kernel reclaims before an OOM kill)."""

    limit: int
    headroom: int


# the cgroup level that set the last figure of available_memory_bytes (None: the machine)
_LAST_BOUND: list[CgroupMemory | None] = [None]


def free_memory_note(free: int | None, unit: str = "GiB") -> str:
    """Words to put after a free-memory figure from :func:`available_memory_bytes` when the
    memory cgroup, not the machine, set it (the cgroup is not read again: the figure and
    the note agree); a researcher on Kubernetes or Slurm otherwise sees "0 GiB free" on an
    idle node. ``unit``: "GiB" or "GB", the caller's."""
    bound = _LAST_BOUND[0]
    if free is None or bound is None or bound.headroom != free:
        return ""
    limit = bound.limit / (2**30 if unit == "GiB" else 1e9)
    return f" under this process's memory cgroup limit of {limit:.3g} {unit}"


# limits at or above this are "no limit" (cgroup v1 writes 2**63 rounded down to a page)
_NO_LIMIT = 2**62


def _read_number(path: Path) -> int | None:
    """An integer file of the cgroup tree; None for "max" (v2: no limit) or when unreadable."""
    try:
        text = path.read_text().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat(path: Path) -> dict[str, int]:
    """The ``key value`` lines of a ``memory.stat`` file (empty when unreadable; a line that
    is not a number is skipped)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    values: dict[str, int] = {}
    for line in lines:
        name, _, value = line.partition(" ")
        try:
            values[name] = int(value)
        except ValueError:
            continue
    return values


def _level(limit: int | None, usage: int | None, reclaimable: int) -> CgroupMemory | None:
    if limit is None or limit >= _NO_LIMIT or usage is None:
        return None
    return CgroupMemory(limit, max(0, limit - max(0, usage - reclaimable)))


def _levels_up(own: Path, root: Path) -> list[Path]:
    """``own`` and its parents up to ``root``; ``[root]`` when ``own`` is not a folder
    inside it (a container sees its cgroup as the mount's root)."""
    try:
        own, root = own.resolve(), root.resolve()
    except OSError:
        return [root]
    if not own.is_dir() or (own != root and root not in own.parents):
        return [root]
    levels = [own]
    while levels[-1] != root:
        levels.append(levels[-1].parent)
    return levels


def cgroup_memory(
    proc_cgroup: str | Path = "/proc/self/cgroup", root: str | Path = "/sys/fs/cgroup"
) -> CgroupMemory | None:
    """The level of this process's memory cgroup (its own or an ancestor's) with the least
    room under its limit; None without a limit.

    ``MemAvailable`` counts the whole machine's free memory, but a process in a container,
    a Kubernetes pod or a Slurm job (``ConstrainRAMSpace``) is killed at its cgroup's
    limit. At each level: limit − (usage − page cache), the page cache (less shared memory,
    which cannot be dropped) being what the kernel reclaims before it kills. cgroup v2
    reads ``memory.max``, ``memory.current`` and ``memory.stat``; v1 reads
    ``memory.limit_in_bytes``, ``memory.usage_in_bytes`` and ``memory.stat`` (whose
    ``hierarchical_memory_limit`` also holds the limits of ancestors outside the mount).
    """
    root = Path(root)
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None
    found: list[CgroupMemory] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        relative = path.strip().lstrip("/")
        if controllers == "" and (root / "cgroup.controllers").exists():  # v2
            for folder in _levels_up(root / relative, root):
                stat = _stat(folder / "memory.stat")
                level = _level(
                    _read_number(folder / "memory.max"),
                    _read_number(folder / "memory.current"),
                    stat.get("file", 0) - stat.get("shmem", 0),
                )
                if level is not None:
                    found.append(level)
        elif "memory" in controllers.split(","):  # v1
            base = root / "memory"
            for index, folder in enumerate(_levels_up(base / relative, base)):
                stat = _stat(folder / "memory.stat")
                usage = _read_number(folder / "memory.usage_in_bytes")
                reclaimable = stat.get("total_cache", stat.get("cache", 0)) - stat.get(
                    "total_shmem", stat.get("shmem", 0)
                )
                limits = [_read_number(folder / "memory.limit_in_bytes")]
                if index == 0:  # limits of ancestors this process cannot see
                    limits.append(stat.get("hierarchical_memory_limit"))
                for limit in limits:
                    level = _level(limit, usage, reclaimable)
                    if level is not None:
                        found.append(level)
    return min(found, key=lambda level: level.headroom) if found else None


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
