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


def model_failure(exc: BaseException) -> SharpscopeError:
    """The one-line error for a model or loss that raised on the user's data.

    >>> str(model_failure(RuntimeError("shapes (2, 3) and (4,) do not match")))
    'the model or loss failed on the data: RuntimeError: shapes (2, 3) and (4,) do not match'
    """
    first = str(exc).splitlines()[0] if str(exc) else ""
    return SharpscopeError(f"the model or loss failed on the data: {type(exc).__name__}: {first}")
