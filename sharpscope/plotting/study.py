"""Figures of a study: measures against the generalization gap, correlations, sweeps.

Inputs are the rows of ``results.csv`` (dicts, see :func:`sharpscope.study.read_results`)
and :class:`~sharpscope.analysis.correlation.Correlation` results; every function
returns a matplotlib Figure and touches no model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..columns import PARAM_COLUMNS
from ..errors import SharpscopeError
from .landscape import distinct_labels, label_positions, log_colorbar, log_levels, log_norm
from .style import (
    LINE_STYLES,
    MARKERS,
    PALETTE,
    figure_legend,
    new_figure,
    optimizer_color,
    optimizer_label,
    styled,
)

Rows = Sequence[Mapping[str, Any]]

LABELS = {
    "gen_gap": "generalization gap (test − train error, %)",
    "loss_gap": "loss gap (test − train loss)",
    "lambda_max": r"$\lambda_{\max}$ of the Hessian",
    "lambda_5": r"$\lambda_5$ of the Hessian",
    "ratio": r"$\lambda_{\max}/\lambda_5$",
    "trace": "Hessian trace",
    "m_sharpness": "m-sharpness (loss increase)",
    "adaptive_sharpness": "adaptive sharpness (loss increase)",
    "weight_norm": r"$\|\theta\|_2$",
    "test_acc": "test error (%)",
    "train_acc": "train error (%)",
    "test_loss": "test loss (cross-entropy)",
    "train_loss": "train loss (cross-entropy)",
    "test_ece": "test ECE (15 bins)",
    "test_nll": "test NLL",
    "rho": r"$\rho$",
    "m": "m (examples per perturbation)",
    "label_noise": "label noise (%)",
    "lr": "learning rate",
    "batch_size": "batch size",
}
PERCENT = ("gen_gap", "test_acc", "train_acc", "train_clean_acc", "test_acc_bma", "label_noise")
ERROR_FROM_ACC = ("test_acc", "train_acc", "train_clean_acc", "test_acc_bma")


def _tag(text: str) -> str:
    """``"m16_rho0.05"`` -> ``"m=16, ρ=0.05"``."""
    parts = []
    for part in text.split("_"):
        for key, shown in (("rho", "ρ"), ("eps", "ε"), ("m", "m")):
            if part.startswith(key) and part[len(key) :][:1].isdigit():
                parts.append(f"{shown}={part[len(key) :]}")
                break
        else:
            parts.append(part)
    return ", ".join(parts)


def axis_label(column: str) -> str:
    """Axis label with units for a results.csv column.

    >>> axis_label("test_acc"), axis_label("msharp_m16_rho0.05")
    ('test error (%)', 'm-sharpness (m=16, ρ=0.05)')
    """
    if column in LABELS:
        return LABELS[column]
    for prefix, name in (
        ("msharp_err_", "m-sharpness, error increase"),
        ("asharp_err_", "adaptive sharpness, error increase"),
        ("msharp_", "m-sharpness"),
        ("asharp_", "adaptive sharpness"),
        ("avgsharp_ada_", "adaptive average sharpness"),
        ("avgsharp_", "average sharpness"),
        ("keskar_", "ε-sharpness (Keskar)"),
    ):
        if column.startswith(prefix):
            return f"{name} ({_tag(column[len(prefix) :])})"
    if column == "pac_bayes":
        return r"PAC-Bayes flatness $1/\sigma^2$"
    if column == "pac_bayes_mag":
        return r"magnitude-aware PAC-Bayes $1/\sigma^2$"
    return column.replace("_", " ")


def display_value(column: str, value: Any) -> float | None:
    """The plotted value: accuracies become error in percent, gaps percent."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    if column in ERROR_FROM_ACC:
        return 100.0 * (1.0 - value)
    if column in PERCENT:
        return 100.0 * value
    return value


