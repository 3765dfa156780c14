"""What the figures draw: data, axes, scales, labels and files (a mutation audit of
sharpscope.plotting; each test kills a mutant the other tests let through).

Every check reads the returned matplotlib objects (line data, collections, containers,
labels, scales) or the written files, never just "it runs"."""

from __future__ import annotations

import dataclasses
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from sharpscope.analysis.correlation import Correlation  # noqa: E402
from sharpscope.analysis.landscape import LandscapeResult  # noqa: E402
from sharpscope.analysis.spectrum import Density  # noqa: E402
from sharpscope.errors import SharpscopeError  # noqa: E402
from sharpscope.plotting import study as study_plots  # noqa: E402
from sharpscope.plotting.landscape import (  # noqa: E402
    contour_levels,
    label_positions,
    level_format,
    plot_landscape_1d,
    plot_landscape_contour,
    plot_landscape_surface,
    save_landscape_plots,
)
from sharpscope.plotting.spectrum import FLOOR, plot_spectrum  # noqa: E402
from sharpscope.plotting.style import PALETTE, optimizer_color, save_figure  # noqa: E402
from sharpscope.plotting.training import plot_learned_rho, plot_training_curves  # noqa: E402
from sharpscope.results import RunMeta  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def landscape(x, y, loss, accuracy=None, kind="random", **fields):
    """A LandscapeResult holding the given grid (nothing computed from a model)."""
    loss = torch.as_tensor(np.asarray(loss, dtype=float))
    acc = torch.full_like(loss, math.nan) if accuracy is None else torch.as_tensor(accuracy)
    dims = 1 if y is None else 2
    values = {
        "x": torch.as_tensor(np.asarray(x, dtype=float)),
        "y": None if y is None else torch.as_tensor(np.asarray(y, dtype=float)),
        "loss": loss,
        "accuracy": acc,
        "computed": torch.ones_like(loss),
        "directions": torch.zeros(dims, 3),
        "direction_kind": kind,
        "norm": "filter",
        "bias": "zero",
        "states": False,
        "cosine": None,
        "direction_norms": [1.0] * dims,
        "eigenvalues": None,
        "explained_variance_ratio": None,
        "trajectory": None,
        "complete": True,
        "settings": {},
        "loss_name": "cross_entropy",
        "seconds": 0.0,
        "meta": RunMeta(data={"name": "digits", "split": "train"}, num_samples=64),
    }
    values.update(fields)
    return LandscapeResult(**values)


ALPHA = np.linspace(-1.0, 1.0, 9)
BETA = np.linspace(-0.5, 0.5, 5)  # not square: a transposed grid cannot be drawn


def alpha_only():
    """f(α, β) = α: contour lines are vertical, at α = level."""
    return landscape(ALPHA, BETA, np.repeat(ALPHA[:, None], len(BETA), axis=1))


# ------------------------------------------------------------------ landscapes


def test_contour_lines_sit_where_the_loss_has_their_level_and_are_labelled():
    result = alpha_only()
    fig = plot_landscape_contour(result)
    ax = fig.axes[0]
    (cs,) = [c for c in ax.collections if hasattr(c, "levels")]
    levels = contour_levels(result.loss.numpy())
    np.testing.assert_allclose(cs.levels, levels)
    assert levels[-1] == pytest.approx(np.percentile(result.loss.numpy(), 95))
    for level, path in zip(cs.levels, cs.get_paths()):
        if len(path.vertices):
            np.testing.assert_allclose(path.vertices[:, 0], level, atol=1e-9)  # x = α
            assert path.vertices[:, 1].min() == pytest.approx(BETA.min())
    # every other level from the second (the lowest is the minimum) is labelled, once, on
    # its own line, within a quarter of the level spacing; not the line at the edge α = 1
    # (a label there would be cut by the frame)
    assert levels[-1] == 1.0
    labelled = levels[1:-1:2]
    labels = [(float(t.get_text()), t.get_position()) for t in ax.texts]
    assert [text for text, _ in labels] == pytest.approx(labelled, abs=np.diff(levels)[0] / 4)
    for (_, (x, _)), level in zip(labels, labelled):
        assert x == pytest.approx(level, abs=1e-6)
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("α", "β")
    assert ax.get_title() == (
        "train loss\nrandom; norm=filter, bias=zero; digits/train n=64\neval mode, float32"
    )
    moved = landscape(ALPHA, BETA, result.loss, states=True)
    assert (
        plot_landscape_contour(moved)
        .axes[0]
        .get_title()
        .endswith("eval mode, BN stats moved, float32")
    )


def bowl_landscape(span=5.0):
    """A minimum at the centre whose loss spans a decade and a half over the grid (1.66 to
    50) and whose accuracy peaks there (0.38) and falls towards chance (0.06) at the edges."""
    a = np.linspace(-span, span, 13)
    bowl = a[:, None] ** 2 + 0.6 * a[None, :] ** 2
    return landscape(a, a, 1.66 + 1.2 * bowl, accuracy=0.06 + 0.32 * np.exp(-bowl / 8))


def test_b3_accuracy_contours_reach_the_peak_around_the_solution():
    """Session 27, B3: the levels stopped at the 95th percentile, as for a loss, so the
    basin around the star (accuracy above it) had no contour line."""
    result = bowl_landscape()
    accuracy = result.accuracy.numpy()
    ax = plot_landscape_contour(result, metric="accuracy").axes[0]
    (cs,) = [c for c in ax.collections if hasattr(c, "levels")]
    assert cs.levels[-1] == pytest.approx(accuracy.max())
    assert cs.levels[0] == pytest.approx(np.percentile(accuracy, 5))
    inner = [level for level in cs.levels if level > np.percentile(accuracy, 95)]
    assert len(inner) >= 2  # lines inside the basin, drawn around the centre
    assert all(len(cs.allsegs[list(cs.levels).index(level)]) for level in inner[:-1])
    with pytest.raises(SharpscopeError, match="unknown cut 'middle'"):
        contour_levels(accuracy, cut="middle")


def test_a_loss_spanning_decades_gets_log_levels_and_a_colour_bar():
    """Session 27 (doubts): at span 5 the loss ran 1.66 to 99 on linear levels; the whole
    basin lay inside the first labelled line. As the study's contours: log levels."""
    result = bowl_landscape()
    loss = result.loss.numpy()
    fig = plot_landscape_contour(result)
    ax, bar = fig.axes
    (cs,) = [c for c in ax.collections if hasattr(c, "levels")]
    np.testing.assert_allclose(cs.levels, np.geomspace(loss.min(), loss.max(), 12))
    assert bar.get_ylabel() == "train loss, log scale"
    assert bar.get_yscale() == "log"
    ticks = [t.get_text() for t in bar.get_yticklabels()]
    assert ticks[0] == "1.7" and ticks[-1] == "50" and len(set(ticks)) == len(ticks) == 5
    # levels 2.3 and 4.2 circle the minimum: the basin has lines of its own now
    assert [t.get_text() for t in ax.texts][:2] == ["2.3", "4.2"]
    # within a decade (or with levels given) the levels stay linear, with no colour bar
    assert len(plot_landscape_contour(alpha_only()).axes) == 1
    fig = plot_landscape_contour(result, levels=[5.0, 10.0, 20.0])
    assert len(fig.axes) == 1


