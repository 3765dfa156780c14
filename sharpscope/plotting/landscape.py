"""Figures of loss-landscape slices: 1-D curves, 2-D contours with labelled levels,
3-D surfaces (Li et al., 2018). Each takes a
:class:`~sharpscope.analysis.landscape.LandscapeResult` and returns a Figure; nothing
here touches a model.

Every figure states what it shows (analysis.md §8): the kind of directions, their
normalization, the data, the mode (eval, BatchNorm running statistics) and the dtype.
Points not yet computed (NaN) are left blank.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SharpscopeError
from ..results import to_numpy
from .style import PALETTE, new_figure, save_figure, styled, wrap_parts

METRICS = ("loss", "accuracy")
KINDS = ("auto", "curve", "contour", "surface")


def describe(result: Any) -> str:
    """One line naming directions, normalization, data, mode and dtype of a landscape."""
    meta = result.meta
    data = meta.data or {}
    data_name = data.get("name") or data.get("factory") or "data"
    split = data.get("split")
    parts = [result.direction_kind]
    kind, two_d = result.direction_kind, len(result.axes) == 2
    if kind == "random" or (kind == "interpolation" and two_d):
        parts.append(f"norm={result.norm}, bias={result.bias}")
    elif kind == "pca":
        parts.append(f"bias={result.bias}")
    parts.append(f"{data_name}{'/' + split if split else ''} n={meta.num_samples}")
    parts.append(f"{meta.mode} mode{', BN stats moved' if result.states else ''}, {meta.dtype}")
    return "; ".join(parts)


def metric_label(result: Any, metric: str) -> str:
    """What a landscape figure plots: ``"train loss (cross_entropy)"``, ``"test accuracy"``."""
    split = (result.meta.data or {}).get("split")
    name = f"{split} {metric}" if split else metric
    loss = result.settings.get("loss") if metric == "loss" else None
    if not isinstance(loss, str):
        return name
    return f"{name} ({'cross-entropy' if loss == 'cross_entropy' else loss})"


def _title(result: Any, metric: str | None = None) -> str:
    """The plotted quantity (if given), then :func:`describe` wrapped to the figure's width,
    with the share of points computed when the slice is incomplete."""
    lines = [wrap_parts(describe(result).split("; "))]
    computed = to_numpy(result.computed)
    if computed.size and not computed.all():
        lines.append(f"partial: {int(computed.sum())} of {computed.size} points computed")
    if metric is not None:
        lines.insert(0, metric_label(result, metric))
    return "\n".join(lines)


def _values(result: Any, metric: str) -> np.ndarray:
    if metric not in METRICS:
        raise SharpscopeError(f"unknown metric '{metric}'; choose loss or accuracy")
    values = to_numpy(getattr(result, metric)).astype(float)
    if metric == "accuracy" and np.isnan(values).all():
        raise SharpscopeError("this landscape has no accuracy (the targets are not class labels)")
    return values


def _axis_labels(result: Any) -> tuple[str, str]:
    if result.direction_kind == "interpolation":
        return "α (0: model A, 1: model B)", "β (random direction)"
    if result.direction_kind == "pca":
        ratios = to_numpy(result.explained_variance_ratio)
        labels = [f"PC{i + 1} ({100 * r:.1f}% var.)" for i, r in enumerate(ratios)]
        return labels[0], labels[1] if len(labels) > 1 else ""
    if result.direction_kind == "eigen":
        eig = to_numpy(result.eigenvalues)
        labels = [f"v{i + 1} (λ={e:.3g})" for i, e in enumerate(eig)]
        return labels[0], labels[1] if len(labels) > 1 else ""
    return "α", "β"


@styled
def plot_landscape_1d(result: Any, metric: str = "loss", ax: Any = None) -> Any:
    """The 1-D curve f(α) (the accuracy on a second axis when ``metric="loss"``)."""
    if result.y is not None:
        raise SharpscopeError("plot_landscape_1d needs a 1-D landscape; use a contour for 2-D")
    values = _values(result, metric)
    if not np.isfinite(values).any():
        raise SharpscopeError(f"the landscape has no computed finite {metric} values to plot")
    x = to_numpy(result.x)
    fig, ax = (ax.figure, ax) if ax is not None else new_figure(1)
    ax.plot(x, values, color=PALETTE[0], marker="o" if len(x) <= 25 else None, label=metric)
    ax.set_xlim(x.min() - 0.02 * np.ptp(x), x.max() + 0.02 * np.ptp(x))  # the whole grid
    diverged = np.isnan(values) & (to_numpy(result.computed) > 0) | np.isinf(values)
    if diverged.any():  # computed, but not finite: say so instead of leaving a silent gap
        ax.plot(
            x[diverged],
            np.full(diverged.sum(), 0.98),
            transform=ax.get_xaxis_transform(),
            color=PALETTE[1],
            marker="x",
            linestyle="none",
            label="non-finite",
        )
        ax.legend(loc="upper center")
    ax.set_xlabel(_axis_labels(result)[0])
    ax.set_ylabel(metric_label(result, metric))
    if metric == "loss" and not np.isnan(to_numpy(result.accuracy)).all():
        twin = ax.twinx()
        twin.plot(x, to_numpy(result.accuracy), color=PALETTE[1], linestyle="--", label="accuracy")
        twin.set_ylabel(metric_label(result, "accuracy"), color=PALETTE[1])
        twin.grid(False)
    if result.direction_kind == "interpolation":
        for at, name in ((0.0, "A"), (1.0, "B")):
            ax.axvline(at, color=PALETTE[7], linewidth=0.6, alpha=0.5)
            ax.annotate(
                name, (at, 0.02), xycoords=("data", "axes fraction"), ha="left", va="bottom"
            )
    ax.set_title(_title(result), fontsize=6)
    return fig


def contour_levels(values: np.ndarray, count: int = 12, *, cut: str = "high") -> np.ndarray:
    """Evenly spaced levels over the finite values, cut at a percentile to keep the lines
    readable where the values matter: ``cut="high"`` from the minimum to the 95th
    percentile (a loss explodes at the edges of the grid), ``"low"`` from the 5th
    percentile to the maximum (an accuracy falls to chance there; its basin is at the top).

    >>> contour_levels(np.array([[0.0, 1.0], [2.0, np.nan]]), count=3).tolist()
    [0.0, 0.95, 1.9]
    >>> contour_levels(np.array([0.0, 1.0, 2.0]), count=3, cut="low").tolist()
    [0.1, 1.05, 2.0]
    """
    if cut not in ("high", "low"):
        raise SharpscopeError(f"unknown cut '{cut}'; choose high or low")
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise SharpscopeError("the landscape has no computed finite values to plot")
    if cut == "high":
        lo, hi = float(finite.min()), float(np.percentile(finite, 95))
    else:
        lo, hi = float(np.percentile(finite, 5)), float(finite.max())
    if hi <= lo:
        hi = lo + 1e-6 if lo == 0 else lo + abs(lo) * 1e-3
    return np.linspace(lo, hi, count)


def spans_decades(values: np.ndarray) -> bool:
    """Whether the finite values are all positive and their max/min exceeds 10 (then
    :func:`log_levels` show the basin and the walls both)."""
    finite = values[np.isfinite(values)]
    return bool(finite.size) and finite.min() > 0 and finite.max() / finite.min() > 10


def log_levels(values: np.ndarray, count: int = 12) -> np.ndarray:
    """Geometrically spaced levels from the smallest positive finite value (at least 1e-6)
    to the largest.

    >>> log_levels(np.array([1.0, np.nan, 100.0]), count=3).tolist()
    [1.0, 10.0, 100.0]
    """
    finite = values[np.isfinite(values) & (values > 0)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (1e-3, 1.0)
    return np.geomspace(max(low, 1e-6), max(high, low * 1.01), count)


def log_norm(levels: np.ndarray) -> Any:
    """The colour scale of :func:`log_levels`."""
    import matplotlib.colors as mcolors

    return mcolors.LogNorm(vmin=levels[0], vmax=levels[-1])


def log_colorbar(fig: Any, mappable: Any, axes: Any, levels: np.ndarray, label: str) -> Any:
    """A colour bar of log-spaced ``levels`` with five ticks that read apart."""
    bar = fig.colorbar(mappable, ax=axes, label=label, shrink=0.9, pad=0.02)
    ticks = np.geomspace(levels[0], levels[-1], 5)
    bar.set_ticks(ticks, labels=distinct_labels(ticks))
    bar.minorticks_off()
    return bar


def distinct_labels(values: Any) -> list[str]:
    """``values`` with the fewest significant digits (at least 2) that tell them apart: a
    narrow loss range (2.28 to 2.42) read "2.3" on four of five colour-bar ticks.

    >>> distinct_labels([2.28, 2.31, 2.35, 2.38, 2.42])
    ['2.28', '2.31', '2.35', '2.38', '2.42']
    >>> distinct_labels([0.1, 1.0, 10.0])
    ['0.1', '1', '10']
    """
    for digits in range(2, 8):
        labels = [f"{v:.{digits}g}" for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels


@styled
def plot_landscape_contour(
    result: Any, metric: str = "loss", ax: Any = None, levels: Any = None
) -> Any:
    """Contour lines of f(α, β) with labelled levels (the trajectory for PCA).

    A loss spanning more than a decade gets log-spaced levels and a colour bar (as the
    study's :func:`~sharpscope.plotting.study.plot_contours`), others evenly spaced ones
    (:func:`contour_levels`).
    """
    if result.y is None:
        raise SharpscopeError("a contour needs a 2-D landscape; use the 1-D curve")
    values = _values(result, metric)
    x, y = to_numpy(result.x), to_numpy(result.y)
    log = levels is None and metric == "loss" and spans_decades(values)
    if log:
        levels = log_levels(values)
    elif levels is None:
        levels = contour_levels(values, cut="low" if metric == "accuracy" else "high")
    fig, ax = (ax.figure, ax) if ax is not None else new_figure(1, aspect=0.9)
    finite = values[np.isfinite(values)]
    if np.ptp(finite) <= 1e-12 * max(1.0, abs(float(finite[0]))):  # no contour to draw
        ax.text(
            0.5,
            0.6,
            f"flat: {metric} = {finite[0]:.4g} at every computed point",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
    # loss[i, j] is at (x[i], y[j]); matplotlib wants Z[row = y, column = x]
    lines = ax.contour(
        x,
        y,
        np.ma.masked_invalid(values).T,
        levels=levels,
        cmap="viridis",
        norm=log_norm(levels) if log else None,
    )
    labelled = lines.levels[1::2]  # every other level (the lowest is the minimum: a point)
    positions = label_positions(lines, labelled, x, y)
    if positions:
        # every level, though only the labelled ones have a position: matplotlib 3.8 to 3.10
        # label a subset of the levels with the text of another level, or fail (IndexError)
        ax.clabel(
            lines,
            lines.levels,
            inline=True,
            fontsize=5,
            fmt=dict(zip(lines.levels, distinct_labels(lines.levels)))
            if log
            else level_format(lines.levels),
            colors="0.15",
            manual=positions,
        )
    if log:
        log_colorbar(fig, lines, ax, levels, f"{metric_label(result, metric)}, log scale")
    ax.plot([0], [0], marker="*", color=PALETTE[1], markersize=6, linestyle="none")
    if result.direction_kind == "interpolation":  # model A at the star, model B at α = 1
        ax.plot([1], [0], marker="*", color=PALETTE[2], markersize=6, linestyle="none")
        for at, name in ((0.0, "A"), (1.0, "B")):
            ax.annotate(name, (at, 0.0), xytext=(3, 3), textcoords="offset points", fontsize=6)
    if result.trajectory is not None and to_numpy(result.trajectory).shape[1] >= 2:
        path = to_numpy(result.trajectory)
        ax.plot(path[:, 0], path[:, 1], color=PALETTE[7], marker=".", linewidth=0.8)
        ax.plot(path[:1, 0], path[:1, 1], color=PALETTE[7], marker="o", markersize=4)
        ax.annotate("start", path[0, :2], xytext=(3, 3), textcoords="offset points", fontsize=6)
    labels = _axis_labels(result)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_title(_title(result, metric), fontsize=6)
    return fig


def level_format(levels: np.ndarray) -> str:
    """One number format for all contour labels, with as many decimals as their spacing needs.

    Rounded to these decimals a label is within a quarter of the spacing of its level.

    >>> level_format(np.array([1.42, 1.49, 1.56])), level_format(np.array([0.0, 20.0, 40.0]))
    ('%.2f', '%.0f')
    """
    levels = np.asarray(levels, dtype=float)
    step = float(np.min(np.diff(levels))) if len(levels) > 1 else 0.0
    top = float(np.max(np.abs(levels))) if len(levels) else 0.0
    if step <= 0 or top >= 1e5 or top < 1e-3:
        return "%.3g"
    return f"%.{max(0, int(np.ceil(-np.log10(step / 2))))}f"


def label_positions(
    lines: Any, levels: np.ndarray, x: np.ndarray, y: np.ndarray, margin: float = 0.06
) -> list[tuple[float, float]]:
    """Where to label each of ``levels``: the point of its line farthest from the axes' edges
    (a label there is not cut by the frame), none for a line that only crosses a corner
    (nearer than ``margin`` of the axes to an edge)."""
    width, height = float(np.ptp(x)) or 1.0, float(np.ptp(y)) or 1.0
    positions = []
    for level, segments in zip(lines.levels, lines.allsegs):
        if not np.isclose(level, levels).any():
            continue
        best = (margin, None)
        for points in segments:
            if len(points) == 0:
                continue
            px, py = points[:, 0], points[:, 1]
            room = np.minimum.reduce(
                [
                    (px - x.min()) / width,
                    (x.max() - px) / width,
                    (py - y.min()) / height,
                    (y.max() - py) / height,
                ]
            )
            i = int(room.argmax())
            if room[i] > best[0]:
                best = (float(room[i]), (float(px[i]), float(py[i])))
        if best[1] is not None:
            positions.append(best[1])
    return positions


@styled
def plot_landscape_surface(result: Any, metric: str = "loss", ax: Any = None) -> Any:
    """The 3-D surface of f(α, β)."""
    if result.y is None:
        raise SharpscopeError("a surface needs a 2-D landscape; use the 1-D curve")
    values = _values(result, metric)
    x, y = to_numpy(result.x), to_numpy(result.y)
    if ax is None:
        fig, _ = new_figure(1, aspect=0.9)
        fig.clear()
        ax = fig.add_subplot(projection="3d")
    elif not hasattr(ax, "plot_surface"):
        raise SharpscopeError(
            "a surface needs a 3-D axis: fig.add_subplot(projection='3d'), or no ax"
        )
    fig = ax.figure
    grid_x, grid_y = np.meshgrid(x, y, indexing="ij")
    ax.plot_surface(grid_x, grid_y, np.ma.masked_invalid(values), cmap="viridis", linewidth=0)
    # the default 9 ticks per axis run into each other along the foreshortened 3-D axes
    from matplotlib.ticker import MaxNLocator

    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.set_major_locator(MaxNLocator(5))
    labels = _axis_labels(result)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.set_zlabel(metric_label(result, metric))
    ax.set_title(_title(result), fontsize=6)
    return fig


@styled
def plot_landscape(
    result: Any, kind: str = "auto", metric: str = "loss", ax: Any = None, **options: Any
) -> Any:
    """Dispatch: "curve" (1-D), "contour" (2-D default) or "surface"."""
    # by its kind, not isinstance: plotting does not import the analysis that calls it
    if getattr(result, "kind", None) != "landscape":
        raise SharpscopeError(f"cannot plot a {type(result).__name__}: pass a LandscapeResult")
    if kind not in KINDS:
        raise SharpscopeError(f"unknown plot kind '{kind}'; choose one of {', '.join(KINDS)}")
    if kind == "auto":
        kind = "curve" if result.y is None else "contour"
    if kind == "curve":
        return plot_landscape_1d(result, metric=metric, ax=ax)
    if kind == "contour":
        return plot_landscape_contour(result, metric=metric, ax=ax, **options)
    return plot_landscape_surface(result, metric=metric, ax=ax)


@styled
def save_landscape_plots(result: Any, out_dir: str | Path, stem: str = "landscape") -> list[Path]:
    """Write the standard figures as PDF and PNG: ``stem_1d`` (1-D), or ``stem_contour``
    and ``stem_surface`` (2-D); returns the files written."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    kinds = ["curve"] if result.y is None else ["contour", "surface"]
    written: list[Path] = []
    for kind in kinds:
        fig = plot_landscape(result, kind=kind)
        name = f"{stem}_1d" if kind == "curve" else f"{stem}_{kind}"
        written += save_figure(fig, out_dir / name)
        plt.close(fig)
    return written


__all__ = [
    "contour_levels",
    "describe",
    "distinct_labels",
    "label_positions",
    "level_format",
    "log_colorbar",
    "log_levels",
    "log_norm",
    "metric_label",
    "plot_landscape",
    "plot_landscape_1d",
    "plot_landscape_contour",
    "plot_landscape_surface",
    "save_landscape_plots",
    "spans_decades",
]
