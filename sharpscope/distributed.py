"""torch.distributed set-up for ``torchrun`` (one process per device).

``torchrun --nproc_per_node N sharpscope ...`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; :func:`init_from_env` turns them into an initialised process group
(NCCL on CUDA, gloo on CPU), destroyed again when the process exits. A single process
needs none of it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Rank, world size and the device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def pick_device(device: str | torch.device | None = "auto", local_rank: int = 0) -> torch.device:
    """The device named by ``device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``"auto"``: CUDA (this process's GPU) when present, else CPU. Other device types
    (``mps``, ``xla``, ``meta``, ...) are refused: the analyses and the training loop
    run on CPUs and CUDA GPUs only.

    Raises:
        SharpscopeError: an unknown device, CUDA asked for where there is none, or a GPU
            index beyond the GPUs present.

    >>> pick_device("cpu")
    device(type='cpu')
    """
    from .errors import SharpscopeError

    if device is None or str(device).strip().lower() == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    kind, index = check_device_name(device)
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SharpscopeError(
            f"device '{device}' requested but no CUDA GPU is available; use --device cpu (or "
            'auto; Python: device="cpu")'
        )
    count = torch.cuda.device_count()
    if index is not None and index >= count:
        raise SharpscopeError(
            f"device '{device}' does not exist: this machine has {count} CUDA "
            f"GPU{'s' if count != 1 else ''} "
            f"({'cuda:0' if count == 1 else f'cuda:0..cuda:{count - 1}'})"
        )
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def check_device_name(device: str | torch.device) -> tuple[str, int | None]:
    """``("cpu" | "cuda", index or None)`` of a device name, checking its form only (not
    that the device exists here: a study may run its jobs on other machines).

    Raises:
        SharpscopeError: a name other than auto, cpu, cuda or cuda:N.

    >>> check_device_name("cuda:1"), check_device_name("auto")
    (('cuda', 1), ('auto', None))
    """
    from .errors import SharpscopeError

    text = str(device).strip().lower()
    kind, sep, index_text = text.partition(":")
    if text == "auto":
        return "auto", None
    if kind not in ("cpu", "cuda") or (sep and not index_text.isdigit()):
        raise SharpscopeError(f"unknown device '{device}'; choose one of: {DEVICE_CHOICES}")
    if kind == "cpu" and sep and index_text != "0":
        raise SharpscopeError(f"unknown device '{device}'; the CPU is 'cpu'")
    return kind, int(index_text) if sep and kind == "cuda" else None


def is_multi_process() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def launched_as_main() -> bool:
    """Rank 0 of a torchrun launch, or a single process: known from ``RANK`` before (and
    after) the process group exists, e.g. when an interrupt arrives during start-up."""
    return os.environ.get("RANK", "0") == "0"


def init_from_env(device: str | torch.device | None = "auto") -> DistInfo:
    """Initialise the process group when launched by torchrun; else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    chosen = pick_device(device, local_rank)
    if world_size <= 1:
        return DistInfo(device=chosen)
    if not dist.is_initialized():
        backend = "nccl" if chosen.type == "cuda" else "gloo"
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        dist.init_process_group(backend=backend)
        atexit.register(shutdown)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, chosen)


def shutdown(synchronize: bool = False) -> None:
    """Destroy the process group, if any (registered at exit by :func:`init_from_env`: without
    it a rank can abort in the backend's teardown after its work is done).

    ``synchronize``: meet the other ranks at a barrier first, so that no rank tears its
    connections down while another still uses them (gloo ranks aborted in teardown in
    about 1 of 16 loaded runs without it); for a command that finished normally.
    """
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def leave_process_group(code: int = 0) -> None:
    """Under torchrun, end this rank's process after a command finished: meet the other
    ranks, destroy the process group and exit at once with ``code``, without the
    interpreter's teardown, in which a gloo rank could still abort ("terminate called
    without an active exception", exit -6 after all its work was written; about 1 in 16
    loaded runs, with or without the barrier). Every file is written and closed by then;
    the standard streams and logs are flushed here. A single process returns.
    """
    if not is_multi_process():
        return
    shutdown(synchronize=True)
    _exit_now(code)


def abandon_process_group(code: int) -> None:
    """Under torchrun, end this rank's process after a command failed or was stopped: exit
    at once with ``code``, without a barrier (the other ranks may be gone) and without the
    interpreter's teardown, in which gloo could abort ("terminate called without an active
    exception" after sharpscope's line). The command's files are written and closed by
    then (atomically); the streams and logs are flushed here. A single process returns."""
    if is_multi_process():
        _exit_now(code)


def _exit_now(code: int) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


class PeerLost(KeyboardInterrupt):
    """Another process of this torchrun job stopped (killed, out of memory, its own error)
    while this one waited for it in a collective. Raised in place of the backend's error,
    as an interrupt, so that a command keeps and names its finished work as on Ctrl-C."""


# what gloo and NCCL say when the other end of a collective went away
_LOST_PEER_SIGNS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Broken pipe",
    "Connection refused",
    "gloo/transport",
    "NCCL communicator was aborted",
    "Timed out waiting",
)


