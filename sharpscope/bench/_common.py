"""Shared machinery for ``sharpscope bench``: rows, interleaved timing, output.

Speed is always reported as a ratio against a reference run in the same process,
on the same model and data, with the candidates' repeats interleaved so that a
slow moment of the machine hits both equally; the median of the repeats is used.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SharpscopeError
from ..results import to_jsonable, write_json


def bench_devices(device: str = "auto") -> list[str]:
    """Devices a benchmark runs its rows on (``sharpscope bench NAME --device D``).

    ``auto``: the CPU, then CUDA when it is available; ``cpu`` or ``cuda``: that one only.

    >>> bench_devices("cpu")
    ['cpu']
    >>> bench_devices("auto")[0]
    'cpu'
    """
    if device == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if device not in ("cpu", "cuda"):
        raise SharpscopeError(f"--device must be auto, cpu or cuda, not '{device}'")
    if device == "cuda" and not torch.cuda.is_available():
        raise SharpscopeError("--device cuda: CUDA is not available on this machine")
    return [device]


def progress_note(message: str) -> None:
    """One line on stderr while a long benchmark runs, so a cut-off run shows how far it got."""
    print(f"  {message}", file=sys.stderr, flush=True)


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn``, followed by a CUDA synchronization when ``device`` is a GPU.

    Kernels run asynchronously, so a wall-clock timing of ``fn`` on a GPU must wait for
    them; on the CPU ``fn`` is returned unchanged.
    """
    if not str(device).startswith("cuda"):
        return fn

    def fn_synced() -> Any:
        out = fn()
        torch.cuda.synchronize()
        return out

    return fn_synced


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op threads, restoring the previous number.

    One thread on a shared CPU gives stable timings (recorded in each row).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


#: Whether a row meets its target, and the target: a ratio to stay under or a speedup to reach.
TARGET_KEYS = ("meets_target", "target_ratio", "target_speedup")


@dataclass
class BenchRow:
    """One benchmark comparison: ``variant`` against ``reference`` on ``case``.

    ``extra`` always holds the target keys (:data:`TARGET_KEYS`), None in a row without a
    target, so that a script can read ``row["extra"]["meets_target"]`` from every row.

    >>> BenchRow("case", "ours", 1.0, "theirs", 2.0, 0.5).extra
    {'meets_target': None, 'target_ratio': None, 'target_speedup': None}
    """

    case: str
    variant: str
    seconds: float
    reference: str
    reference_seconds: float
    ratio: float
    accuracy_measure: str = ""
    accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.extra = {**dict.fromkeys(TARGET_KEYS), **self.extra}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON dict of the row."""
        return to_jsonable(asdict(self))


def interleaved_median(
    fns: dict[str, Callable[[], Any]], repeats: int = 7, warmup: int = 1
) -> dict[str, float]:
    """Median wall time of each callable, with the repeats of all callables interleaved.

    Args:
        fns: name -> zero-argument callable to time.
        repeats: timed calls of each callable.
        warmup: untimed calls of each callable first.

    >>> t = interleaved_median({"a": lambda: None, "b": lambda: None}, repeats=3)
    >>> sorted(t) == ["a", "b"] and all(v >= 0 for v in t.values())
    True
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: statistics.median(values) for name, values in times.items()}


#: called with all of a benchmark's rows so far, after each new row (``run(on_rows=...)``)
OnRows = Callable[[list["BenchRow"]], None]


class RowLog(list):
    """A benchmark's rows, handed (all so far) to ``on_rows`` after each addition.

    ``sharpscope bench --json`` writes them as they come, so a run stopped part-way (a
    GPU lease that ends, Ctrl-C) keeps the rows it had measured.

    >>> seen = []
    >>> rows = RowLog(lambda rows: seen.append(len(rows)))
    >>> rows += ["a", "b"]
    >>> rows.append("c")
    >>> seen
    [2, 3]
    """

    def __init__(self, on_rows: OnRows | None = None) -> None:
        super().__init__()
        self._on_rows = on_rows

    def append(self, row: BenchRow) -> None:
        super().append(row)
        self._added()

    def extend(self, rows: Iterable[BenchRow]) -> None:
        super().extend(rows)
        self._added()

    def __iadd__(self, rows: Iterable[BenchRow]) -> RowLog:  # type: ignore[override]
        self.extend(rows)
        return self

    def _added(self) -> None:
        if self._on_rows is not None:
            self._on_rows(list(self))


