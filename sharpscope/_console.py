"""The ``sharpscope`` console script and ``python -m sharpscope``: a Ctrl-C from the first
moment is one line.

Importing the command line (typer, torch and the commands) takes seconds on a loaded
machine (4.6 s on two busy cores); a Ctrl-C then printed the imports' traceback and the
process died by SIGINT. This module imports nothing heavy: it answers a SIGINT during
those imports with ``error: interrupted`` and exit code 130, as a command does, then puts
the previous handler back; the commands' own handling (``guarded``) takes over from there.
Nothing has been read or written at that point, so nothing is lost.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    """End at once, in one line (rank 0's, under torchrun), with the shell's code 130."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C adds nothing
    if os.environ.get("RANK", "0") == "0":
        os.write(2, b"error: interrupted\n")
    os._exit(128 + signal.SIGINT)  # half-imported modules have nothing to clean up


def main() -> None:
    """Console entry point: :func:`sharpscope.cli.main`, its import guarded."""
    # a SIGINT ignored from the start (a background job's) stays ignored
    watched = threading.current_thread() is threading.main_thread() and signal.getsignal(
        signal.SIGINT
    ) not in (signal.SIG_IGN, None)
    previous = signal.signal(signal.SIGINT, _interrupted_while_starting) if watched else None
    try:
        from .cli import main as cli_main
    finally:
        if watched:
            signal.signal(signal.SIGINT, previous)
    cli_main()
