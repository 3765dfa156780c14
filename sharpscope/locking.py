"""Advisory locks on output folders, so that two commands never write into one at once.

``flock`` locks belong to an open file: the kernel frees them when the holder exits, even
when it is killed, so a stale lock never blocks a rerun. Where ``fcntl`` does not exist
(not POSIX), or the file system takes no ``flock``, nothing is locked.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from .distributed import init_from_env, is_multi_process, launched_as_main, peers_checked
from .errors import SharpscopeError, first_line

#: errno of a lock that another process holds; any other error means no locking here
HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def make_folder(out: Path) -> Callable[[], None]:
    """Create ``out`` and the parents it needs; return what removes those of them that are
    still empty (the deepest first; a parent another run has used since stays)."""
    made = list(itertools.takewhile(lambda folder: not folder.exists(), (out, *out.parents)))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SharpscopeError(
            f"cannot create the output folder {out}: {exc.strerror or exc}"
        ) from exc

    def remove_if_empty() -> None:
        for folder in made:
            try:
                folder.rmdir()  # only an empty one
            except OSError:
                return

    return remove_if_empty


def _open(path: Path) -> int:
    """A descriptor to lock: a folder itself, or a lock file (created if missing)."""
    if path.is_dir():
        return os.open(path, os.O_RDONLY)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


@contextlib.contextmanager
def exclusive_lock(path: str | Path, busy: str) -> Iterator[int]:
    """Hold an exclusive lock on ``path`` (a folder, or a lock file) while the block runs.

    Yields the locked descriptor (a lock file's holder may write its PID there).

    Raises:
        SharpscopeError: ``busy``, when another process holds the lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no locking
        yield -1
        return
    fd = _open(Path(path))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in HELD:
                raise SharpscopeError(busy) from exc
            # a file system without flock (NFS on a folder opened read-only, Lustre
            # without -o flock): nothing is locked there, as where fcntl is missing
        yield fd
    finally:
        os.close(fd)


def _still_named(fd: int, path: Path) -> bool:
    """Whether the file open at ``fd`` is still the one ``path`` names (not removed or
    replaced since it was opened)."""
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


@contextlib.contextmanager
def transient_lock(path: str | Path, busy: str) -> Iterator[int]:
    """:func:`exclusive_lock` on the lock file ``path``, which is removed again when the
    block ends (by its holder, before the lock is freed), so that no file stays behind.
    Yields the locked descriptor, as :func:`exclusive_lock` does.

    A process that opened the file just before its holder removed it would lock a file
    that no longer has a name, beside a third process that locks a new one: it notices
    and tries again on the file ``path`` names.

    Raises:
        SharpscopeError: ``busy``, when another process holds the lock.
    """
    path = Path(path)
    while True:
        with exclusive_lock(path, busy) as fd:
            if fd >= 0 and not _still_named(fd, path):
                continue  # the holder removed it as this process opened it
            try:
                yield fd
            finally:
                path.unlink(missing_ok=True)
            return


@contextlib.contextmanager
def locked_on_main(
    out: Path, take: Callable[[Path, contextlib.ExitStack], None], device: str = "auto"
) -> Iterator[None]:
    """Run ``take(out, held)`` on the main process, which locks ``out`` (with
    :func:`exclusive_lock`) until ``held`` closes when the block ends, raising
    :class:`SharpscopeError` when another process holds it.

    Under torchrun the processes form their group first and rank 0 shares the outcome, so
    that a refusal stops every rank at once (the others had waited for rank 0 in the
    group's start-up until torchrun killed them, 30 s later); any other error of rank 0's
    is raised there as it was and named on the other ranks.
    """
    info = init_from_env(device)  # forms torchrun's group; the command asks for the same
    group = is_multi_process()  # torchrun's, or one the caller formed
    main = torch.distributed.get_rank() == 0 if group else launched_as_main()
    with contextlib.ExitStack() as held:
        refusal, failure = None, None
        if main:
            try:
                take(out, held)
            except SharpscopeError as exc:
                refusal = str(exc)
            except Exception as exc:  # noqa: BLE001 - shared too, then raised as it was
                failure = exc
                refusal = f"rank 0 could not take {out}: {first_line(exc) or type(exc).__name__}"
        if group:
            shared = [refusal]
            nccl = torch.distributed.get_backend() == "nccl"
            with peers_checked():  # on the device the run uses (NCCL sends from a GPU)
                torch.distributed.broadcast_object_list(
                    shared, src=0, device=info.device if nccl else None
                )
            refusal = shared[0]
        if failure is not None:
            raise failure
        if refusal is not None:
            raise SharpscopeError(refusal)
        yield


@contextlib.contextmanager
def brief_lock(path: str | Path, wait: float = 2.0) -> Iterator[bool]:
    """Hold an exclusive lock on the lock file ``path`` for a short read-modify-write,
    waiting up to ``wait`` seconds for another holder; yields whether it is held.

    For a cache, where a lost update only costs time: a lock that cannot be had in time
    (a holder stopped with Ctrl-Z) or at all (no ``fcntl``, no ``flock``, an unwritable
    folder) lets the block run unlocked rather than wait or fail.
    """
    try:
        import fcntl

        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield False
        return
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except OSError as exc:
                if exc.errno not in HELD or time.monotonic() >= deadline:
                    held = False
                    break
                time.sleep(0.005)
        yield held
    finally:
        os.close(fd)


def is_locked(path: str | Path) -> bool:
    """Whether another process holds :func:`exclusive_lock` on ``path`` now (False when
    ``path`` does not exist, or where locks do not exist)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    path = Path(path)
    if not path.exists():
        return False
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in HELD
    finally:
        os.close(fd)  # closing frees a shared lock taken here
    return False