def test_pca_contour_labels_axes_with_explained_variance_and_draws_the_trajectory():
    path = torch.tensor([[0.5, -0.25], [0.25, -0.1], [0.0, 0.0]])
    result = alpha_only()
    result = landscape(
        ALPHA,
        BETA,
        result.loss,
        kind="pca",
        explained_variance_ratio=torch.tensor([0.625, 0.25]),
        trajectory=path,
    )
    ax = plot_landscape_contour(result).axes[0]
    assert ax.get_xlabel() == "PC1 (62.5% var.)" and ax.get_ylabel() == "PC2 (25.0% var.)"
    (drawn,) = [line for line in ax.lines if len(line.get_xdata()) == 3]
    np.testing.assert_allclose(drawn.get_xdata(), path[:, 0].numpy())
    np.testing.assert_allclose(drawn.get_ydata(), path[:, 1].numpy())


def test_surface_spans_the_grid_on_the_right_axes_and_labels_the_metric():
    result = alpha_only()
    ax = plot_landscape_surface(result).axes[0]
    assert ax.name == "3d"
    np.testing.assert_allclose(ax.xy_dataLim.intervalx, [-1.0, 1.0])  # α on x
    np.testing.assert_allclose(ax.xy_dataLim.intervaly, [-0.5, 0.5])  # β on y
    np.testing.assert_allclose(ax.zz_dataLim.intervalx, [-1.0, 1.0])
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_zlabel()) == ("α", "β", "train loss")
    acc = np.full((len(ALPHA), len(BETA)), 0.5)
    with_accuracy = landscape(ALPHA, BETA, result.loss, accuracy=acc)
    assert plot_landscape_surface(with_accuracy, metric="accuracy").axes[0].get_zlabel() == (
        "train accuracy"
    )


def test_1d_curve_draws_the_loss_and_the_accuracy_on_a_twin_axis():
    x = np.linspace(-0.5, 1.5, 5)
    loss, acc = [3.0, 1.0, 0.5, 1.0, 2.0], [0.2, 0.6, 0.9, 0.7, 0.4]
    result = landscape(x, None, loss, accuracy=torch.tensor(acc), kind="interpolation")
    fig = plot_landscape_1d(result)
    main, twin = fig.axes
    curve = main.lines[0]
    np.testing.assert_allclose(curve.get_xdata(), x)
    np.testing.assert_allclose(curve.get_ydata(), loss)
    np.testing.assert_allclose(twin.lines[0].get_ydata(), acc)
    # session 27: the right axis said "accuracy" beside "train loss": both name the split
    assert twin.get_ylabel() == "train accuracy" and main.get_ylabel() == "train loss"
    assert main.get_xlabel() == "α (0: model A, 1: model B)"
    marks = sorted(line.get_xdata()[0] for line in main.lines[1:])
    assert marks == [0.0, 1.0]
    # no accuracy (e.g. a regression loss): no twin axis
    alone = plot_landscape_1d(landscape(x, None, loss, kind="interpolation"))
    assert len(alone.axes) == 1


def test_save_landscape_plots_writes_contour_and_surface_as_pdf_and_png(tmp_path):
    written = save_landscape_plots(alpha_only(), tmp_path, stem="ls")
    assert sorted(p.name for p in written) == [
        "ls_contour.pdf",
        "ls_contour.png",
        "ls_surface.pdf",
        "ls_surface.png",
    ]
    assert all(p.stat().st_size > 0 for p in written)


# ------------------------------------------------------------------ save_figure


def test_png_is_written_at_200_dpi(tmp_path):
    fig = plt.figure(figsize=(2.0, 1.0))
    fig.add_subplot().plot([0, 1], [0, 1])
    save_figure(fig, tmp_path / "line")
    with Image.open(tmp_path / "line.png") as image:
        assert image.info["dpi"] == pytest.approx((200, 200), abs=0.1)


