"""Locks on output folders (sharpscope/locking.py)."""

from __future__ import annotations

import os

from sharpscope import locking
from sharpscope.locking import is_locked, transient_lock


def test_a_transient_lock_file_is_removed_and_one_removed_under_an_opener_is_not_locked(
    tmp_path, monkeypatch
):
    """Session 28 (B2): `landscape` holds OUT/landscape.lock and removes it when it ends. A
    process that opened the file just before its holder removed it would lock a file without
    a name, beside a third process that locks a new one: it opens the named one again."""
    path = tmp_path / "landscape.lock"
    with transient_lock(path, "busy"):
        assert is_locked(path)
    assert not path.exists()

    opened = []
    real_open = locking._open

    def holder_finishes_as_it_opens(where):
        fd = real_open(where)
        if not opened:
            os.unlink(where)  # the holder removes the file, then lets go
        opened.append(fd)
        return fd

    monkeypatch.setattr(locking, "_open", holder_finishes_as_it_opens)
    with transient_lock(path, "busy"):
        assert len(opened) == 2 and path.exists() and is_locked(path)
        named = os.stat(path)
        assert (named.st_dev, named.st_ino) == (
            os.fstat(opened[1]).st_dev,
            os.fstat(opened[1]).st_ino,
        )
    assert not path.exists()
