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


def _parts(result: Any) -> tuple[Any, np.ndarray, str, Any]:
    """(density, marked eigenvalues, which of them (LA/SA/LM), meta) of a Spectrum or a
    Density (whose marks are its deflated top eigenvalues: LA)."""
    density = getattr(result, "density", None)
    if density is not None and hasattr(density, "grid"):
        top = np.asarray(result.eigenvalues, dtype=float)
        return density, top, str(getattr(result.top, "which", "LA")), result.meta
    if hasattr(result, "top") and hasattr(result, "density"):
        raise SharpscopeError("this spectrum was computed without its density: nothing to plot")
    if hasattr(result, "grid") and hasattr(result, "values"):
        deflated = getattr(result, "deflated", None)
        top = np.asarray(deflated, dtype=float) if deflated is not None else np.zeros(0)
        return result, top, "LA", getattr(result, "meta", None)
    raise SharpscopeError(f"cannot plot a {type(result).__name__}: pass a Spectrum or a Density")


def _marks_label(top: np.ndarray, which: str, label: str | None) -> str:
    """The legend entry of the eigenvalue marks, named as ``--which`` chose them (README:
    SA the most negative, LM the largest |λ|), with the extreme one.

    >>> _marks_label(np.array([-0.26, -0.29]), "SA", None)
    '2 most negative eigenvalues, λmin = -0.29'
    >>> _marks_label(np.array([0.2, -0.3]), "LM", "SGD")
    'SGD: 2 largest |λ|, λ = -0.3'
    """
    n = top.size
    if which == "SA":
        what, value = f"{n} most negative", f"λmin = {top.min():.3g}"
    elif which == "LM":
        what, value = f"{n} largest |λ|", f"λ = {top[np.abs(top).argmax()]:.3g}"
    else:
        what, value = f"top {n}", f"λ1 = {top.max():.3g}"
    if label:
        return f"{label}: {what}, {value}"
    return f"{what}{'' if which == 'LM' else ' eigenvalues'}, {value}"


def _caption_parts(density: Any, meta: Any) -> list[str]:
    """What the figure states (§8): data, N, mode, dtype, kernel and σ, each a part of its
    own so that an overlay keeps in its title what its spectra share (:func:`_label_overlay`)."""
    bits = []
    if meta is not None:
        data = (meta.data or {}) if hasattr(meta, "data") else {}
        name = data.get("name") or data.get("factory")
        if name:
            bits.append(f"{name} ({data.get('split', 'train')})")
        if getattr(meta, "num_samples", None):
            bits.append(f"N={meta.num_samples}")
        bits += [f"{meta.mode} mode", str(meta.dtype)]
    bits += [f"{density.kernel} kernel", f"σ={density.sigma:.2g}"]
    deflated = getattr(density, "deflated", None)
    if deflated is not None and len(deflated):
        bits.append(f"bulk density, top {len(deflated)} deflated")
    return bits


def _label_overlay(ax: Any, curve: Any, label: str, parts: list[str]) -> str:
    """Title ``ax`` with the caption parts every spectrum drawn into it shares, and end each
    density's legend entry with its own other parts (σ, N, ...), as ``"SAM (σ=0.0072)"``."""
    curve._sharpscope_caption = (label, parts)
    drawn = [line for line in ax.get_lines() if hasattr(line, "_sharpscope_caption")]
    shared = [p for p in parts if all(p in line._sharpscope_caption[1] for line in drawn)]
    for line in drawn:
        name, own = line._sharpscope_caption
        rest = [p for p in own if p not in shared]
        line.set_label(f"{name} ({', '.join(rest)})" if rest else name)
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
    """Smoothed spectral density on a log axis (floor 1e-7), the eigenvalues marked (the
    top ones, or the most negative or largest |λ| of ``--which SA|LM``).

    The title states data, N, mode, dtype, kernel and σ; drawn into axes that hold other
    spectra, it keeps what they all share and each legend entry names the rest.

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
    density, top, which, meta = _parts(result)
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
    (curve,) = ax.semilogy(grid, values, color=color)
    log_units = str(getattr(density, "units", "eigenvalue")).startswith("log")
    if top.size:
        # marks from the floor to a decade above this curve's peak; λ1 goes in the legend
        # (a label beside its mark ran into the other spectrum's marks, or off the axes)
        mark_top = float(np.nanmax(values)) * 10
        for i, value in enumerate(top):
            x = np.log(abs(value) + 1e-5) if log_units else value
            ax.plot(
                [x, x],
                [FLOOR, mark_top],
                color=color,
                linestyle="--",
                linewidth=0.7,
                label=_marks_label(top, which, label) if i == 0 else None,
            )
    ax.set_xlabel("ln(|eigenvalue| + 1e-5)" if log_units else "eigenvalue")
    ax.set_ylabel("density")
    # a narrow spectrum (H ≈ c·I) would get an offset ("1e-6+6.93e-1") over the x label
    ax.xaxis.get_major_formatter().set_useOffset(False)
    ax.yaxis.set_minor_locator(NullLocator())  # a comb of minor ticks over 10 decades
    title = _label_overlay(ax, curve, label or "density", _caption_parts(density, meta))
    ax.set_title(title, fontsize=6)
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