def test_a_png_suffix_also_names_both_files(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    written = save_figure(fig, tmp_path / "curve.png")
    assert written == [tmp_path / "curve.pdf", tmp_path / "curve.png"]
    assert (tmp_path / "curve.pdf").read_bytes().startswith(b"%PDF")
    assert not (tmp_path / "curve.png.pdf").exists()


def test_a_dotted_stem_keeps_its_whole_name(tmp_path):
    """Path.with_suffix made sam_rho0.05 and sam_rho0.1 both sam_rho0.pdf/.png."""
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    first = save_figure(fig, tmp_path / "sam_rho0.05.pdf")
    second = save_figure(fig, tmp_path / "sam_rho0.1", data={"rho": 0.1})
    assert [p.name for p in first] == ["sam_rho0.05.pdf", "sam_rho0.05.png"]
    assert [p.name for p in second] == ["sam_rho0.1.pdf", "sam_rho0.1.png", "sam_rho0.1.json"]


# ------------------------------------------------------------------ spectrum


def log_density():
    grid = torch.linspace(-10.0, 2.0, 50)
    values = torch.exp(-((grid + 4.0) ** 2))  # underflows to 0 at the right edge
    return Density(
        grid=grid,
        values=values,
        nodes=torch.zeros(1, 2),
        weights=torch.zeros(1, 2),
        sigma=0.1,
        units="log(|eigenvalue| + 1e-5)",
        deflated=torch.tensor([5.0, 2.0]),
    )


def test_log_unit_density_marks_the_outliers_in_log_units():
    density = log_density()
    ax = plot_spectrum(density).axes[0]
    curve = ax.lines[0]
    np.testing.assert_allclose(curve.get_xdata(), density.grid.numpy())
    expected = np.maximum(density.values.numpy(), FLOOR)
    np.testing.assert_allclose(curve.get_ydata(), expected)
    marked = [line.get_xdata()[0] for line in ax.lines[1:]]
    np.testing.assert_allclose(marked, np.log(np.array([5.0, 2.0]) + 1e-5))
    assert ax.get_xlabel() == "ln(|eigenvalue| + 1e-5)"
    assert ax.get_legend_handles_labels()[1][1] == "top 2 eigenvalues, λ1 = 5"
    assert ax.get_yscale() == "log"


# ------------------------------------------------------------------ training curves


def test_rows_without_kind_are_epochs_and_runs_of_one_optimizer_get_different_dashes():
    history = [{"epoch": 1, "test_acc": 0.5, "train_loss": 1.0}, {"epoch": 2, "test_acc": 0.75}]
    fig = plot_training_curves(
        {"sam-rho0.05": history, "sam-rho0.1": history, "sgd": history},
        metrics=("test_acc", "train_loss"),
    )
    error, loss = fig.axes[:2]
    assert [line.get_linestyle() for line in error.lines] == ["-", "--", "-"]
    assert [line.get_color() for line in error.lines] == [PALETTE[0], PALETTE[0], PALETTE[7]]
    np.testing.assert_allclose(error.lines[0].get_xdata(), [1, 2])
    np.testing.assert_allclose(error.lines[0].get_ydata(), [50.0, 25.0])
    np.testing.assert_allclose(loss.lines[0].get_xdata(), [1])  # epoch 2 has no train_loss
    assert error.get_ylabel() == "test error (%)"
    assert loss.get_ylabel() == "train loss (cross-entropy)"
    assert all(ax.get_xlabel() == "epoch" for ax in (error, loss))


def test_an_unknown_training_metric_is_one_line_naming_the_known_ones():
    """Session 27: metrics=("foo",) silently gave an empty panel."""
    history = [{"kind": "eval", "epoch": 1, "test_acc": 0.5, "test_ece": 0.1}]
    with pytest.raises(SharpscopeError, match="^unknown metric 'foo'; choose from train_loss, "
                       "train_acc, test_loss, test_acc, test_ece$"):  # fmt: skip
        plot_training_curves({"sgd": history}, metrics=("test_acc", "foo"))
    assert plt.get_fignums() == []  # refused before a figure was made
    # a metric some run logged is drawn for the runs that have it; one `train` always logs
    # is known even where a hand-made history lacks it (an empty panel, as before)
    other = [{"kind": "eval", "epoch": 1, "train_loss": 1.0}]
    fig = plot_training_curves({"sgd": history, "sam": other}, metrics=("test_ece", "test_loss"))
    assert [line.get_label() for line in fig.axes[0].lines] == ["SGD"]
    assert not fig.axes[1].lines


def test_learned_rho_is_plotted_against_the_optimizer_step():
    rows = [
        {"kind": "step", "epoch": 1, "step": 10, "rho": 0.05},
        {"kind": "step", "epoch": 1, "step": 20, "rho": 0.07},
        {"kind": "step", "epoch": 2, "step": 30, "rho": 0.04},
    ]
    ax = plot_learned_rho({"lets": rows}).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [10, 20, 30])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.05, 0.07, 0.04])
    assert ax.get_xlabel() == "optimizer step"


def test_b6_a_rho_that_barely_moved_is_drawn_as_its_change_from_a_named_rho0():
    """Session 27, B6: with useOffset=False a ρ that moved by 1e-10 got ticks like
    "0.05000000006"; now the curve is ρ − 0.05, and the label says so."""
    rows = [{"kind": "step", "step": s, "rho": 0.05 + d} for s, d in ((1, 0), (2, 4e-11))]
    ax = plot_learned_rho({"LETS (seed 0)": rows}).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.0, 4e-11], atol=1e-16)
    assert ax.get_ylabel() == r"learned $\rho$ $-$ 0.05"
    assert ax.get_legend_handles_labels()[1] == ["LETS (seed 0)"]
    ax.figure.draw_without_rendering()
    assert not any("0.0500" in t.get_text() for t in ax.get_yticklabels())
    # a ρ that moved is drawn as it is
    moved = [{"kind": "step", "step": 1, "rho": 0.05}, {"kind": "step", "step": 2, "rho": 0.06}]
    ax = plot_learned_rho({"lets": moved}).axes[0]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.05, 0.06])
    assert ax.get_ylabel() == r"learned $\rho$"


# ------------------------------------------------------------------ study figures


def rows_for(values, column="lambda_max", optimizers=("sgd", "sam")):
    out = []
    for index, value in enumerate(values):
        optimizer = optimizers[index % len(optimizers)]
        out.append({"optimizer": optimizer, column: value, "gen_gap": 0.01 * (index + 1)})
    return out


def test_measure_axis_is_logarithmic_only_for_a_wide_positive_spread():
    narrow = study_plots.plot_measure_vs_gap(rows_for([1.0, 5.0, 20.0]), "lambda_max")
    assert narrow.axes[0].get_xscale() == "linear"
    wide = study_plots.plot_measure_vs_gap(rows_for([1.0, 5.0, 100.0]), "lambda_max")
    assert wide.axes[0].get_xscale() == "log"


def test_scatter_legend_uses_display_names_and_axes_name_the_columns():
    ax = study_plots.plot_measure_vs_gap(rows_for([1.0, 2.0]), "lambda_max").axes[0]
    assert ax.get_legend_handles_labels()[1] == ["SGD", "SAM"]
    assert ax.get_xlabel() == r"$\lambda_{\max}$ of the Hessian"
    assert ax.get_ylabel() == "generalization gap (test − train error, %)"
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[1.0, 1.0]])


def test_error_increase_columns_are_labelled_as_such():
    assert study_plots.axis_label("msharp_err_m16_rho0.05") == (
        "m-sharpness, error increase (m=16, ρ=0.05)"
    )
    assert study_plots.axis_label("asharp_err_m4_rho0.5") == (
        "adaptive sharpness, error increase (m=4, ρ=0.5)"
    )


def sweep_rows():
    """Two optimizers, three learning rates given out of order, three seeds."""
    rows = []
    for optimizer, lr, seed in [
        (o, lr, s) for o in ("sgd", "sam") for lr in (0.1, 0.01, 1.0) for s in (0, 1, 2)
    ]:
        acc = 0.9 - 0.1 * seed - (0.05 if optimizer == "sgd" else 0.0) - lr / 10
        rows.append({"optimizer": optimizer, "lr": lr, "seed": seed, "test_acc": acc})
    return rows


