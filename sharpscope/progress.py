"""The progress bar of long work: tqdm on stderr, gone when done.

On a terminal or in Jupyter it redraws up to ten times a second. Elsewhere (a Slurm or
``nohup`` log, a pipe) every redraw is another line of ``\\r`` frames in the log, so it
redraws at most every :data:`LOG_INTERVAL_S` seconds there: the log still shows that the
work moves, without thousands of frames.
"""

from __future__ import annotations

import sys
from typing import Any

#: Seconds between redraws when stderr is not a terminal.
LOG_INTERVAL_S = 30.0


def interactive() -> bool:
    """Whether stderr is a terminal, or this is a Jupyter kernel (tqdm draws a widget)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def progress_bar(
    total: int | None, unit: str, desc: str, *, initial: int = 0, enabled: bool = True
) -> Any:
    """A tqdm bar on stderr that is gone when done (``leave=False``)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit=unit,
        desc=desc,
        disable=not enabled,
        leave=False,
        dynamic_ncols=True,
        mininterval=0.1 if interactive() else LOG_INTERVAL_S,
    )
