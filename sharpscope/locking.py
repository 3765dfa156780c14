"""Advisory locks on output folders, so that two commands never write into one at once.

``flock`` locks belong to an open file: the kernel frees them when the holder exits, even
when it is killed, so a stale lock never blocks a rerun. Where ``fcntl`` does not exist
(not POSIX), or the file system takes no ``flock``, nothing is locked.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import SharpscopeError

#: errno of a lock that another process holds; any other error means no locking here
HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


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