def test_metric_vs_axis_draws_mean_error_and_sample_sd_in_sorted_x_order():
    fig = study_plots.plot_metric_vs_axis(sweep_rows(), "lr", "test_acc", logx=True)
    ax = fig.axes[0]
    sgd = ax.containers[0]
    line = sgd.lines[0]
    np.testing.assert_allclose(line.get_xdata().astype(float), [0.01, 0.1, 1.0])
    # errors in percent: seeds give 0.85, 0.75, 0.65 minus lr/10 -> mean error 25 + 10 lr
    np.testing.assert_allclose(line.get_ydata().astype(float), [25.1, 26.0, 35.0])
    (bars,) = sgd.lines[2]
    half = [seg[1, 1] - seg[0, 1] for seg in bars.get_segments()]
    np.testing.assert_allclose(half, [2 * 10.0] * 3)  # sample sd (ddof=1) of 3 seeds: 10 %
    assert ax.get_xscale() == "log" and ax.xaxis.get_transform().base == 2
    assert ax.get_ylabel() == "test error (%)" and ax.get_xlabel() == "learning rate"
    summary = study_plots.mean_and_spread(sweep_rows(), "lr", "test_acc")
    assert summary[0]["test_error_pct_std"] == pytest.approx(10.0)


def test_label_noise_axis_is_in_percent():
    rows = [
        {"optimizer": "sgd", "label_noise": noise, "test_acc": 0.8 - noise}
        for noise in (0.0, 0.2, 0.4)
    ]
    ax = study_plots.plot_metric_vs_axis(rows, "label_noise").axes[0]
    np.testing.assert_allclose(
        ax.containers[0].lines[0].get_xdata().astype(float), [0.0, 20.0, 40.0]
    )
    assert ax.get_xscale() == "linear"


def correlation(measure, tau, tau_interval, overall, overall_interval):
    return Correlation(
        measure=measure,
        target="gen_gap",
        num_models=8,
        tau=tau,
        p_value=0.01,
        tau_interval=tau_interval,
        psi={},
        num_groups={},
        psi_interval={},
        overall=overall,
        overall_interval=overall_interval,
    )


def test_correlation_dots_and_intervals_are_tau_and_psi_of_each_measure():
    correlations = [
        correlation("lambda_max", 0.5, (0.1, 0.6), -0.2, (-0.3, 0.4)),
        correlation("trace", 0.3, (0.2, 0.9), 0.7, (0.65, 0.8)),
    ]
    ax = study_plots.plot_correlations(correlations).axes[0]
    tau, psi = ax.containers
    assert tau.get_label() == r"Kendall $\tau$" and psi.get_label() == r"granulated $\Psi$"
    np.testing.assert_allclose(tau.lines[0].get_xdata(), [0.5, 0.3])
    np.testing.assert_allclose(psi.lines[0].get_xdata(), [-0.2, 0.7])
    np.testing.assert_allclose(tau.lines[0].get_ydata(), [-0.15, 0.85])
    (bars,) = tau.lines[2]
    np.testing.assert_allclose([s[:, 0] for s in bars.get_segments()], [[0.1, 0.6], [0.2, 0.9]])
    (bars,) = psi.lines[2]
    np.testing.assert_allclose([s[:, 0] for s in bars.get_segments()], [[-0.3, 0.4], [0.65, 0.8]])
    assert ax.yaxis_inverted()  # the first measure on top
    assert [t.get_text() for t in ax.get_yticklabels()] == [
        r"$\lambda_{\max}$ of the Hessian",
        "Hessian trace",
    ]


def test_tau_vs_m_intervals_reach_both_bounds():
    points = [
        {"m": 4, "rho": 0.05, "tau": 0.5, "tau_low": 0.2, "tau_high": 0.7},
        {"m": 16, "rho": 0.05, "tau": 0.3, "tau_low": -0.1, "tau_high": 0.4},
    ]
    ax = study_plots.plot_tau_vs_m(points).axes[0]
    (container,) = ax.containers
    np.testing.assert_allclose(container.lines[0].get_xdata().astype(float), [4, 16])
    (bars,) = container.lines[2]
    np.testing.assert_allclose([s[:, 1] for s in bars.get_segments()], [[0.2, 0.7], [-0.1, 0.4]])
    assert ax.get_xscale() == "log" and ax.get_ylim() == (-1.05, 1.05)


def test_variant_bars_are_means_over_seeds_with_the_metric_label():
    rows = [
        {"optimizer": "sgd", "lambda_max": v, "test_acc": a}
        for v, a in ((1.0, 0.9), (2.0, 0.8), (9.0, 0.7))
    ] + [{"optimizer": "sam", "lambda_max": 0.5, "test_acc": 0.95}]
    fig = study_plots.plot_variants(rows, ("test_acc", "lambda_max"))
    error, top = fig.axes
    np.testing.assert_allclose([p.get_height() for p in top.patches], [4.0, 0.5])
    np.testing.assert_allclose([p.get_height() for p in error.patches], [20.0, 5.0])
    assert error.get_ylabel() == "test error (%)"
    assert top.get_ylabel() == r"$\lambda_{\max}$ of the Hessian"
    assert [t.get_text() for t in top.get_xticklabels()] == ["SGD", "SAM"]


def test_spectral_densities_are_log_scale_in_epoch_order():
    curve = {"grid": [0.0, 1.0, 2.0], "values": [0.1, 1.0, 0.0]}
    fig = study_plots.plot_spectral_densities({"sam": [(5, curve), (1, curve)]})
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert [line.get_label() for line in ax.lines] == ["epoch 1", "epoch 5"]
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [0.1, 1.0, FLOOR])
    # the later epoch is drawn in the stronger shade
    first, last = (np.array(matplotlib.colors.to_rgb(line.get_color())) for line in ax.lines)
    assert np.abs(last - np.array(matplotlib.colors.to_rgb(PALETTE[0]))).max() < 1e-9
    assert first.sum() > last.sum()


def test_curves_1d_log_axis():
    fig = study_plots.plot_curves_1d({"sgd": ([0.0, 1.0], [1.0, 100.0])}, logy=True)
    assert fig.axes[0].get_yscale() == "log"
    assert study_plots.plot_curves_1d({"sgd": ([0.0], [1.0])}).axes[0].get_yscale() == "linear"


def test_filled_contours_keep_beta_on_the_vertical_axis():
    alpha, beta = np.linspace(-1, 1, 5), np.linspace(-1, 1, 5)
    loss = np.exp(np.repeat(beta[None, :], 5, axis=0))  # low loss at low β
    ax = study_plots.plot_contours({"sam": (alpha, beta, loss)}).axes[0]
    (filled,) = [c for c in ax.collections if getattr(c, "filled", False)]
    lowest = filled.get_paths()[0].vertices
    assert lowest[:, 1].max() < 0.0  # the lowest band lies at β < 0


def test_optimizer_colours_for_variants_and_unknown_labels():
    assert optimizer_color("sam-rho0.1", 3) == optimizer_color("SAM") == PALETTE[0]
    assert optimizer_color("vasso-rho0.1") == PALETTE[2]
    # unknown labels cycle the palette without black (kept for references)
    assert [optimizer_color("mine", i) for i in range(8)] == [*PALETTE[:7], PALETTE[0]]


