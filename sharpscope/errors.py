"""User-facing errors.

Anything the user can fix (a wrong name, a missing file, a bad value) raises
:class:`SharpscopeError` with one line that says what was wrong and what would be
right. The CLI prints that line to stderr and exits non-zero, without a traceback.
"""

from __future__ import annotations


class SharpscopeError(Exception):
    """An error caused by user input; its message is one complete line."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`SharpscopeError` with ``message`` unless ``condition`` holds.

    >>> check(1 + 1 == 2, "arithmetic is broken")
    """
    if not condition:
        raise SharpscopeError(message)
