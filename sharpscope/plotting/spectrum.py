"""Hessian spectral density on a log axis, with the top eigenvalues marked.

analysis.md §4: plot on a log axis with a floor (1e-7) and say which kernel
convention was used; an outlier carries mass 1/P, so its height reflects σ, not
multiplicity. The figure states data, mode, dtype and kernel (§8).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import NullLocator

from ..errors import SharpscopeError
from .style import PALETTE, new_figure, save_figure, styled, wrap_parts

FLOOR = 1e-7


def _parts(result: Any) -> tuple[Any, np.ndarray, Any]:
    """(density, top eigenvalues, meta) of a Spectrum or a Density."""
    density = getattr(result, "density", None)
    if density is not None and hasattr(density, "grid"):
        return density, np.asarray(result.eigenvalues, dtype=float), result.meta
    if hasattr(result, "top") and hasattr(result, "density"):
        raise SharpscopeError("this spectrum was computed without its density: nothing to plot")
    if hasattr(result, "grid") and hasattr(result, "values"):
        deflated = getattr(result, "deflated", None)
        top = np.asarray(deflated, dtype=float) if deflated is not None else np.zeros(0)
        return result, top, getattr(result, "meta", None)
    raise SharpscopeError(f"cannot plot a {type(result).__name__}: pass a Spectrum or a Density")


def _caption_parts(density: Any, meta: Any) -> list[str]:
    bits = []
    if meta is not None:
        data = (meta.data or {}) if hasattr(meta, "data") else {}
        name = data.get("name") or data.get("factory")
        if name:
            bits.append(f"{name} ({data.get('split', 'train')}, N={meta.num_samples})")
        elif getattr(meta, "num_samples", None):
            bits.append(f"N={meta.num_samples}")
        bits.append(f"{meta.mode} mode, {meta.dtype}")
    bits.append(f"{density.kernel} kernel, σ={density.sigma:.2g}")
    deflated = getattr(density, "deflated", None)
    if deflated is not None and len(deflated):
        bits.append(f"bulk density, top {len(deflated)} deflated")
    return bits


def _shared_caption(ax: Any, parts: list[str]) -> str:
    """The title of ``ax``: the caption parts every spectrum drawn into it shares (an
    overlay's differing parts, such as its sample count, are left to the legend)."""
    drawn = getattr(ax, "_sharpscope_caption_parts", None)
    shared = parts if drawn is None else [p for p in drawn if p in parts]
    ax._sharpscope_caption_parts = shared
    return wrap_parts(shared)


def _raise_the_ceiling_above(ax: Any, legend: Any) -> None:
    """Raise the y axis' top (log scale) so that the legend, in the upper right, sits above
    every curve and eigenvalue mark of ``ax``: free headroom sized to the legend's height.
    A top already higher (set by the caller, or by a panel sharing the y axis) is kept."""
    root = ax.figure
    while getattr(root, "figure", root) is not root:  # a subfigure's root figure draws
        root = root.figure
    root.draw_without_rendering()  # the final layout: the axes' and legend's heights
    legend_share = legend.get_window_extent().height / ax.get_window_extent().height
    below = max(1.0 - legend_share - 0.05, 0.3)  # the share of the axes the data may use
    highest = FLOOR * 10
    for line in ax.get_lines():  # a user's legend proxy may be empty or all NaN
        y = np.asarray(line.get_ydata(), dtype=float)
        y = y[np.isfinite(y) & (y > 0)]
        if y.size:
            highest = max(highest, float(y.max()))
    low = np.log10(FLOOR)
    needed = 10 ** (low + (np.log10(highest) - low) / below)
    ax.set_ylim(FLOOR, max(needed, ax.get_ylim()[1]))


@styled
def plot_spectrum(
    result: Any, ax: Any = None, *, label: str | None = None, color: str | None = None
) -> Any:
    """Smoothed spectral density on a log axis (floor 1e-7), top eigenvalues marked.

    Args:
        result: a :class:`~sharpscope.analysis.Spectrum` (density and top-k) or a
            :class:`~sharpscope.analysis.Density` (its deflated outliers are marked).
        ax: draw into these axes; default a new one-column figure.
        label: legend label of the density curve.
        color: colour of the curve and its eigenvalue marks; default: the next palette
            colour not yet used by a curve in ``ax`` (so overlays stay distinguishable).

    Returns:
        The matplotlib Figure.
    """
    density, top, meta = _parts(result)
    if ax is None:
        fig, ax = new_figure(1, aspect=0.7)
    else:
        fig = ax.figure
    if color is None:
        curves = sum(1 for line in ax.get_lines() if line.get_linestyle() == "-")
        color = PALETTE[curves % len(PALETTE)]
    grid = np.asarray(density.grid, dtype=float)
    if not np.isfinite(np.asarray(density.values, dtype=float)).any():
        raise SharpscopeError("the spectral density has no finite values to plot (a NaN loss?)")
    values = np.maximum(np.asarray(density.values, dtype=float), FLOOR)
    ax.semilogy(grid, values, color=color, label=label or "density")
    log_units = str(getattr(density, "units", "eigenvalue")).startswith("log")
    if top.size:
        # marks from the floor to a decade above this curve's peak; λ1 goes in the legend
        # (a label beside its mark ran into the other spectrum's marks, or off the axes)
        mark_top = float(np.nanmax(values)) * 10
        for i, value in enumerate(top):
            x = np.log(abs(value) + 1e-5) if log_units else value
            what = f"{label}: top {top.size}" if label else f"top {top.size} eigenvalues"
            ax.plot(
                [x, x],
                [FLOOR, mark_top],
                color=color,
                linestyle="--",
                linewidth=0.7,
                label=f"{what}, λ1 = {top.max():.3g}" if i == 0 else None,
            )
    ax.set_xlabel("ln(|eigenvalue| + 1e-5)" if log_units else "eigenvalue")
    ax.set_ylabel("density")
    # a narrow spectrum (H ≈ c·I) would get an offset ("1e-6+6.93e-1") over the x label
    ax.xaxis.get_major_formatter().set_useOffset(False)
    ax.yaxis.set_minor_locator(NullLocator())  # a comb of minor ticks over 10 decades
    ax.set_title(_shared_caption(ax, _caption_parts(density, meta)), fontsize=6)
    legend = ax.legend(
        loc="upper right", frameon=True, framealpha=0.9, facecolor="white", edgecolor="none"
    )
    _raise_the_ceiling_above(ax, legend)
    return fig


@styled
def save_spectrum_plot(result: Any, path: str | Path) -> list[Path]:
    """Plot ``result`` and write ``PATH.pdf`` and ``PATH.png``.

    ``path`` may carry a ``.pdf`` or ``.png`` suffix; both files are written. The plotted
    numbers are not written beside them (``spectrum --json`` holds them, and a
    ``PATH.json`` here would overwrite a ``--json`` file of the same stem).
    """
    import matplotlib.pyplot as plt

    fig = plot_spectrum(result)
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)