def test_overlaid_spectra_get_their_own_colours_and_legend_entries():
    """Two densities drawn into one axes (SGD against SAM, as the notebooks do) must be told
    apart: each curve and its eigenvalue marks share a colour, different from the other's."""
    density = log_density()
    ax = plot_spectrum(density, label="SGD").axes[0]
    plot_spectrum(density, ax=ax, label="SAM")
    curves = [line for line in ax.lines if line.get_linestyle() == "-"]
    marks = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert [c.get_color() for c in curves] == [PALETTE[0], PALETTE[1]]
    assert [m.get_color() for m in marks] == [PALETTE[0]] * 2 + [PALETTE[1]] * 2
    labels = ax.get_legend_handles_labels()[1]
    assert labels == ["SGD", "SGD: top 2, λ1 = 5", "SAM", "SAM: top 2, λ1 = 5"]
    assert not ax.texts  # a λ1 label beside its mark ran into the other spectrum's marks
    ax = plot_spectrum(density, label="SAM", color=optimizer_color("sam")).axes[0]
    assert {line.get_color() for line in ax.lines} == {optimizer_color("sam")}


def test_an_overlay_titles_only_what_its_spectra_share():
    """The title was the last spectrum's caption alone, though the curves differed."""
    narrow, wide = log_density(), dataclasses.replace(log_density(), sigma=0.5)
    ax = plot_spectrum(narrow, label="SGD").axes[0]
    alone = ax.get_title()
    plot_spectrum(narrow, ax=ax, label="SGD again")
    assert ax.get_title() == alone  # the same caption stays whole
    plot_spectrum(wide, ax=ax, label="SAM")
    assert "σ=" not in ax.get_title() and "σ=" in alone
    assert "σ=0.5" in plot_spectrum(wide).axes[0].get_title()


def spectrum_of(eigenvalues, which="LA", sigma=0.0072, num_samples=256):
    """A Spectrum of ``log_density``'s curve (in eigenvalue units) with these marks."""
    from sharpscope.analysis.spectrum import Spectrum, TopEigs

    top = TopEigs(
        eigenvalues=torch.tensor(eigenvalues, dtype=torch.float64),
        residuals=torch.zeros(len(eigenvalues)),
        converged=[True] * len(eigenvalues),
        which=which,
    )
    density = dataclasses.replace(log_density(), units="eigenvalue", sigma=sigma, deflated=None)
    meta = RunMeta(data={"name": "mnist1d", "split": "train"}, num_samples=num_samples)
    return Spectrum(top=top, density=density, meta=meta)


def test_b1_which_sa_and_lm_marks_are_named_as_chosen_with_their_extreme_value():
    """Session 27, B1: `--which SA` was plotted as "top 5 eigenvalues, λ1 = -0.264" (the
    least negative of the five); LM showed the largest algebraic value as λ1."""
    sa = [-0.2645, -0.27, -0.28, -0.285, -0.2913]
    ax = plot_spectrum(spectrum_of(sa, "SA")).axes[0]
    assert ax.get_legend_handles_labels()[1][1] == "5 most negative eigenvalues, λmin = -0.291"
    lm = [0.2, 0.1, -0.3]
    ax = plot_spectrum(spectrum_of(lm, "LM"), label="SGD").axes[0]
    assert ax.get_legend_handles_labels()[1][1] == "SGD: 3 largest |λ|, λ = -0.3"
    ax = plot_spectrum(spectrum_of(lm, "LA")).axes[0]
    assert ax.get_legend_handles_labels()[1][1] == "top 3 eigenvalues, λ1 = 0.2"


def test_b2_an_overlay_keeps_data_and_kernel_in_the_title_and_legends_name_the_rest():
    """Session 27, B2: σ and N differ between overlaid spectra, and the kernel name and the
    data set went with them: the title read only "eval mode, float32"."""
    sam = spectrum_of([3.0, 2.0], sigma=0.0072, num_samples=256)
    sgd = spectrum_of([5.0, 4.0], sigma=0.011, num_samples=128)
    ax = plot_spectrum(sam, label="SAM").axes[0]
    assert ax.get_title().split("\n") == [
        "mnist1d (train); N=256; eval mode; float32",
        "ghorbani kernel; σ=0.0072",
    ]
    plot_spectrum(sgd, ax=ax, label="SGD")
    assert ax.get_title() == "mnist1d (train); eval mode; float32; ghorbani kernel"
    labels = ax.get_legend_handles_labels()[1]
    assert labels == [
        "SAM (N=256, σ=0.0072)",
        "SAM: top 2, λ1 = 3",
        "SGD (N=128, σ=0.011)",
        "SGD: top 2, λ1 = 5",
    ]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels


def test_surface_axes_keep_few_ticks_and_the_spectrum_legend_has_a_box():
    """A 3-D surface foreshortens its axes: nine ticks ran into each other. The spectrum's
    legend sits where the top eigenvalues are marked: an opaque box keeps the marks off it."""
    ax = plot_landscape_surface(alpha_only()).axes[0]
    ax.figure.canvas.draw()
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        ticks = axis.get_major_locator().tick_values(-1.0, 1.0)
        assert len([t for t in ticks if -1.0 <= t <= 1.0]) <= 6  # the default drew 9
    legend = plot_spectrum(log_density(), label="SAM").axes[0].get_legend()
    assert legend.get_frame_on() and legend.get_frame().get_alpha() >= 0.9


@pytest.mark.parametrize("overlays", [1, 2, 3])
def test_the_spectrum_legend_sits_above_every_curve_and_mark(overlays):
    """The marks ran the full height of the axes, through the legend."""
    ax = None
    for i in range(overlays):
        density = dataclasses.replace(log_density(), values=log_density().values * 10.0**i)
        ax = plot_spectrum(density, ax=ax, label=f"run {i}").axes[0]
    ax.figure.draw_without_rendering()
    legend_bottom = ax.get_legend().get_window_extent().y0
    for line in ax.get_lines():
        points = ax.transData.transform(np.column_stack([line.get_xdata(), line.get_ydata()]))
        assert points[:, 1].max() < legend_bottom, line.get_label()


def test_plotting_leaves_the_callers_matplotlib_settings_as_they_were():
    """The figures get sharpscope's theme; the user's own later figures keep theirs."""
    import sharpscope as ss

    torch.manual_seed(0)
    data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    result = ss.landscape(torch.nn.Linear(3, 2), data, 1, grid=5)
    with matplotlib.rc_context({"font.size": 14, "axes.grid": False, "savefig.bbox": None}):
        before = dict(plt.rcParams)
        result.plot()
        after = dict(plt.rcParams)
    assert not {k for k in before if before[k] != after[k]}
    plt.close("all")


