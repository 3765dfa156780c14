"""The progress bar redraws often on a terminal and rarely in a log file."""

from __future__ import annotations

import io
import sys

from sharpscope.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_frame_every_thirty_seconds_a_terminal_ten_a_second(monkeypatch):
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with progress_bar(100, "step", "log") as bar:
        assert bar.mininterval == LOG_INTERVAL_S == 30.0
        # tqdm's monitor redrew a stalled bar every 10 s (maxinterval) regardless
        assert bar.maxinterval == LOG_INTERVAL_S
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with progress_bar(100, "step", "terminal", initial=5) as bar:
        assert bar.mininterval == 0.1 and bar.n == 5
