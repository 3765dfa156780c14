"""Training curves from ``metrics.jsonl``: accuracy and loss per epoch, LETS' learned ρ.

``train`` writes one ``"kind": "eval"`` object per epoch (train/test loss and
accuracy, ...) and, for optimizers with per-step state, one ``"kind": "step"`` object
per step (LETS: key ``"rho"``). These functions read those files and plot them; they
never touch a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SharpscopeError
from ..results import eval_rows, read_metrics_rows
from .style import (
    LINE_STYLES,
    MARKERS,
    figure_legend,
    new_figure,
    optimizer_color,
    optimizer_label,
    styled,
)

History = Sequence[Mapping[str, Any]]
#: what every eval row of ``train`` holds (a run may log more, e.g. ``test_ece``)
EVAL_METRICS = ("train_loss", "train_acc", "test_loss", "test_acc")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a ``metrics.jsonl`` (or of ``RUN/metrics.jsonl``); a cut-off last
    line (a run killed or still writing) is dropped, as ``train --resume`` does.

    Raises:
        SharpscopeError: missing file or a line before the last that is not JSON.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise SharpscopeError(f"metrics file not found: {path}")
    return read_metrics_rows(path)


def step_rows(history: History, key: str = "rho") -> list[Mapping[str, Any]]:
    """The per-step rows that carry ``key``."""
    return [r for r in history if r.get("kind") == "step" and key in r]


def _as_history(source: History | str | Path) -> list[Mapping[str, Any]]:
    if isinstance(source, (str, Path)):
        return read_metrics(source)
    return list(source)


@styled
def plot_training_curves(
    runs: Mapping[str, History | str | Path],
    *,
    metrics: Sequence[str] = ("test_acc", "train_loss"),
    columns: int = 2,
    axes: Any = None,
):
    """Per-epoch curves of several runs, one panel per metric.

    Args:
        runs: label -> history (list of rows), ``metrics.jsonl`` path or run folder.
            Labels starting with an optimizer name (``"sam-rho0.1"``) take its colour.
        metrics: keys of the eval rows; ``*_acc`` are drawn as error in percent.
        columns: 1 or 2 (figure width).
        axes: existing axes, one per metric (then no new figure is made).

    Returns:
        The matplotlib Figure.

    Raises:
        SharpscopeError: a metric that ``train`` does not log and no eval row has.
    """
    from matplotlib.ticker import MaxNLocator

    histories = {label: eval_rows(_as_history(source)) for label, source in runs.items()}
    logged = {k for rows in histories.values() for r in rows for k, v in r.items() if v is not None}
    known = [*EVAL_METRICS, *sorted(logged - {"kind", "epoch", "step", *EVAL_METRICS})]
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise SharpscopeError(f"unknown metric '{unknown[0]}'; choose from {', '.join(known)}")
    own_figure = axes is None
    if own_figure:
        fig, axes = new_figure(columns, aspect=0.7, ncols=len(metrics))
    axes = [ax for ax in np.ravel(np.asarray(axes, dtype=object)) if ax is not None]
    if len(axes) < len(metrics):
        raise SharpscopeError(f"{len(metrics)} metrics need {len(metrics)} axes; got {len(axes)}")
    fig = axes[0].figure
    colors = [optimizer_color(str(label), index) for index, label in enumerate(runs)]
    used: dict[str, int] = {}
    for (label, rows), color in zip(histories.items(), colors):
        # runs of one optimizer share its colour: each gets its own dashes, then markers too
        k = used[color] = used.get(color, -1) + 1
        many = colors.count(color) > len(LINE_STYLES)
        for ax, metric in zip(axes, metrics):
            points = [(r["epoch"], r[metric]) for r in rows if r.get(metric) is not None]
            if not points:
                continue
            epochs, values = zip(*points)
            if metric.endswith("_acc"):
                values = [100.0 * (1.0 - v) for v in values]
            ax.plot(
                epochs,
                values,
                color=color,
                linestyle=LINE_STYLES[k % len(LINE_STYLES)],
                label=optimizer_label(str(label)),
                marker=MARKERS[k // len(LINE_STYLES) % len(MARKERS)]
                if many or len(points) < 15
                else None,
                markevery=max(1, len(points) // 10),
            )
    for ax, metric in zip(axes, metrics):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no epoch 1.5
        ax.set_ylabel(_metric_label(metric))
    if own_figure and len(axes) > 1:
        figure_legend(fig, axes)  # above the panels: curves cross every corner of a panel
    else:
        drawn = [ax for ax in axes if ax.lines]
        if drawn:
            drawn[-1].legend()
    return fig


def _metric_label(metric: str) -> str:
    split, _, kind = metric.partition("_")
    if kind == "acc":
        return f"{split} error (%)"
    if kind == "loss":
        return f"{split} loss (cross-entropy)"
    return metric.replace("_", " ")


@styled
def plot_learned_rho(
    runs: Mapping[str, History | str | Path],
    *,
    key: str = "rho",
    columns: int = 1,
    ax: Any = None,
):
    """LETS' learned ρ over optimizer steps (``"kind": "step"`` rows of ``metrics.jsonl``);
    a ρ that moved by less than a millionth of itself is drawn as its change, ρ − ρ0.

    Args:
        runs: label -> history, ``metrics.jsonl`` path or run folder.
        key: the step-row key to plot (``"rho"``).
        columns: 1 or 2.
        ax: an existing axis.

    Returns:
        The Figure.

    Raises:
        SharpscopeError: when no run logged ``key`` per step.
    """
    if ax is None:
        fig, ax = new_figure(columns, aspect=0.7)
    else:
        fig = ax.figure
    series = []
    for index, (label, source) in enumerate(runs.items()):
        rows = step_rows(_as_history(source), key)
        if rows:
            values = np.array([r[key] for r in rows], dtype=float)
            series.append((index, str(label), [r["step"] for r in rows], values))
    if not series:
        raise SharpscopeError(
            f"no per-step '{key}' rows in these runs; LETS logs them to metrics.jsonl"
        )
    every = np.concatenate([values for *_, values in series])
    every = every[np.isfinite(every)]
    # ρ that barely moved read "0.05000000006" on every tick: plot its change from a
    # round ρ0 (named in the label) instead
    reference = 0.0
    if every.size and np.ptp(every) < 1e-6 * np.abs(every).max():
        reference = float(f"{every[0]:.6g}")
    for drawn, (index, label, steps, values) in enumerate(series):
        name = label.split("-")[0]
        ax.plot(
            steps,
            values - reference,
            color=optimizer_color(name, index),
            linestyle=LINE_STYLES[drawn % len(LINE_STYLES)],
            label=optimizer_label(name) if name == label else label,
        )
    ax.ticklabel_format(axis="y", useOffset=False)
    quantity = r"learned $\rho$" if key == "rho" else key
    ax.set_ylabel(f"{quantity} $-$ {reference:g}" if reference else quantity)
    ax.set_xlabel("optimizer step")
    ax.legend()
    return fig
