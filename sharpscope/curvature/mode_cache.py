"""The HVP mode chosen for a configuration, remembered so that it is timed once.

``HessianOperator(hvp_mode="auto")`` times one product of each mode (forward-over-reverse
and reverse-over-reverse, each after a warm-up) and keeps the faster: four products, about
a quarter of a CPU top-5 on the benchmark's digits network, and 2-3 s for a ResNet-20 on an
H200, where PyTorch's reverse-over-reverse product of a convolution is slow. Both modes
compute the same products up to rounding; only the speed depends on the choice.

The choice is remembered in the process (keyed by the model's class, the parameter,
buffer and input shapes, dtype, device, loss, BatchNorm mode and folding) and on disk, in
``$SHARPSCOPE_CACHE/hvp_modes.json`` (default ``~/.cache/sharpscope``), under the same
description written as text plus the sharpscope and PyTorch versions, the device's name
and the CPU thread count (a model class is named by its module's file, which a
``file.py:function`` factory keeps from process to process). So a later ``sharpscope spectrum`` of a checkpoint of the same architecture
on the same machine, a study's analysis of every run's checkpoints, or a notebook kernel
restarted, does not time again. A loss given as a Python callable has no stable name, so
its choices stay in the process. A mode read from the file gets one untimed trial product,
as an explicit mode does; if it fails for this model (another model shared the key: a model
file edited since, a notebook class redefined), both modes are timed again, with a warning,
and the entry is replaced. In the process the key holds the class object itself, which a
redefinition or a re-import replaces, so a choice remembered there gets no trial. A remembered choice reports the timings and failures recorded when
it was made (``hvp_mode_cached`` says so). Processes that write at once take turns on
``hvp_modes.json.lock`` beside it, so none drops another's entry. The file is a cache: one that
cannot be placed, read or written is ignored, and deleting it (or
``SHARPSCOPE_HVP_MODE_CACHE=0``) makes every process time afresh; an explicit ``hvp_mode``
never reads it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..locking import brief_lock

#: What a choice records: the mode, the seconds each mode took, the modes that failed.
Choice = tuple[str, dict[str, float], dict[str, str]]

FILE_NAME = "hvp_modes.json"
ENV_SWITCH = "SHARPSCOPE_HVP_MODE_CACHE"
MEMORY_SIZE = 64  # choices kept in the process
DISK_SIZE = 256  # choices kept in the file (the oldest go first)

_memory: dict[tuple, Choice] = {}
_disk_allowed = True


def _disk_path() -> Path | None:
    """The cache file, or None when the disk cache is switched off or has no folder."""
    switch = os.environ.get(ENV_SWITCH, "1").strip().lower()
    if not _disk_allowed or switch in ("0", "off", "no", "false"):
        return None
    from ..data.sources import cache_dir

    try:
        return cache_dir() / FILE_NAME
    except RuntimeError:  # no home folder to put it in (HOME unset, no passwd entry)
        return None


def class_name(cls: type) -> str:
    """A class as the file's key names it, the same in every process: its module's file
    (a ``file.py:function`` factory's module gets a new name in each process) or its
    module's name, and its qualified name.

    >>> class_name(dict)
    'builtins:dict'
    """
    module = sys.modules.get(cls.__module__)
    where = getattr(module, "__file__", None) or cls.__module__
    return f"{where}:{cls.__qualname__}"


def device_name(device: Any) -> str:
    """The device as the file's key names it: the GPU's name, or the CPU's model.

    >>> device_name("cpu").startswith("cpu")
    True
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"{device.type} {_cpu_model()} ({os.cpu_count()} cores)"


@functools.cache
def _cpu_model() -> str:
    """The CPU's model name (read once per process: /proc/cpuinfo is long on big hosts)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            return next(
                (line.split(":", 1)[1].strip() for line in info if line.startswith("model name")),
                model,
            )
    except OSError:
        return model  # not Linux: the platform's own name


def disk_key(description: dict[str, Any]) -> str:
    """The file's key of a configuration: a hash of its description as sorted JSON.

    >>> disk_key({"a": 1, "b": [2, 3]}) == disk_key({"b": [2, 3], "a": 1})
    True
    """
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _read(path: Path) -> dict[str, Any]:
    from ..results import read_record  # ±1e308, how the file holds ±inf, read back as ±inf

    try:
        if not path.is_file():  # missing, or a FIFO or device that a read would wait on
            return {}
        entries = read_record(path)
    except (OSError, ValueError, RecursionError):
        return {}  # unreadable or damaged (too deeply nested, too): a cache starts empty
    return entries if isinstance(entries, dict) else {}


def _valid(entry: Any) -> Choice | None:
    """A stored choice, or None for an entry that is not one (an edited file)."""
    try:
        mode, seconds, errors = entry["mode"], entry["seconds"], entry["errors"]
        if mode not in ("forward", "reverse"):
            return None
        return (
            mode,
            {str(k): float(v) for k, v in seconds.items()},
            {str(k)[:20]: str(v)[:300] for k, v in errors.items()},  # as the operator keeps them
        )
    except (TypeError, KeyError, AttributeError, ValueError):
        return None


def lookup(key: tuple | None, on_disk: str | None) -> tuple[Choice, bool] | None:
    """The remembered choice for ``key`` (the process's) or ``on_disk`` (the file's), and
    whether it came from the file."""
    if key is not None and key in _memory:
        return _memory[key], False
    path = _disk_path() if on_disk is not None else None
    if path is None:
        return None
    choice = _valid(_read(path).get(on_disk))
    if choice is None:
        return None
    if key is not None:
        _keep(key, choice)
    return choice, True


def remember(
    key: tuple | None, on_disk: str | None, choice: Choice, description: dict | None = None
) -> None:
    """Keep ``choice`` in the process and, when ``on_disk`` is given, in the file."""
    if key is not None:
        _keep(key, choice)
    path = _disk_path() if on_disk is not None else None
    if path is None:
        return
    from ..results import write_json

    if path.exists() and not path.is_file():
        return  # a FIFO or device: writing would wait for a reader
    mode, seconds, errors = choice
    entry = {
        "mode": mode,
        "seconds": seconds,
        "errors": errors,
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "configuration": description or {},
    }
    # read, add, write under a lock, so that processes writing at once (a study's pool
    # workers) do not drop each other's entries; the write itself is atomic (a rename)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # for the lock file
    except OSError:
        pass  # write_json will fail too, and quietly: the cache is only slower
    with brief_lock(path.with_name(path.name + ".lock")):
        entries = _read(path)
        entries.pop(on_disk, None)
        entries[on_disk] = entry
        for stale in list(entries)[: max(0, len(entries) - DISK_SIZE)]:
            del entries[stale]
        try:
            write_json(path, entries, indent=1)  # strict JSON: a failed mode's inf as 1e308
        except Exception:  # noqa: BLE001 - a cache that cannot be written is only slower
            pass


def _keep(key: tuple, choice: Choice) -> None:
    if len(_memory) >= MEMORY_SIZE:
        _memory.pop(next(iter(_memory)))
    _memory[key] = choice


def clear_mode_cache() -> None:
    """Forget the HVP modes timed in this process (the file stays; delete
    ``$SHARPSCOPE_CACHE/hvp_modes.json`` to forget those too)."""
    _memory.clear()


@contextmanager
def without_disk_cache() -> Iterator[None]:
    """Neither read nor write the file inside the block (a benchmark's first-run timing)."""
    global _disk_allowed
    before, _disk_allowed = _disk_allowed, False
    try:
        yield
    finally:
        _disk_allowed = before
