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
        # tqdm's monitor thread redraws a stalled bar every maxinterval (10 s) whatever the
        # mininterval: in a log that tripled the frames
        maxinterval=10.0 if interactive() else LOG_INTERVAL_S,
    )


def resumable_updates(bar: Any, resumed: str = "(resumed)") -> Any:
    """An ``update`` for work that resumes: its first call (the units a resumed run already
    has) moves the bar there without counting them in the rate and the time left, and adds
    ``resumed`` to the bar's description when there were any; later calls add as
    ``bar.update`` does.

    >>> import io
    >>> from tqdm import tqdm
    >>> bar = tqdm(total=10, desc="grid", file=io.StringIO())
    >>> update = resumable_updates(bar)
    >>> update(4); update(1); bar.n, bar.initial, bar.desc
    (5, 4, 'grid (resumed)')
    """
    first = [True]

    def update(count: int) -> None:
        if first[0]:
            first[0] = False
            if count and not bar.disable:  # said only once the earlier file was accepted
                bar.set_description_str(f"{bar.desc} {resumed}".strip(), refresh=False)
            bar.initial = bar.n = bar.last_print_n = bar.n + count
            bar.refresh()
        else:
            bar.update(count)

    return update