def display_name(column: str) -> str:
    """Name of the plotted quantity: ``test_acc`` -> ``test_error_pct``.

    >>> display_name("test_acc"), display_name("gen_gap"), display_name("trace")
    ('test_error_pct', 'gen_gap_pct', 'trace')
    """
    if column in ERROR_FROM_ACC:
        return column.replace("_acc", "_error") + "_pct"
    if column in PERCENT:
        return f"{column}_pct"
    return column


def _finite_rows(rows: Rows, *columns: str) -> list[Mapping[str, Any]]:
    return [r for r in rows if all(display_value(c, r.get(c)) is not None for c in columns)]


def _labels_in_order(rows: Rows, key: str) -> list[Any]:
    return list(dict.fromkeys(r.get(key) for r in rows))


def _color(label: Any, index: int) -> str:
    return optimizer_color(str(label), index)


def _hue_label(hue: str, label: Any) -> str:
    """A legend entry: ``SAM`` for an optimizer, ``label noise 0.2`` for another axis
    (it read ``label_noise=0.2``)."""
    if hue == "optimizer":
        return optimizer_label(label)
    return f"{'ρ' if hue == 'rho' else hue.replace('_', ' ')} {label}"


def _hue_colors(rows: Rows, hue: str) -> dict[Any, str]:
    """Each ``hue`` label's colour, the settings of one label sharing it."""
    return {label: _color(label, i) for i, label in enumerate(_labels_in_order(rows, hue))}


@styled
def plot_measure_vs_gap(
    rows: Rows,
    measure: str,
    gap: str = "gen_gap",
    *,
    hue: str = "optimizer",
    style: str | None = None,
    ax: Any = None,
):
    """Scatter of one measure against the gap (one point per model), coloured by ``hue``;
    with ``style`` (a second hyperparameter, e.g. ``"lr"``) its values get the markers,
    and the legend has an entry per ``hue`` label and one per ``style`` value."""
    if ax is None:
        fig, ax = new_figure(1, aspect=0.8)
    else:
        fig = ax.figure
    points = _finite_rows(rows, measure, gap)
    styles = sorted({_style_value(r, style) for r in points}, key=_order_key) if style else []
    for index, label in enumerate(_labels_in_order(points, hue)):
        group = [r for r in points if r.get(hue) == label]
        color = _color(label, index)
        for value_index, value in enumerate(styles or [None]):
            members = [r for r in group if not style or _style_value(r, style) == value]
            if not members:
                continue
            ax.scatter(
                [display_value(measure, r[measure]) for r in members],
                [display_value(gap, r[gap]) for r in members],
                color=color,
                marker=MARKERS[(value_index if style else index) % len(MARKERS)],
                s=14,
                label=None if style else _hue_label(hue, label),
                edgecolors="none",
            )
        if style:  # the colour's entry, with a neutral marker
            ax.scatter([], [], color=color, marker="o", s=14, label=_hue_label(hue, label))
    for value_index, value in enumerate(styles):
        ax.scatter(
            [],
            [],
            color="0.45",
            marker=MARKERS[value_index % len(MARKERS)],
            s=14,
            label=_hue_label(style, value or "n/a"),
        )
    ax.set_xlabel(axis_label(measure))
    ax.set_ylabel(axis_label(gap))
    spread = _spread(points, measure) if _positive(points, measure) else 0.0
    if spread > 30:
        ax.set_xscale("log")
        # over 1.5-2 decades matplotlib labels minor ticks too ("2×10^0 3×4×10^0 ..."),
        # which run together on a paper-sized panel: up to two decades 1 and 3 per decade
        # (at most five labels), the decades alone beyond
        ax.xaxis.set_minor_formatter(_null_formatter())
        if spread <= 100:
            _one_three_log_ticks(ax.xaxis)
    else:  # at most 5 ticks: long labels (0.0150 0.0175 ...) would run together
        ax.xaxis.set_major_locator(_max_locator(5))
    return fig