def test_a_1d_slice_with_diverged_points_keeps_its_grid_and_marks_them():
    x = np.linspace(-1e30, 1e30, 5)
    loss = np.array([np.nan, np.inf, 0.5, np.nan, np.nan])
    ax = plot_landscape_1d(landscape(x, None, loss)).axes[0]
    lo, hi = ax.get_xlim()
    assert lo <= -1e30 and hi >= 1e30  # the whole grid, not the one finite point
    marked = [line for line in ax.lines if line.get_label() == "non-finite"]
    assert len(marked) == 1 and len(marked[0].get_xdata()) == 4
    with pytest.raises(SharpscopeError, match="no computed finite loss"):
        plot_landscape_1d(landscape(x, None, np.full(5, np.nan)))


def test_a_flat_2d_landscape_says_so_instead_of_an_empty_contour():
    ax = plot_landscape_contour(landscape(ALPHA, BETA, np.full((9, 5), 0.25))).axes[0]
    assert any("flat: loss = 0.25" in text.get_text() for text in ax.texts)


def test_a_density_without_finite_values_is_one_line():
    density = log_density()
    broken = Density(**{**density.__dict__, "values": torch.full_like(density.values, math.nan)})
    with pytest.raises(SharpscopeError, match="no finite values"):
        plot_spectrum(broken)


def test_a_wide_legend_takes_fewer_columns_than_the_figure_is_wide():
    from sharpscope.plotting.style import figure_legend, new_figure

    fig, ax = new_figure(1)
    for i in range(7):
        ax.plot([0, 1], [i, i], label=f"a rather long setting name number {i}")
    figure_legend(fig, [ax])
    (legend,) = fig.legends
    assert legend.get_window_extent(fig.canvas.get_renderer()).width <= fig.bbox.width
    assert 1 <= legend._ncols < 7


def test_a_narrow_density_has_no_axis_offset_and_no_minor_tick_comb():
    """H ≈ 2·I: matplotlib would print an offset ("1e-6+6.93e-1") over the x label."""
    nodes = np.full((2, 3), 2.0) + np.array([[0.0, 1e-7, 2e-7]])
    density = Density.from_quadrature(nodes, np.full((2, 3), 1 / 3), dim=3, kernel="log")
    fig = plot_spectrum(density)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.xaxis.get_offset_text().get_text() == ""
    assert not ax.yaxis.get_minor_locator()()


def test_linear_measure_axes_ask_for_at_most_five_ticks():
    """Four-decimal labels (0.0150 0.0175 ...) ran together at the default tick density."""
    from matplotlib.ticker import MaxNLocator

    ax = study_plots.plot_measure_vs_gap(
        rows_for([0.015 + 0.0025 * i for i in range(8)]), "lambda_max"
    ).axes[0]
    locator = ax.xaxis.get_major_locator()
    assert isinstance(locator, MaxNLocator) and locator._nbins == 5


# ------------------------------------------------------------ session 16 figure review


def rho_lr_rows():
    """SAM over ρ and lr, three seeds; the lr effect (10 points) dwarfs the seed spread (1)."""
    return [
        {"optimizer": "sam", "rho": rho, "lr": lr, "seed": seed,
         "test_acc": 0.7 - (0.1 if lr == 0.05 else 0.0) - 0.01 * seed}
        for rho in (0.05, 0.2) for lr in (0.05, 0.1) for seed in (0, 1, 2)
    ]  # fmt: skip


def test_spread_over_seeds_pools_only_seeds_when_another_axis_varies():
    summary = study_plots.mean_and_spread(rho_lr_rows(), "rho", "test_acc")
    assert len(summary) == 4 and all(s["num_seeds"] == 3 for s in summary)
    assert {s["lr"] for s in summary} == {0.05, 0.1}
    for s in summary:  # errors 30/31/32 % or 40/41/42 %: sd 1 point, not the lr effect
        assert s["test_error_pct_std"] == pytest.approx(1.0)
        assert s["test_error_pct_mean"] == pytest.approx(41.0 if s["lr"] == 0.05 else 31.0)
    ax = study_plots.plot_metric_vs_axis(rho_lr_rows(), "rho").axes[0]
    labels = [c.get_label() for c in ax.containers]
    assert labels == ["SAM (lr=0.05)", "SAM (lr=0.1)"]
    assert ax.containers[0].lines[0].get_linestyle() != ax.containers[1].lines[0].get_linestyle()
    bars = study_plots.plot_variants(rho_lr_rows(), ("test_acc",)).axes[0]
    names = [t.get_text() for t in bars.get_xticklabels()]
    assert len(names) == 4 and len(set(names)) == 4
    np.testing.assert_allclose(sorted(p.get_height() for p in bars.patches), [31, 31, 41, 41])
    assert study_plots.varying_settings(rho_lr_rows(), "optimizer", "lr") == ["rho"]


def test_a_single_seed_draws_no_error_bars():
    rows = [r for r in rho_lr_rows() if r["seed"] == 0 and r["lr"] == 0.1]
    ax = study_plots.plot_metric_vs_axis(rows, "rho").axes[0]
    assert ax.containers[0].lines[2] == ()  # no error-bar segments


def test_every_run_of_one_optimizer_gets_its_own_line_style():
    history = [{"epoch": e, "test_acc": 0.5} for e in range(1, 31)]
    runs = {f"sam-{i}": history for i in range(6)}
    fig, axes = plt.subplots(1, 2)  # an ndarray of axes, as plt.subplots returns it
    plot_training_curves(runs, axes=axes)
    styles = [(line.get_linestyle(), line.get_marker()) for line in axes[0].lines]
    assert len(set(styles)) == 6
    with pytest.raises(SharpscopeError, match="2 metrics need 2 axes"):
        plot_training_curves(runs, axes=axes[:1])