def write_rows(rows: list[BenchRow], path: str | Path) -> Path:
    """Write rows as a JSON list (interface.md: ``bench ... --json``)."""
    path = Path(path)
    write_json(path, [r.to_dict() for r in rows])
    return path


def _target_text(extra: dict[str, Any]) -> str:
    """The row's target and whether it is met, e.g. ``≤ 2.2: met`` or ``speedup ≥ 3: NOT met``.

    >>> _target_text({"target_speedup": 3.0, "meets_target": False})
    'speedup ≥ 3: NOT met'
    >>> _target_text({})
    ''
    >>> _target_text({"target_ratio": 0.25, "meets_target": None, "quick": True})
    '≤ 0.25: not judged (quick)'
    """
    met = extra.get("meets_target")
    if extra.get("target_speedup") is not None:
        text = f"speedup ≥ {extra['target_speedup']:g}"
    elif extra.get("target_ratio") is not None:
        text = f"≤ {extra['target_ratio']:g}"
    else:
        return ""
    if extra.get("quick"):
        return f"{text}: not judged (quick)"
    return text if met is None else f"{text}: {'met' if met else 'NOT met'}"


def mark_quick(rows: list[BenchRow], quick: bool) -> list[BenchRow]:
    """Record in each row whether it comes from a ``--quick`` run (``extra.quick``); a
    quick row's target is not judged (``meets_target`` None): its cases are too small.

    >>> mark_quick([BenchRow("c", "v", 1.0, "r", 2.0, 0.5, extra={"meets_target": True})],
    ...            True)[0].extra["meets_target"] is None
    True
    """
    for row in rows:
        row.extra["quick"] = quick
        if quick:
            row.extra["meets_target"] = None
    return rows


def _accuracy_text(row: BenchRow) -> str:
    """The row's accuracy, and the reference's where the row records it.

    >>> _accuracy_text(BenchRow("c", "v", 1.0, "r", 2.0, 0.5, "err", 1e-6,
    ...     extra={"reference_accuracy": 5e-3, "reference_accuracy_measure": "ref err"}))
    'err=1e-06; ref err=0.005'
    >>> _accuracy_text(BenchRow("c", "v", 1.0, "r", 2.0, 0.5))
    ''
    """
    parts = [] if row.accuracy is None else [f"{row.accuracy_measure}={row.accuracy:.3g}"]
    reference = row.extra.get("reference_accuracy")
    if reference is not None:
        label = row.extra.get("reference_accuracy_measure", "reference")
        parts.append(f"{label}={reference:.3g}")
    return "; ".join(parts)


def print_rows(rows: list[BenchRow], title: str = "benchmark") -> None:
    """Print rows as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=title,
        caption="ratio = seconds / ref seconds (below 1: faster than the reference); "
        "target: the ratio it must stay under (≤) or the speedup 1/ratio it must reach (≥)",
    )
    columns = (
        "case",
        "variant",
        "seconds",
        "reference",
        "ref seconds",
        "ratio",
        "target",
        "accuracy",
    )
    for column in columns:
        table.add_column(column, justify="right" if column not in ("case", "variant") else "left")
    for r in rows:
        accuracy = _accuracy_text(r)
        table.add_row(
            r.case,
            r.variant,
            f"{r.seconds:.4g}",
            r.reference,
            f"{r.reference_seconds:.4g}",
            f"{r.ratio:.3g}",
            _target_text(r.extra),
            accuracy,
        )
    # never squeeze the table into 80 columns when the output is a file or a pipe
    Console(width=None if sys.stdout.isatty() else 160).print(table)