def _style_value(row: Mapping[str, Any], style: str | None) -> str | None:
    """A row's value of the marked axis as its legend shows it: numbers with ``:g`` (0.1,
    not 0.30000000000000004, and one marker for 0.05 and "0.05"), None for a missing or NaN
    value (an empty results.csv cell: the axis does not apply)."""
    value = row.get(style) if style else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return None if math.isnan(number) else f"{number:g}"


def _order_key(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order, then text, then missing values."""
    if value is None:
        return (2, 0.0, "")
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def second_axis(rows: Rows, hue: str = "optimizer") -> str | None:
    """The hyperparameter to mark in a measure-against-gap scatter beside ``hue``: of the
    settings that vary within a ``hue`` label (:func:`varying_settings`), the one that
    varies within the most labels (``lr`` over SAM's own ρ), with at most as many values
    as there are markers; None when there is none.

    >>> rows = [{"optimizer": o, "lr": lr, "rho": rho} for o, rho in (("sgd", None),
    ...         ("sam", 0.05), ("sam", 0.1)) for lr in (0.05, 0.1)]
    >>> second_axis(rows)
    'lr'
    """

    def labels_varying(column: str) -> int:
        return sum(
            len({_style_value(r, column) for r in rows if r.get(hue) == label}) > 1
            for label in _labels_in_order(rows, hue)
        )

    candidates = [
        c
        for c in varying_settings(rows, hue)
        if len({_style_value(r, c) for r in rows}) <= len(MARKERS)
    ]
    return max(candidates, key=labels_varying) if candidates else None


def _positive(rows: Rows, column: str) -> bool:
    return bool(rows) and all(float(r[column]) > 0 for r in rows)


def _spread(rows: Rows, column: str) -> float:
    values = [float(r[column]) for r in rows]
    return max(values) / max(min(values), 1e-300) if values else 1.0


@styled
def plot_measures_vs_gap(
    rows: Rows,
    measures: Sequence[str],
    gap: str = "gen_gap",
    *,
    hue: str = "optimizer",
    style: str | None = "auto",
    taus: Mapping[str, float] | None = None,
    ncols: int = 3,
):
    """A grid of :func:`plot_measure_vs_gap` panels, titled with Kendall τ if given;
    ``style="auto"`` marks the hyperparameter :func:`second_axis` picks (None: none)."""
    if not measures:
        raise SharpscopeError("no measure columns to plot")
    missing = [m for m in measures if not _finite_rows(rows, m, gap)]
    if missing:
        raise SharpscopeError(
            f"no finite values of {', '.join(missing)} (with {gap}) in these rows to plot"
        )
    ncols = min(ncols, len(measures))
    nrows = math.ceil(len(measures) / ncols)
    fig, axes = new_figure(2, aspect=0.75, nrows=nrows, ncols=ncols, squeeze=False)
    flat = list(axes.ravel())
    if style == "auto":
        style = second_axis(rows, hue)
    for ax, measure in zip(flat, measures):
        plot_measure_vs_gap(rows, measure, gap, hue=hue, style=style, ax=ax)
        if taus and measure in taus and taus[measure] is not None:
            ax.set_title(rf"Kendall $\tau$ = {taus[measure]:.2f}".replace("-", "\N{MINUS SIGN}"))
        ax.set_ylabel("")
    fig.supylabel(axis_label(gap), fontsize=8)
    for ax in flat[len(measures) :]:
        ax.set_visible(False)
    figure_legend(fig, flat[: len(measures)])
    return fig


@styled
def plot_correlations(correlations: Sequence[Any], *, ax: Any = None, columns: int = 2):
    """Kendall τ (with bootstrap interval) and granulated Ψ per measure, as a dot plot."""
    if not correlations:
        raise SharpscopeError("no correlations to plot")
    if ax is None:
        width = 3.35 if columns == 1 else 6.9
        height = 0.9 + 0.24 * max(len(correlations), 1)  # inches: one row per measure
        fig, ax = new_figure(columns, aspect=height / width)
    else:
        fig = ax.figure
    names = [c.measure for c in correlations]
    y = np.arange(len(names))
    for offset, key, label, color in (
        (-0.15, "tau", r"Kendall $\tau$", PALETTE[0]),
        (0.15, "overall", r"granulated $\Psi$", PALETTE[1]),
    ):
        values = np.array([_nan(getattr(c, key)) for c in correlations])
        intervals = [getattr(c, f"{key}_interval") for c in correlations]
        low = np.array([_nan(i[0]) for i in intervals])
        high = np.array([_nan(i[1]) for i in intervals])
        err = np.vstack([np.clip(values - low, 0, None), np.clip(high - values, 0, None)])
        err = np.where(np.isfinite(err), err, 0.0)
        ax.errorbar(
            values, y + offset, xerr=err, fmt="o", color=color, label=label, capsize=2, ms=3
        )
    ax.axvline(0.0, color="0.3", linewidth=0.6)
    ax.set_yticks(y, [axis_label(n) for n in names])
    ax.set_xlim(-1.05, 1.05)
    ax.invert_yaxis()
    target = correlations[0].target if correlations else "gen_gap"
    ax.set_xlabel(f"rank correlation with the {axis_label(target).split(' (')[0]}")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2)
    return fig


def _nan(value: Any) -> float:
    return math.nan if value is None else float(value)


# results.csv hyperparameter columns that tell settings apart; seeds are pooled
SETTING_COLUMNS = tuple(c for c in PARAM_COLUMNS if c not in ("optimizer_name", "base", "seed"))
SETTING_NAMES = {"rho": "ρ", "weight_decay": "wd", "label_noise": "noise", "batch_size": "batch"}


def varying_settings(rows: Rows, hue: str, x: str | None = None) -> list[str]:
    """Hyperparameter columns, other than ``hue``, ``x`` and the seed, that take more than one
    value among the rows of one ``hue`` label: pooling over them would mix settings.

    >>> rows = [{"optimizer": "sam", "rho": r, "lr": 0.1, "seed": s} for r in (0.05, 0.1)
    ...         for s in (0, 1)]
    >>> varying_settings(rows, "optimizer", "lr"), varying_settings(rows, "optimizer", "rho")
    (['rho'], [])
    """
    out = []
    for column in SETTING_COLUMNS:
        if column in (hue, x):
            continue
        for label in _labels_in_order(rows, hue):
            values = {
                str(r.get(column))
                for r in rows
                if r.get(hue) == label and r.get(column) is not None
            }
            if len(values) > 1:
                out.append(column)
                break
    return out


def setting_text(setting: Mapping[str, Any]) -> str:
    """``{"rho": 0.05, "lr": 0.1}`` -> ``"ρ=0.05, lr=0.1"`` (settings that do not apply left out)."""
    return ", ".join(
        f"{SETTING_NAMES.get(k, k)}={v:g}"
        if isinstance(v, float)
        else f"{SETTING_NAMES.get(k, k)}={v}"
        for k, v in setting.items()
        if v is not None
    )


def _series(rows: Rows, hue: str, x: str | None) -> list[tuple[Any, dict[str, Any], list]]:
    """``(hue label, setting, rows)`` per setting of the :func:`varying_settings` columns."""
    columns = varying_settings(rows, hue, x)
    out: dict[tuple, tuple[Any, dict[str, Any], list]] = {}
    for r in rows:
        setting = {c: r.get(c) for c in columns}
        key = (str(r.get(hue)), *(str(v) for v in setting.values()))
        out.setdefault(key, (r.get(hue), setting, []))[2].append(r)
    return list(out.values())


def _series_label(label: Any, setting: Mapping[str, Any], hue: str) -> str:
    name = _hue_label(hue, label)
    detail = setting_text(setting)
    return f"{name} ({detail})" if detail else name


def _spread_series(
    rows: Rows, x: str, y: str, hue: str
) -> list[tuple[Any, dict[str, Any], list[dict[str, Any]]]]:
    """``(hue label, setting, summary rows)`` per series of :func:`mean_and_spread`."""
    out = []
    name = display_name(y)
    for label, setting, group in _series(_finite_rows(rows, y), hue, x):
        summary = []
        for xv in _labels_in_order(group, x):
            values = [display_value(y, r[y]) for r in group if r.get(x) == xv]
            summary.append(
                {
                    hue: label,
                    **setting,
                    x: xv,
                    f"{name}_mean": float(np.mean(values)),
                    f"{name}_std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
                    "num_seeds": len(values),
                }
            )
        out.append((label, setting, summary))
    return out


def mean_and_spread(rows: Rows, x: str, y: str, hue: str = "optimizer") -> list[dict[str, Any]]:
    """Mean and sd over seeds of ``y`` (as plotted: error in %) at each (hue, x).

    Only seeds are pooled: where another hyperparameter (say the learning rate in a sweep
    over ρ) takes several values within one ``hue`` label, each of its settings is a
    series of its own, named in the returned rows (:func:`varying_settings`).
    """
    return [s for _, _, summary in _spread_series(rows, x, y, hue) for s in summary]


@styled
def plot_metric_vs_axis(
    rows: Rows,
    x: str,
    y: str = "test_acc",
    *,
    hue: str = "optimizer",
    ax: Any = None,
    columns: int = 1,
    logx: bool = False,
    reference: Mapping[str, float] | None = None,
):
    """``y`` (mean ± sd over seeds) against a swept hyperparameter, one line per ``hue``.

    ``reference`` draws horizontal lines (label -> y value, in plotted units), e.g. the
    SGD baseline in a plot of SAM's error against m.
    """
    if ax is None:
        fig, ax = new_figure(columns, aspect=0.75)
    else:
        fig = ax.figure
    series = _spread_series([r for r in rows if r.get(x) is not None], x, y, hue)
    colors = _hue_colors([summary[0] for _, _, summary in series], hue)
    drawn: dict[Any, int] = {}
    for label, setting, summary in series:
        group = sorted(summary, key=lambda s: s[x])
        k = drawn[label] = drawn.get(label, -1) + 1  # settings of one label: vary the style
        xs = [display_value(x, s[x]) if x in PERCENT else s[x] for s in group]
        single = all(s["num_seeds"] == 1 for s in group)  # no spread to show
        ax.errorbar(
            xs,
            [s[f"{display_name(y)}_mean"] for s in group],
            yerr=None if single else [s[f"{display_name(y)}_std"] for s in group],
            color=colors[label],
            marker=MARKERS[(list(colors).index(label) + k) % len(MARKERS)],
            linestyle=LINE_STYLES[k % len(LINE_STYLES)],
            capsize=2,
            label=_series_label(label, setting, hue),
        )
    for index, (label, value) in enumerate((reference or {}).items()):
        ax.axhline(
            value,
            color=_color(label, index),
            linestyle="--",
            linewidth=0.9,
            label=f"{optimizer_label(label)} (reference)",
        )
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.legend()
    return fig


@styled
def plot_tau_vs_m(points: Sequence[Mapping[str, Any]], *, ax: Any = None, columns: int = 1):
    """Kendall τ of m-sharpness with the gap against m (SAM paper Fig. 3, right).

    Args:
        points: rows with ``m``, ``tau``, ``tau_low``, ``tau_high`` and optionally
            ``rho`` (one line per ρ).
    """
    if ax is None:
        fig, ax = new_figure(columns, aspect=0.75)
    else:
        fig = ax.figure
    rhos = _labels_in_order(points, "rho")
    for index, rho in enumerate(rhos):
        group = sorted((p for p in points if p.get("rho") == rho), key=lambda p: p["m"])
        dodge = 2 ** (0.08 * (index - (len(rhos) - 1) / 2))  # side by side on the log axis
        tau = np.array([_nan(p["tau"]) for p in group])
        low = np.array([_nan(p.get("tau_low")) for p in group])
        high = np.array([_nan(p.get("tau_high")) for p in group])
        err = np.vstack([np.clip(tau - low, 0, None), np.clip(high - tau, 0, None)])
        ax.errorbar(
            [p["m"] * dodge for p in group],
            tau,
            yerr=np.where(np.isfinite(err), err, 0.0),
            color=PALETTE[index % len(PALETTE)],
            marker=MARKERS[index % len(MARKERS)],
            capsize=2,
            label=rf"$\rho$ = {rho:g}" if rho is not None else None,
        )
    ax.axhline(0.0, color="0.3", linewidth=0.6)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m used to measure sharpness")
    ax.set_ylabel(r"Kendall $\tau$ with the gap")
    ax.set_ylim(-1.05, 1.05)
    if any(p.get("rho") is not None for p in points):
        ax.legend()
    return fig


@styled
def plot_spectral_densities(
    curves: Mapping[str, Sequence[tuple[int, Mapping[str, Any]]]],
    *,
    columns: int = 2,
    lambda_max: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    titles: Mapping[str, str] | None = None,
):
    """Hessian eigenvalue densities per optimizer (one panel each, two per row), one line per
    epoch (the last solid, earlier ones dashed and lighter).

    Args:
        curves: label -> [(epoch, density dict with ``grid`` and ``values``), ...].
        columns: figure width.
        lambda_max: label -> [(epoch, λmax)], written in the legend.
        titles: label -> panel title (default: the optimizer's name).

    The y axis is logarithmic, as in the SAM paper's Figure 3 (left), so the bulk and
    the outliers are visible at once; values are floored at 1e-7 as in
    :func:`sharpscope.plotting.spectrum.plot_spectrum` (analysis.md §4).
    """
    from .spectrum import FLOOR

    labels = list(curves)
    if not labels:
        raise SharpscopeError("no spectral densities to plot")
    ncols = min(len(labels), 2)
    nrows = math.ceil(len(labels) / ncols)
    fig, axes = new_figure(
        columns, aspect=0.6, nrows=nrows, ncols=ncols, sharex=True, sharey=True, squeeze=False
    )
    axes = list(axes.ravel())
    for ax, label in zip(axes, labels):
        entries = sorted(curves[label], key=lambda e: e[0])
        tops = dict((lambda_max or {}).get(label, []))
        for index, (epoch, density) in enumerate(entries):
            grid = np.asarray(density["grid"], dtype=float)
            values = np.asarray(density["values"], dtype=float)
            shade = 0.35 + 0.65 * (index + 1) / len(entries)
            color = _shade(optimizer_color(label.split("-")[0], 0), shade)
            text = f"epoch {epoch}"
            if tops.get(epoch) is not None:
                text += rf" ($\lambda_{{\max}}$ = {tops[epoch]:.2f})"
            ax.semilogy(
                grid,
                np.clip(values, FLOOR, None),
                color=color,
                linestyle=LINE_STYLES[(len(entries) - 1 - index) % len(LINE_STYLES)],
                label=text,
            )
        ax.set_ylim(bottom=FLOOR)
        ax.yaxis.set_minor_locator(_null_locator())
        default = optimizer_label(label.split("-")[0]) if "-" not in label else label
        ax.set_title((titles or {}).get(label, default))
        ax.legend(fontsize="xx-small", loc="upper right")
    for ax in axes[len(labels) :]:
        ax.set_visible(False)
    for ax in axes[::ncols]:
        ax.set_ylabel("density (log scale)")
    for ax in axes[len(labels) - ncols : len(labels)]:
        ax.set_xlabel("eigenvalue")
        ax.xaxis.set_tick_params(labelbottom=True)
    return fig


def _max_locator(count: int):
    import matplotlib.ticker as mticker

    return mticker.MaxNLocator(count)


def _one_three_log_ticks(axis: Any) -> None:
    import matplotlib.ticker as mticker

    axis.set_major_locator(mticker.LogLocator(base=10, subs=(1.0, 3.0)))
    axis.set_major_formatter(mticker.FuncFormatter(lambda value, _: short_number(value)))


def short_number(value: float) -> str:
    r"""A tick label: plain from 0.001 to 9999, else a power of ten.

    >>> short_number(30.0), short_number(0.003), short_number(3e5), short_number(1e-4)
    ('30', '0.003', '$3\\times10^{5}$', '$10^{-4}$')
    """
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:g}"
    exponent = int(np.floor(np.log10(abs(value)) + 1e-9))
    mantissa = value / 10.0**exponent
    if abs(mantissa - 1) < 1e-9:
        return f"$10^{{{exponent}}}$"
    return f"${mantissa:g}\\times10^{{{exponent}}}$"


def _null_formatter():
    import matplotlib.ticker as mticker

    return mticker.NullFormatter()


def _null_locator():
    import matplotlib.ticker as mticker

    return mticker.NullLocator()


def _shade(color: str, amount: float) -> tuple[float, float, float]:
    import matplotlib.colors as mcolors

    rgb = np.array(mcolors.to_rgb(color))
    if np.allclose(rgb, 0):  # black: shade through greys
        return tuple(float(v) for v in np.full(3, 0.75 * (1 - amount)))
    white = np.ones(3)
    return tuple(float(v) for v in white + (rgb - white) * amount)


@styled
def plot_variants(
    rows: Rows,
    metrics: Sequence[str] = ("test_acc", "lambda_max", "trace", "m_sharpness"),
    *,
    hue: str = "optimizer",
    columns: int = 2,
):
    """Optimizers side by side: one bar panel per metric, mean ± sd over seeds.

    Only seeds are pooled: each setting of another swept hyperparameter
    (:func:`varying_settings`) is a bar of its own, named under it.
    """
    metrics = [m for m in metrics if any(display_value(m, r.get(m)) is not None for r in rows)]
    if not metrics:
        raise SharpscopeError("none of the requested metrics is in the results")
    fig, axes = new_figure(columns, aspect=0.85, ncols=len(metrics), squeeze=False)
    axes = list(axes.ravel())
    series = _series(rows, hue, None)
    colors = _hue_colors(rows, hue)
    names = [
        _series_label(label, setting, hue).replace(" (", "\n(", 1) for label, setting, _ in series
    ]
    for ax, metric in zip(axes, metrics):
        means, stds = [], []
        for _, _, group in series:
            values = [display_value(metric, r.get(metric)) for r in group]
            values = [v for v in values if v is not None]
            means.append(float(np.mean(values)) if values else math.nan)
            stds.append(float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
        x = np.arange(len(series))
        ax.bar(
            x,
            means,
            yerr=stds,
            color=[colors[label] for label, _, _ in series],
            capsize=2,
            width=0.7,
        )
        ax.set_xticks(x, names, rotation=45, ha="right")
        ax.set_ylabel(axis_label(metric))
        ax.grid(axis="x", visible=False)
    return fig


@styled
def plot_curves_1d(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str = r"$\alpha$ (filter-normalized direction)",
    ylabel: str = "train loss (cross-entropy)",
    ax: Any = None,
    columns: int = 1,
    logy: bool = False,
    marks: Mapping[str, float] | None = None,
):
    """Loss along one direction for several models (1-D landscapes, interpolations).

    ``marks`` draws labelled vertical lines (e.g. ``{"SGD": 0, "SAM": 1}`` on an
    interpolation).
    """
    many = len(curves) > 6  # a legend of many pairs covered the curves: it goes under them
    legend_columns = 2 if max(map(len, curves), default=0) <= 28 else 1
    if ax is None:
        # taller by the legend's rows (about 0.1 inch each), the axes kept their size
        rows = -(-len(curves) // legend_columns) if many else 0
        fig, ax = new_figure(columns, aspect=0.75 + (0.1 * rows + 0.3) / 3.35 * bool(rows))
    else:
        fig = ax.figure
    colors = [_color(label.split("-")[0], i) for i, label in enumerate(curves)]
    if len(set(colors)) < len(colors):  # several curves of one optimizer (interpolations)
        colors = [PALETTE[i % len(PALETTE)] for i in range(len(colors))]
    for index, (label, (x, y)) in enumerate(curves.items()):
        style = LINE_STYLES[index // len(PALETTE) % len(LINE_STYLES)]
        ax.plot(x, y, color=colors[index], linestyle=style, label=optimizer_label(label))
    for name, position in (marks or {}).items():
        ax.axvline(position, color="0.5", linewidth=0.6, linestyle=":")
        ax.annotate(
            name,
            (position, 1.0),
            xycoords=("data", "axes fraction"),
            ha="center",
            va="bottom",
            fontsize=7,
        )
    if logy:
        ax.set_yscale("log")
    else:  # an offset ("+2.276") above the axis ran into the marks' labels
        ax.yaxis.get_major_formatter().set_useOffset(False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if many:  # beside the axes, it squeezed them to a quarter of the figure's width
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=legend_columns,
            fontsize="x-small",
        )
    else:
        ax.legend()
    return fig


@styled
def plot_contours(
    surfaces: Mapping[str, tuple[Sequence[float], Sequence[float], Any]],
    *,
    columns: int = 2,
    levels: int = 20,
):
    """2-D loss surfaces side by side with shared contour levels (log-spaced losses).

    Args:
        surfaces: label -> (alpha grid, beta grid, loss array of shape (n_alpha, n_beta),
            index [i, j] <-> (alpha_i, beta_j)).
    """
    labels = list(surfaces)
    if not labels:
        raise SharpscopeError("no surfaces to plot")
    fig, axes = new_figure(columns, aspect=0.9, ncols=len(labels), squeeze=False)
    axes = list(axes.ravel())
    bounds = log_levels(
        np.concatenate([np.asarray(s[2], float).ravel() for s in surfaces.values()]), levels
    )
    contour = None
    for ax, label in zip(axes, labels):
        alpha, beta, loss = surfaces[label]
        loss = np.asarray(loss, float)
        contour = ax.contourf(
            np.asarray(alpha),
            np.asarray(beta),
            np.clip(loss.T, bounds[0], bounds[-1]),
            levels=bounds,
            cmap="viridis",
            norm=log_norm(bounds),
        )
        # a few labelled lines on top, so levels read off the panel without the colour bar
        lines = ax.contour(
            np.asarray(alpha),
            np.asarray(beta),
            np.clip(loss.T, bounds[0], bounds[-1]),
            levels=bounds[2::4],
            colors="white",
            linewidths=0.5,
        )
        shown = bounds[2::4]
        # at the point of each line farthest from the frame: matplotlib's own choice was
        # often on the panel's edge, where the frame cut the label
        positions = label_positions(lines, shown, np.asarray(alpha), np.asarray(beta))
        if positions:
            ax.clabel(
                lines,
                shown,
                inline=True,
                fontsize=6,
                fmt=dict(zip(shown, distinct_labels(shown))),
                manual=positions,
            )
        ax.set_title(optimizer_label(label.split("-")[0]) if "-" not in label else label)
        ax.set_xlabel(r"$\alpha$")
        ax.set_aspect("equal")
        ax.xaxis.set_major_locator(_max_locator(5))
        ax.yaxis.set_major_locator(_max_locator(5))
    axes[0].set_ylabel(r"$\beta$")
    if contour is not None:
        log_colorbar(fig, contour, axes, bounds, "train loss (log scale)")
    return fig