def test_landscape_figures_name_the_metric_and_an_incomplete_grid():
    acc = np.full((len(ALPHA), len(BETA)), 0.5)
    result = landscape(ALPHA, BETA, alpha_only().loss, accuracy=acc, settings={"loss": "mse"})
    title = plot_landscape_contour(result, metric="accuracy").axes[0].get_title()
    assert title.startswith("train accuracy\n")
    assert plot_landscape_contour(result).axes[0].get_title().startswith("train loss (mse)\n")
    result.settings["loss"] = "cross_entropy"  # the built-in, in words
    assert (
        plot_landscape_contour(result)
        .axes[0]
        .get_title()
        .startswith("train loss (cross-entropy)\n")
    )
    result.computed[len(ALPHA) // 2 :] = 0
    title = plot_landscape_contour(result).axes[0].get_title()
    assert title.endswith(
        f"partial: {len(ALPHA) // 2 * len(BETA)} of {result.loss.numel()} points computed"
    )
    _, flat_ax = plt.subplots()
    with pytest.raises(SharpscopeError, match="3-D axis"):
        plot_landscape_surface(result, ax=flat_ax)


def test_a_long_data_name_wraps_the_title_within_one_column():
    meta = RunMeta(data={"factory": "experiments/" + "x" * 90 + ".py:make", "split": "train"})
    result = landscape(ALPHA, BETA, alpha_only().loss, meta=meta)
    fig = plot_landscape_contour(result)
    fig.canvas.draw()
    width = fig.get_tightbbox(fig.canvas.get_renderer()).width
    assert width <= 3.36, f"{width:.2f} in"


def test_contour_labels_share_one_precise_format():
    assert level_format(np.linspace(1.35, 2.1, 12)) == "%.2f"
    assert level_format(np.array([0.0, 0.165, 0.33])) == "%.2f"  # "%.1f" would be off by 0.045
    assert level_format(np.array([1e6, 2e6])) == "%.3g"


def test_label_positions_keep_away_from_the_frame():
    x = y = np.linspace(-1, 1, 21)
    fig, ax = plt.subplots()
    bowl = x[:, None] ** 2 + y[None, :] ** 2
    lines = ax.contour(x, y, bowl.T, levels=[0.25, 1.0, 1.9])
    positions = label_positions(lines, lines.levels, x, y)
    assert len(positions) == 2  # the 1.9 line only crosses the corners
    for px, py in positions:
        assert min(1 - abs(px), 1 - abs(py)) > 0.12


def test_empty_inputs_of_study_figures_are_one_line():
    with pytest.raises(SharpscopeError, match="no finite values of not_a_column"):
        study_plots.plot_measures_vs_gap(rows_for([1.0, 2.0]), ["not_a_column"])
    with pytest.raises(SharpscopeError, match="no correlations"):
        study_plots.plot_correlations([])


def test_four_spectra_are_two_by_two_with_given_titles():
    curve = {"grid": [0.0, 1.0, 2.0], "values": [0.1, 1.0, 0.0]}
    labels = ("sgd", "sam", "asam", "vasso")
    fig = study_plots.plot_spectral_densities(
        {k: [(1, curve), (5, curve)] for k in labels}, titles={"sam": "SAM ρ=0.05"}
    )
    axes = fig.axes
    assert axes[0].get_subplotspec().get_gridspec().get_geometry() == (2, 2)
    assert axes[1].get_title() == "SAM ρ=0.05" and axes[2].get_title() == "ASAM"
    assert [line.get_linestyle() for line in axes[0].lines] == ["--", "-"]  # last epoch solid


def test_study_contours_label_a_narrow_loss_range_with_enough_digits():
    """Losses from 2.28 to 2.42 read "2.3" on four of the five colour-bar ticks."""
    alpha = beta = np.linspace(-1, 1, 7)
    loss = 2.28 + 0.14 * (alpha[:, None] ** 2 + beta[None, :] ** 2) / 2
    fig = study_plots.plot_contours({"sgd": (alpha, beta, loss), "sam": (alpha, beta, loss)})
    bar = fig.axes[-1]
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert len(labels) == 5 and len(set(labels)) == 5, labels
    contour_labels = {t.get_text() for t in fig.axes[0].texts}  # a level may be labelled twice
    assert len(contour_labels) >= 3, contour_labels  # they read 2.3 and 2.4


def test_b4_study_contour_labels_are_not_cut_by_the_panel_frame():
    """Session 27, B4: plot_contours let matplotlib place its labels, often on the frame
    ("2.28" cut by the top edge, ".28" at the left)."""
    beta = np.linspace(-1, 1, 7)
    bowl = beta[:, None] ** 2 + beta[None, :] ** 2
    fig = study_plots.plot_contours(
        {
            "sgd": (beta, beta, 2.2 + 0.13 * bowl),
            "sam": (beta, beta, 2.25 + 0.1 * bowl + 0.05 * beta[:, None]),
            "lets": (beta, beta, 2.25 + 0.1 * bowl),
        }
    )
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:3]:
        assert ax.texts
        panel = ax.get_window_extent()
        for text in ax.texts:
            box = text.get_window_extent(renderer)
            inside = panel.x0 <= box.x0 and box.x1 <= panel.x1
            assert inside and panel.y0 <= box.y0 and box.y1 <= panel.y1, text.get_text()


def test_several_interpolations_of_one_optimizer_pair_get_their_own_colours():
    """All SGD -> SAM curves were drawn in SGD's black."""
    x = np.linspace(-0.5, 1.5, 5)
    curves = {f"sgd → sam (seed {s})": (x, x**2 + s) for s in range(3)}
    ax = study_plots.plot_curves_1d(curves).axes[0]
    assert len({line.get_color() for line in ax.get_lines()[:3]}) == 3


def test_a_log_measure_axis_labels_plain_ticks_and_no_minor_ones():
    """Over 1.5 decades the minor ticks were labelled too: "2×10^0 3×4×10^0 ..."."""
    values = np.geomspace(1.7, 60, 12)
    rows = [
        {"optimizer": "sgd" if i % 2 else "sam", "trace": float(v), "gen_gap": 0.01 * i}
        for i, v in enumerate(values)
    ]
    ax = study_plots.plot_measures_vs_gap(rows, ["trace"], "gen_gap").axes[0]
    ax.figure.draw_without_rendering()
    assert ax.get_xscale() == "log"
    low, high = ax.get_xlim()
    shown = [t.get_text() for t in ax.get_xticklabels() if low <= t.get_position()[0] <= high]
    assert shown == ["3", "10", "30"]
    assert not any(t.get_text() for t in ax.xaxis.get_minorticklabels())


@pytest.mark.parametrize("decades", [1.6, 2.0, 2.9, 5.0])
def test_log_measure_tick_labels_never_overlap_in_the_reports_grid(decades):
    """Eight measures in the report's three-per-row grid: 1-2-5 labels over 2.9 decades
    ran together ("0.0001000.0005...")."""
    rng = np.random.default_rng(0)
    names = [f"m{i}" for i in range(8)]
    rows = [
        {"optimizer": ("sgd", "sam")[j % 2], "gen_gap": 0.01 * j}
        | {n: float(10 ** rng.uniform(-4, -4 + decades)) for n in names}
        for j in range(12)
    ]
    fig = study_plots.plot_measures_vs_gap(rows, names, "gen_gap")
    fig.draw_without_rendering()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        boxes = [
            t.get_window_extent(renderer)
            for t in ax.get_xticklabels()
            if t.get_text() and ax.get_xlim()[0] <= t.get_position()[0] <= ax.get_xlim()[1]
        ]
        assert boxes
        for left, right in zip(boxes, boxes[1:]):
            assert left.x1 < right.x0, [t.get_text() for t in ax.get_xticklabels()]