def lost_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is the backend's error for a collective whose other processes are
    gone (only with a process group of two or more)."""
    if not isinstance(exc, RuntimeError) or not (dist.is_available() and dist.is_initialized()):
        return False
    if dist.get_world_size() < 2:
        return False
    backend_error = getattr(dist, "DistBackendError", ())
    return isinstance(exc, backend_error) or any(s in str(exc) for s in _LOST_PEER_SIGNS)


@contextlib.contextmanager
def peers_checked() -> Iterator[None]:
    """Turn the backend's error for a lost process into :class:`PeerLost`; wrap the code
    that runs collectives."""
    try:
        yield
    except RuntimeError as exc:
        if not lost_peer(exc):
            raise
        raise peer_lost(exc) from exc


def peer_lost(exc: RuntimeError) -> PeerLost:
    """The :class:`PeerLost` for a backend error that :func:`lost_peer` recognised."""
    sign = next((s for s in _LOST_PEER_SIGNS if s in str(exc)), type(exc).__name__)
    return PeerLost(f"another process of this torchrun job stopped ({dist.get_backend()}: {sign})")


def reduce_each_gradient(state, bucket):
    """DDP communication hook: average each parameter's gradient over the ranks with an
    all-reduce of its own, instead of one all-reduce per bucket.

    DDP lays its buckets out anew after the first step (in the order the gradients became
    ready), so a run resumed from a checkpoint, whose new DDP takes its first step on the
    initial layout, sums in another order than the run that went on. With three or more
    ranks the ring all-reduce's summation order depends on where an element sits in the
    reduced tensor, and the two runs drifted apart by rounding (1e-8 after one epoch). Per
    tensor, every element's order depends on its own parameter's size alone.
    Register with ``ddp.register_comm_hook(None, reduce_each_gradient)``; the cost is one
    collective per parameter tensor instead of per bucket. (Not annotated: DDP accepts
    only the real ``dist.GradBucket`` there, and this module's annotations are strings.)
    """
    buffer = bucket.buffer()
    gradients = bucket.gradients()
    world = dist.get_world_size()
    base = buffer.untyped_storage().data_ptr()
    if any(g.untyped_storage().data_ptr() != base for g in gradients):
        # not views into the bucket (never seen): reduce the bucket as DDP would
        work = dist.all_reduce(buffer, async_op=True)
        return work.get_future().then(lambda _: buffer.div_(world))
    works = [dist.all_reduce(g, async_op=True) for g in gradients]
    return torch.futures.collect_all([w.get_future() for w in works]).then(
        lambda _: buffer.div_(world)
    )


def gather_to_main(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (plain objects, tensors moved to the CPU) on rank 0, in rank
    order; ``None`` on the other ranks. A collective: all ranks must call it."""
    value = _to_cpu(value)
    if not is_multi_process():
        return [value]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    with peers_checked():
        dist.gather_object(value, out, dst=0)
    return out


def check_same_data(inputs: torch.Tensor, targets: torch.Tensor, what: str) -> None:
    """Refuse data that differ between the processes of a torchrun job: each rank takes
    its share of the examples, so different data would train on (or analyse) a mixture
    without a word. A data factory that draws unseeded random data does this. A
    collective (all ranks call it); nothing in a single process."""
    if not is_multi_process():
        return
    from .data.fingerprint import data_digest

    mine = data_digest(inputs, targets)
    every: list[Any] = [None] * dist.get_world_size()
    with peers_checked():
        dist.all_gather_object(every, mine)
    other = next((rank for rank, seen in enumerate(every) if seen != every[0]), None)
    if other is not None:
        from .errors import SharpscopeError

        raise SharpscopeError(
            f"the {what} differ between the torchrun processes (rank {other}'s are not rank "
            "0's): every process must read the same data; a data factory that draws random "
            "data must seed it (e.g. torch.Generator().manual_seed(0))"
        )


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def current() -> DistInfo:
    """Rank and world size of an already initialised group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
        )
    return DistInfo()


def group_rank_and_size(distributed: bool = False) -> tuple[int, int]:
    """(rank, world size) of the work split for an analysis.

    ``distributed``: False (the default) stays a single process, even inside an
    initialised group (an analysis called on rank 0 only must not wait for the others);
    True splits the work over the initialised group, which every rank then joins.
    """
    if not distributed:
        return 0, 1
    if not (dist.is_available() and dist.is_initialized()):
        from .errors import SharpscopeError

        raise SharpscopeError(
            "distributed=True needs an initialised torch.distributed process group; run "
            "under torchrun and call torch.distributed.init_process_group first"
        )
    return dist.get_rank(), dist.get_world_size()


def share(count: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``count`` items split over ``world`` ranks, as
    even as possible (the first ``count % world`` ranks take one more).

    >>> [share(5, r, 3) for r in range(3)]
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def barrier() -> None:
    """A barrier when distributed; nothing otherwise."""
    if is_multi_process():
        dist.barrier()
