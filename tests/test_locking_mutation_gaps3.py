"""Gaps found by a mutation audit of ``sharpscope/locking.py`` (session 25): brief_lock
waits for a holder that lets go, gives up after its wait, and frees its lock; is_locked
of a path that does not exist is False and creates nothing."""

from __future__ import annotations

import fcntl
import threading
import time

from sharpscope.locking import brief_lock, exclusive_lock, is_locked


def _hold(path, seconds: float, ready: threading.Event) -> None:
    """Hold an exclusive flock on ``path`` (another open file) for ``seconds``."""
    with open(path, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        ready.set()
        time.sleep(seconds)


def _held_by_another_thread(path, seconds: float) -> threading.Thread:
    """A thread that holds ``path``'s lock for ``seconds``, started and holding it."""
    ready = threading.Event()
    holder = threading.Thread(target=_hold, args=(path, seconds, ready))
    holder.start()
    ready.wait(5)
    return holder


# L4 locking.py brief_lock: `if exc.errno not in HELD or time.monotonic() >= deadline`
#    -> `if True` (never waits: gives up at the first refusal)
# L5 locking.py brief_lock: default `wait: float = 2.0` -> `0.0`
def test_brief_lock_waits_for_a_holder_that_lets_go_within_two_seconds(tmp_path):
    lock = tmp_path / "cache.lock"
    holder = _held_by_another_thread(lock, 0.3)
    with brief_lock(lock) as held:  # the default wait: 2 s, the holder lets go after 0.3 s
        assert held is True  # (no timing bounds: a loaded machine delays either thread)
    holder.join()


def test_brief_lock_gives_up_after_its_wait_and_runs_unlocked(tmp_path):
    lock = tmp_path / "cache.lock"
    holder = _held_by_another_thread(lock, 1.5)
    started = time.monotonic()
    with brief_lock(lock, wait=0.4) as held:
        waited = time.monotonic() - started
        assert held is False
    holder.join()
    assert waited >= 0.4  # it waited its 0.4 s before it gave up


# L7 locking.py brief_lock: `finally: os.close(fd)` -> `pass` (the lock is never freed)
def test_brief_lock_frees_its_lock_when_the_block_ends(tmp_path):
    lock = tmp_path / "cache.lock"
    with brief_lock(lock, wait=0) as held:
        assert held is True
    with open(lock) as other:  # another open file: refused while the lock is held
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # raises BlockingIOError if held
    with exclusive_lock(lock, "busy"):
        pass


# L9 locking.py is_locked: a missing path `return False` -> `return True`
def test_is_locked_of_a_missing_path_is_false_and_creates_nothing(tmp_path):
    missing = tmp_path / "study.lock"
    assert is_locked(missing) is False
    assert not missing.exists()
    with exclusive_lock(missing, "busy"):  # created by the lock, held now
        assert is_locked(missing) is True
    assert is_locked(missing) is False