def test_plot_spectrum_draws_into_axes_the_user_made():
    """An empty legend proxy, an all-NaN line and a subfigure raised tracebacks; a second
    panel sharing the y axis lowered the top the first panel's legend needed."""
    density = log_density()
    fig, ax = plt.subplots()
    ax.plot([], [], label="proxy")
    ax.plot([0.0, 1.0], [np.nan, np.nan])
    plot_spectrum(density, ax=ax)
    plot_spectrum(density, ax=plt.figure().subfigures(1, 2)[0].subplots())
    fig, (left, right) = plt.subplots(1, 2, sharey=True)
    big = dataclasses.replace(density, values=density.values * 1e4)
    plot_spectrum(big, ax=left, label="big")
    top = left.get_ylim()[1]
    plot_spectrum(density, ax=right, label="small")
    assert left.get_ylim()[1] >= top
    fig, ax = plt.subplots()
    ax.set_yscale("log")
    ax.set_ylim(1e-9, 1e6)  # a top the caller chose, higher than needed, is kept
    assert plot_spectrum(density, ax=ax).axes[0].get_ylim()[1] == 1e6


def test_measures_vs_gap_marks_the_second_swept_axis():
    """Review (session 18): the scatter encoded only the optimizer, so the two learning-rate
    clusters of the quick study (which drive the gap) could not be told apart."""
    rows = [
        {"optimizer": optimizer, "rho": rho, "lr": lr, "seed": seed,
         "gen_gap": 0.1 * lr + seed * 1e-3, "trace": 1.0 + lr + (rho or 0) + seed}
        for optimizer, rho in (("sgd", None), ("sam", 0.05), ("sam", 0.1))
        for lr in (0.05, 0.1)
        for seed in (0, 1)
    ]  # fmt: skip
    assert study_plots.second_axis(rows) == "lr"  # lr varies for both optimizers, ρ for one
    fig = study_plots.plot_measures_vs_gap(rows, ["trace"], "gen_gap")
    ax = fig.axes[0]
    drawn = [c for c in ax.collections if len(c.get_offsets())]
    assert sum(len(c.get_offsets()) for c in drawn) == len(rows)
    # one marker per lr, whatever the optimizer; one colour per optimizer, whatever the lr
    gaps = np.concatenate([c.get_offsets()[:, 1] for c in drawn])
    middle = (gaps.min() + gaps.max()) / 2  # the gap grows with lr: below it, lr 0.05
    markers, colours = {}, {}
    for collection in drawn:
        (low,) = {bool(y < middle) for y in collection.get_offsets()[:, 1]}  # one lr each
        shape = tuple(map(tuple, collection.get_paths()[0].vertices.round(6)))
        markers.setdefault(low, set()).add(shape)
        colours.setdefault(tuple(collection.get_facecolor()[0]), set()).add(low)
    assert all(len(shapes) == 1 for shapes in markers.values())
    assert markers[True] != markers[False]
    assert len(colours) == 2 and all(lrs == {True, False} for lrs in colours.values())
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["SGD", "SAM", "lr 0.05", "lr 0.1"]
    # style=None: the markers follow the optimizer, as before
    plain = study_plots.plot_measures_vs_gap(rows, ["trace"], "gen_gap", style=None)
    assert [t.get_text() for t in plain.legends[0].get_texts()] == ["SGD", "SAM"]
    single = [{**r, "lr": 0.1} for r in rows if r["optimizer"] == "sgd"]
    assert study_plots.second_axis(single) is None
    plt.close("all")


def test_the_marked_axis_takes_values_as_a_results_csv_gives_them():
    """Review: a NaN value (an empty cell) was dropped from the scatter, sums of floats
    read "lr 0.30000000000000004", and 0.05 and "0.05" got two markers under one entry."""
    rows = [
        {"optimizer": "sam", "rho": rho, "gen_gap": 0.1 * i, "trace": 1.0 + i}
        for i, rho in enumerate([0.1 + 0.2, "0.05", 0.05, float("nan"), None, 0.3, 0.05])
    ]
    fig = study_plots.plot_measures_vs_gap(rows, ["trace"], "gen_gap", style="rho")
    drawn = [c for c in fig.axes[0].collections if len(c.get_offsets())]
    assert sum(len(c.get_offsets()) for c in drawn) == len(rows)  # none dropped
    assert len(drawn) == 3  # ρ 0.05, ρ 0.3, n/a
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["SAM", "ρ 0.05", "ρ 0.3", "ρ n/a"]
    plt.close(fig)
    # the axis to mark is chosen on the same values: lr 0.1 + 0.2 and 0.3 are one value
    noisy = [
        {"optimizer": o, "lr": lr, "rho": rho}
        for o, rho in (("sgd", None), ("sam", 0.05), ("sam", 0.1))
        for lr in (0.1 + 0.2, 0.3)
    ]
    assert study_plots.second_axis(noisy) == "rho"


def test_plot_landscape_names_a_result_of_another_kind():
    """Python API acceptance, session 21: a Spectrum gave "'Spectrum' object has no
    attribute 'y'"."""
    from sharpscope.plotting.landscape import plot_landscape

    with pytest.raises(SharpscopeError, match="^cannot plot a dict: pass a LandscapeResult$"):
        plot_landscape({"x": [0, 1]})


def test_many_interpolations_keep_the_axes_wide_with_the_legend_under_them():
    """studycfg D6 (session 30): with 8 pairs the legend stood beside the axes and squeezed
    them to about a quarter of the figure's width."""
    x = np.linspace(-0.5, 1.5, 5)
    curves = {
        f"SGD lr={lr} s{s} → SAM ρ=0.05 lr={lr} s{s}": (x, x**2 + s)
        for lr in (0.05, 0.1)
        for s in range(4)
    }
    fig = study_plots.plot_curves_1d(curves)
    fig.draw_without_rendering()
    ax = fig.axes[0]
    panel, figure = ax.get_window_extent(), fig.bbox
    legend = ax.get_legend().get_window_extent()
    assert panel.width > 0.7 * figure.width
    assert legend.y1 < panel.y0 and legend.x1 <= figure.x1 + 1 and legend.x0 >= figure.x0 - 1
    few = study_plots.plot_curves_1d(dict(list(curves.items())[:3]))
    assert few.get_size_inches()[1] < fig.get_size_inches()[1]  # taller only for the rows
