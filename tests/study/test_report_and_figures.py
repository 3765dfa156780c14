"""Report helpers on synthetic tables, the paper theme and save_figure, the plot functions."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sharpscope.errors import SharpscopeError  # noqa: E402
from sharpscope.plotting import study as study_plots  # noqa: E402
from sharpscope.plotting.style import (  # noqa: E402
    COLUMN_WIDTH,
    PALETTE,
    TEXT_WIDTH,
    figure_size,
    optimizer_color,
    save_figure,
)
from sharpscope.plotting.training import (  # noqa: E402
    plot_learned_rho,
    plot_training_curves,
    read_metrics,
)
from sharpscope.study.report import correlation_table, final_rows, measure_columns  # noqa: E402


def synthetic_rows():
    """SGD and SAM at two radii, three learning rates, two seeds; the gap grows with lr."""
    rows = []
    rng = np.random.default_rng(0)
    configs = [("sgd", None), ("sam", 0.05), ("sam", 0.1)]
    for (optimizer, rho), lr, seed in itertools.product(configs, (0.01, 0.1, 1.0), (0, 1)):
        gap = 0.1 * math.log10(lr) + (0.05 if optimizer == "sgd" else 0.0) - (rho or 0) + 0.3
        gap += 1e-3 * seed
        rows.append(
            {
                "run_id": f"{optimizer}-{rho}-{lr}-{seed}",
                "status": "done",
                "epoch": 5,
                "optimizer": optimizer,
                "rho": rho,
                "lr": lr,
                "seed": seed,
                "gen_gap": gap,
                "loss_gap": 2 * gap,
                "lambda_max": 10 * gap,  # a perfect measure
                "trace": -gap,  # a perfectly wrong one
                "m_sharpness": rng.normal(),  # unrelated
                "msharp_m16_rho0.05": float("nan"),  # never computed: skipped
            }
        )
    return rows


def test_correlation_table_orients_and_groups_like_the_definition():
    rows = synthetic_rows()
    assert measure_columns(rows) == ["lambda_max", "trace", "m_sharpness"]
    correlations = correlation_table(rows, ["optimizer", "rho", "lr", "seed"], resamples=100)
    by = {(c.measure, c.target): c for c in correlations}
    perfect = by[("lambda_max", "gen_gap")]
    assert perfect.tau == pytest.approx(1.0) and perfect.overall == pytest.approx(1.0)
    assert set(perfect.psi) == {"optimizer", "rho", "lr"}  # seed groups, is no axis
    # optimizer axis: groups (lr, seed), each with SGD and both SAM radii (rho is coupled)
    assert perfect.num_groups["optimizer"] == 6
    # rho axis: groups (optimizer, lr, seed); only SAM's have two radii
    assert perfect.num_groups["rho"] == 6
    assert perfect.num_groups["lr"] == 6
    assert by[("trace", "loss_gap")].overall == pytest.approx(-1.0)
    noise = by[("m_sharpness", "gen_gap")]
    assert abs(noise.tau) < 0.5


def test_loss_gap_correlations_use_the_loss_gap():
    """With the loss gap ordered against the error gap, their τ have opposite signs (loss_gap
    correlated against gen_gap passed: synthetic_rows' loss_gap has gen_gap's ranks)."""
    rows = [{**row, "loss_gap": -row["gen_gap"]} for row in synthetic_rows()]
    correlations = correlation_table(rows, ["optimizer", "rho", "lr", "seed"], resamples=0)
    by = {(c.measure, c.target): c for c in correlations}
    assert by[("lambda_max", "gen_gap")].tau == pytest.approx(1.0)
    assert by[("lambda_max", "loss_gap")].tau == pytest.approx(-1.0)


def test_error_increase_and_stderr_columns_are_not_measures():
    """measure_columns keeps the loss-increase columns, not the 0-1 error increases
    (msharp_err_*, asharp_err_*) nor trace_stderr."""
    names = ["msharp_m16_rho0.05", "msharp_err_m16_rho0.05", "asharp_m16_rho0.5",
             "asharp_err_m16_rho0.5", "avgsharp_ada_rho0.5", "trace", "trace_stderr"]  # fmt: skip
    rows = [{"run_id": str(i), **{name: float(i) for name in names}} for i in range(3)]
    assert measure_columns(rows) == [
        "msharp_m16_rho0.05",
        "asharp_m16_rho0.5",
        "avgsharp_ada_rho0.5",
        "trace",
    ]


def test_final_rows_keep_the_last_analysed_checkpoint_of_finished_runs():
    rows = [
        {"run_id": "a", "status": "done", "epoch": 1, "x": 1},
        {"run_id": "a", "status": "done", "epoch": 3, "x": 3},
        {"run_id": "b", "status": "failed", "epoch": 2, "x": 9},
    ]
    assert final_rows(rows) == [{"run_id": "a", "status": "done", "epoch": 3, "x": 3}]


def _hand_written_study(folder, final_norms, first_norms, gaps):
    """A study folder of 4 finished runs (seeds 0-3) analysed at epochs 1 and 2, written by
    hand without training; weight_norm is the only measure, ``gaps`` the final gen_gaps."""
    from sharpscope.study import expand_sweep, study_config_from_dict
    from sharpscope.study.runner import prepare_study_dir

    config = study_config_from_dict(
        {
            "study": {"name": "by-hand"},
            "train": {"dataset": {"name": "mnist1d"}, "model": {"name": "mlp"}, "epochs": 2},
            "sweep": {"optimizer": ["sgd"], "seed": [0, 1, 2, 3]},
            "analysis": {"epochs": [1, "last"]},
        }
    )
    runs = expand_sweep(config)
    prepare_study_dir(folder, config, runs)
    for run, final, first, gap in zip(runs, final_norms, first_norms, gaps):
        run_dir = folder / "runs" / run.run_id
        (run_dir / "status.json").write_text('{"state": "done"}')
        rows = [
            {"kind": "eval", "epoch": e, "train_acc": 0.9, "test_acc": 0.9 - g,
             "train_loss": 0.1, "test_loss": 0.1 + g}
            for e, g in ((1, 0.5 - gap), (2, gap))
        ]  # fmt: skip
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for epoch, norm in ((1, first), (2, final)):
            path = run_dir / "analysis" / f"epoch_{epoch:03d}" / "basic.json"
            path.parent.mkdir(parents=True)
            record = {"measure": "basic", "columns": {"weight_norm": norm}, "params": {"basic": 1}}
            path.write_text(json.dumps(record))


def test_b5_a_landscape_only_study_states_mode_and_dtype(tmp_path):
    """Session 27, B5: the caption of a study whose only measure is the landscape lacked
    mode and dtype: the meta is in the .npz slices its landscape.json lists, and only a
    ``<stem>.json`` beside each file was looked for."""
    import torch

    from sharpscope.study import expand_sweep, study_config_from_dict
    from sharpscope.study.report import measurement_caption
    from sharpscope.study.runner import (
        _analysis_params,
        _landscape_record,
        prepare_study_dir,
    )

    config = study_config_from_dict(
        {
            "study": {"name": "slices"},
            "train": {"dataset": {"name": "mnist1d"}, "model": {"name": "mlp"}, "epochs": 1},
            "sweep": {"optimizer": ["sgd"], "seed": [0]},
            "analysis": {"samples": 8, "landscape": {"dims": [1], "grid": 3}},
        }
    )
    folder = tmp_path / "slices"
    (run,) = expand_sweep(config)
    prepare_study_dir(folder, config, [run])
    path = folder / "runs" / run.run_id / "analysis" / "epoch_001" / "landscape.json"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    data = torch.randn(8, 3), torch.randint(0, 2, (8,))
    record = _landscape_record(torch.nn.Linear(3, 2), data, "cross_entropy", config, path)
    record["params"] = _analysis_params("landscape", config)
    path.write_text(json.dumps(record))
    assert measurement_caption(folder) == "measured on mnist1d/train n=8; eval mode; float32"
    # a stale record (made with other settings) does not speak for the current ones
    path.write_text(json.dumps({**record, "params": {"options": {}}}))
    assert measurement_caption(folder) == "measured on mnist1d/train n=8"


def test_b6_report_training_data_files_hold_the_plotted_numbers_under_display_names(
    tmp_path, monkeypatch
):
    """Session 27, B6: training_curves.json and lets_rho.json held paths relative to where
    the command ran, not numbers, and lets_rho's legend showed run ids (lets-rho0.05-s0)."""
    from sharpscope.study import expand_sweep, study_config_from_dict
    from sharpscope.study.report import write_report
    from sharpscope.study.runner import prepare_study_dir

    config = study_config_from_dict(
        {
            "study": {"name": "lets"},
            "train": {"dataset": {"name": "mnist1d"}, "model": {"name": "mlp"}, "epochs": 1},
            "sweep": {"optimizer": ["sgd", "lets"], "seed": [0, 1]},
            "analysis": {"epochs": ["last"]},
        }
    )
    monkeypatch.chdir(tmp_path)  # paths relative to here were what the files held
    folder = tmp_path / "study"
    runs = expand_sweep(config)
    prepare_study_dir(folder, config, runs)
    for index, run in enumerate(runs):
        run_dir = folder / "runs" / run.run_id
        (run_dir / "status.json").write_text('{"state": "done"}')
        rows = [{"kind": "step", "epoch": 1, "step": s, "rho": 0.05 + s * 1e-11} for s in (1, 2)]
        rows.append({"kind": "eval", "epoch": 1, "test_acc": 0.5 + index / 100, "train_loss": 1.0})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_report(folder, resamples=0)
    curves = json.loads((folder / "figures" / "training_curves.json").read_text())
    assert list(curves) == ["SGD", "LETS"]  # one run per setting, the lowest seed (lets-s0)
    assert curves["LETS"] == [
        {"epoch": 1, "train_loss": 1.0, "train_acc": None, "test_loss": None, "test_acc": 0.52}
    ]
    rho = json.loads((folder / "figures" / "lets_rho.json").read_text())
    assert rho == {
        f"LETS (seed {seed})": {"step": [1, 2], "rho": [0.05 + 1e-11, 0.05 + 2e-11]}
        for seed in (0, 1)
    }


def test_report_correlates_the_last_checkpoint_of_each_run_once(tmp_path):
    """4 runs are 4 models, with τ = 1 of their final checkpoints (the epoch-1 rows, ordered
    the other way, entered the correlations too)."""
    from sharpscope.study.report import write_report

    folder = tmp_path / "by-hand"
    _hand_written_study(folder, [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4])
    write_report(folder, resamples=0, figures=False)
    correlations = json.loads((folder / "correlations.json").read_text())
    (gen,) = [c for c in correlations if (c["measure"], c["target"]) == ("weight_norm", "gen_gap")]
    assert gen["num_models"] == 4
    assert gen["tau"] == pytest.approx(1.0)
    # the report gives τ's p-value (scipy: 1/12 for 4 models in order) and the tie rule
    report = (folder / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| `weight_norm`"))
    assert f"| {1 / 12:.2g} |" in row and "| p |" in report
    assert "scores τ = 0 there" in report


def test_the_report_warns_when_few_seeds_make_the_seed_interval_coarse():
    from sharpscope.study.report import _correlation_rows, _seed_interval_note

    rows = synthetic_rows()  # two seeds
    correlations = correlation_table(rows, ["optimizer", "rho", "lr", "seed"], resamples=50)
    assert {c.num_seeds for c in correlations} == {2}
    assert {r["num_seeds"] for r in _correlation_rows(correlations)} == {2}
    note = _seed_interval_note(correlations)
    assert "with 2 seeds it has only 3 distinct resamples" in note
    more = [{**r, "seed": r["seed"] + 2 * copy} for copy in range(3) for r in rows]  # 6 seeds
    many = correlation_table(more, ["optimizer", "lr"], resamples=20)
    assert _seed_interval_note(many) == ""
    # a measure whose missing values leave it 3 seeds sets the note, whatever the others have
    assert "with 3 seeds it has only 10" in _seed_interval_note(
        [*many, dataclasses.replace(many[0], num_seeds=3)]
    )


def test_an_axis_only_some_optimizers_take_moves_with_the_optimizer():
    """Momentum swept for SGD, absent for SAM (its base optimizer holds it): ψ_optimizer had
    no groups ("– (0)"), since no SAM run matched an SGD run's momentum."""
    from sharpscope.study.report import optimizer_coupled_axes

    rows = []
    for (optimizer, momentum), lr, seed in itertools.product(
        [("sgd", 0.0), ("sgd", 0.9), ("sam", None)], (0.01, 0.1), (0, 1)
    ):
        gap = lr + (0.1 + 0.05 * momentum if optimizer == "sgd" else 0.0) + 0.01 * seed
        rows.append(
            {
                "run_id": f"{optimizer}-{momentum}-{lr}-{seed}",
                "status": "done",
                "optimizer": optimizer,
                "rho": 0.05 if optimizer == "sam" else None,
                "momentum": momentum,
                "lr": lr,
                "seed": seed,
                "gen_gap": gap,
                "loss_gap": gap,
                "lambda_max": gap,
            }
        )
    assert optimizer_coupled_axes(rows, ["optimizer", "rho", "momentum", "lr"]) == [
        "rho",
        "momentum",
    ]
    assert optimizer_coupled_axes(rows, ["optimizer", "lr"]) == []  # lr: every optimizer has it
    (c,) = correlation_table(
        rows,
        ["optimizer", "rho", "momentum", "lr", "seed"],
        measures=["lambda_max"],
        gaps=["gen_gap"],
        resamples=0,
    )
    # one group per (lr, seed), each with both SGD momenta and SAM; momentum's own groups
    # are SGD's (lr, seed) settings
    assert c.num_groups["optimizer"] == 4 and c.psi["optimizer"] == pytest.approx(1.0)
    assert c.num_groups["momentum"] == 4


def test_figure_sizes_and_palette():
    assert figure_size(1) == (COLUMN_WIDTH, pytest.approx(COLUMN_WIDTH * 0.75))
    assert figure_size(2, aspect=0.5, ncols=2)[0] == TEXT_WIDTH
    with pytest.raises(SharpscopeError, match="columns must be 1 or 2"):
        figure_size(3)
    assert optimizer_color("SAM") == optimizer_color("sam") == PALETTE[0]
    assert len(set(PALETTE)) == len(PALETTE)


def test_save_figure_writes_pdf_png_and_the_data(tmp_path):
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    written = save_figure(fig, tmp_path / "sub" / "line", data=[{"x": 0, "y": 1}, {"x": 1, "y": 0}])
    assert [p.suffix for p in written] == [".pdf", ".png", ".csv"]
    assert (tmp_path / "sub" / "line.pdf").read_bytes().startswith(b"%PDF")
    assert (tmp_path / "sub" / "line.png").read_bytes().startswith(b"\x89PNG")
    assert list(csv.DictReader((tmp_path / "sub" / "line.csv").open())) == [
        {"x": "0", "y": "1"},
        {"x": "1", "y": "0"},
    ]
    save_figure(fig, tmp_path / "grid.pdf", data={"grid": np.arange(3.0)})
    assert json.loads((tmp_path / "grid.json").read_text()) == {"grid": [0.0, 1.0, 2.0]}
    assert not (tmp_path / "grid.pdf.pdf").exists()
    plt.close(fig)


def test_study_plots_draw_what_they_are_given():
    rows = synthetic_rows()
    correlations = correlation_table(rows, ["optimizer", "rho", "lr"], resamples=0)
    figures = [
        study_plots.plot_measures_vs_gap(rows, ["lambda_max", "trace"]),
        study_plots.plot_correlations([c for c in correlations if c.target == "gen_gap"]),
        study_plots.plot_metric_vs_axis(rows, "lr", "gen_gap", logx=True),
        study_plots.plot_variants(rows, ("lambda_max", "trace")),
        study_plots.plot_tau_vs_m(
            [
                {"m": 4, "rho": 0.05, "tau": 0.5, "tau_low": 0.2, "tau_high": 0.7},
                {"m": 16, "rho": 0.05, "tau": 0.3},
            ]
        ),
        study_plots.plot_spectral_densities(
            {"sgd": [(1, {"grid": [0.0, 1.0, 2.0], "values": [0.1, 1.0, 0.1]})]}
        ),
        study_plots.plot_curves_1d({"sgd": ([-1.0, 0.0, 1.0], [2.0, 1.0, 2.0])}),
        study_plots.plot_contours(
            {"sam": (np.linspace(-1, 1, 5), np.linspace(-1, 1, 4), np.ones((5, 4)) + 0.1)}
        ),
    ]
    scatter = figures[0].axes[0]
    drawn = [c for c in scatter.collections if len(c.get_offsets())]  # not legend entries
    assert len(drawn) == 6  # SGD and SAM at three learning rates (the second axis)
    offsets = np.concatenate([c.get_offsets() for c in drawn])
    assert len(offsets) == len(rows)
    # gaps are drawn in percent
    assert max(offsets[:, 1]) == pytest.approx(100 * max(r["gen_gap"] for r in rows))
    summary = study_plots.mean_and_spread(rows, "lr", "gen_gap")
    first = next(s for s in summary if s["optimizer"] == "sgd" and s["lr"] == 0.01)
    assert first["num_seeds"] == 2
    for fig in figures:
        plt.close(fig)


def test_multi_panel_legends_sit_above_the_panels_and_cover_no_data():
    """One figure-level legend, each label once, whose box meets no panel (after layout)."""
    rows = synthetic_rows()
    history = [{"kind": "eval", "epoch": e, "test_acc": 0.5, "train_loss": 1.0} for e in (1, 2)]
    for fig, count in (
        (study_plots.plot_measures_vs_gap(rows, ["lambda_max", "trace", "m_sharpness"]), 5),
        (plot_training_curves({"sgd": history, "sam-rho0.1": history}), 2),
    ):
        fig.canvas.draw()  # constrained layout places the legend
        assert all(ax.get_legend() is None for ax in fig.axes)
        (legend,) = fig.legends
        labels = [t.get_text() for t in legend.get_texts()]
        assert len(labels) == len(set(labels)) == count  # the scatter marks lr too
        box = legend.get_window_extent()
        for ax in fig.axes:
            panel = ax.get_window_extent()
            assert box.y0 >= panel.y1 or not box.overlaps(panel)
        plt.close(fig)


def test_training_plots_read_metrics_jsonl(tmp_path):
    lines = [
        {"kind": "step", "epoch": 1, "step": 1, "rho": 0.05},
        {"kind": "step", "epoch": 1, "step": 2, "rho": 0.06},
        {"kind": "eval", "epoch": 1, "step": 2, "test_acc": 0.5, "train_loss": 1.0},
        {"kind": "eval", "epoch": 2, "step": 4, "test_acc": 0.6, "train_loss": 0.8},
    ]
    run = tmp_path / "lets-s0"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    assert len(read_metrics(run)) == 4
    fig = plot_training_curves({"lets-s0": run})
    line = fig.axes[0].lines[0]
    assert list(line.get_xdata()) == [1, 2]
    assert list(line.get_ydata()) == pytest.approx([50.0, 40.0])  # error in percent
    fig2 = plot_learned_rho({"lets": run / "metrics.jsonl"})
    assert list(fig2.axes[0].lines[0].get_ydata()) == [0.05, 0.06]
    with pytest.raises(SharpscopeError, match="no per-step 'rho' rows"):
        plot_learned_rho({"sgd": lines[2:]})
    from sharpscope.study.reproductions import _step_history

    # the numbers behind f_lets_rho: the plotted series itself, not a path to it
    assert _step_history(run / "metrics.jsonl", "rho") == {"step": [1, 2], "rho": [0.05, 0.06]}
    (tmp_path / "bad.jsonl").write_text('{not json\n{"epoch": 1}\n')
    with pytest.raises(SharpscopeError, match="bad.jsonl:1 is not JSON"):
        read_metrics(tmp_path / "bad.jsonl")
    # a run killed while appending (train --resume accepts it): the cut-off row is dropped
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2, "te')
    assert read_metrics(tmp_path / "cut") == [{"epoch": 1}]
    # a whole last line (it ends in a newline) that is not JSON is an error, not a cut
    (tmp_path / "one.jsonl").write_text("{not json\n")
    with pytest.raises(SharpscopeError, match="one.jsonl:1 is not JSON"):
        read_metrics(tmp_path / "one.jsonl")
    plt.close("all")


def test_report_names_the_runs_whose_top_eigenvalues_did_not_converge(tmp_path):
    from sharpscope.study.report import write_report

    folder = tmp_path / "by-hand"
    _hand_written_study(folder, [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4])
    write_report(folder, resamples=0, figures=False)
    assert "Warning" not in (folder / "report.md").read_text()

    final = folder / "runs" / "sgd-s1" / "analysis" / "epoch_002" / "basic.json"
    record = json.loads(final.read_text())
    record["columns"]["spectrum_unconverged"] = 2.0
    final.write_text(json.dumps(record))
    write_report(folder, resamples=0, figures=False)
    (warning,) = [
        line for line in (folder / "report.md").read_text().splitlines() if "Warn" in line
    ]
    assert "1 run(s)" in warning and "`sgd-s1`" in warning and "max_steps" in warning
    correlations = json.loads((folder / "correlations.json").read_text())
    assert {c["measure"] for c in correlations} == {"weight_norm"}


def test_training_curve_legend_names_each_setting_like_the_figures_do():
    """The report's curves are one per setting: the legend reads 'SAM-ON ρ=0.5 lr=0.05',
    not the run folder's name 'samon-rho0.5-lr0.05'."""
    from sharpscope.study import expand_sweep, study_config_from_dict
    from sharpscope.study.report import _setting_names

    config = study_config_from_dict(
        {
            "train": {"dataset": {"name": "mnist1d"}, "model": {"name": "mlp", "norm": "batch"}},
            "sweep": {
                "optimizer": ["sgd", "samon"],
                "rho": [0.5, 1.0],
                "lr": [0.05, 0.1],
                "seed": [0, 1],
            },
        }
    )
    names = _setting_names(expand_sweep(config))
    assert names["samon-rho0.5-lr0.05"] == "SAM-ON ρ=0.5 lr=0.05"
    assert names["sgd-lr0.1"] == "SGD lr=0.1"
    assert len(names) == 2 + 4  # SGD once per lr; seeds are one setting


def test_training_curves_take_the_optimizer_colour_of_a_display_name_and_whole_epochs():
    history = [{"kind": "eval", "epoch": e, "test_acc": 0.5, "train_loss": 1.0} for e in (1, 2)]
    fig = plot_training_curves({"SAM-ON ρ=0.5": history, "samon-rho1": history, "SGD": history})
    lines = fig.axes[0].lines
    assert [line.get_color() for line in lines] == [optimizer_color("samon")] * 2 + [
        optimizer_color("sgd")
    ]
    assert [line.get_label() for line in lines] == ["SAM-ON ρ=0.5", "samon-rho1", "SGD"]
    fig.canvas.draw()
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) and all(float(t).is_integer() for t in ticks)


def test_the_setup_line_names_the_models_the_runs_were_built_with():
    """Session 30 (studycfg B7): with sweep.width (or sweep.model) the Setup line named
    [train] model, which no run was built with."""
    from sharpscope.study import expand_sweep, study_config_from_dict
    from sharpscope.study.report import _models

    train = {"dataset": {"name": "digits"}, "model": {"name": "mlp", "width": 32}, "epochs": 1}
    one = expand_sweep(study_config_from_dict({"train": train, "sweep": {"optimizer": ["sgd"]}}))
    assert _models(one, train["model"]) == "`mlp(width=32)`"
    swept = {"optimizer": ["sgd"], "width": [8, 16]}
    runs = expand_sweep(study_config_from_dict({"train": train, "sweep": swept}))
    assert _models(runs, train["model"]) == "`mlp(width=16)`, `mlp(width=8)` (swept)"


def test_correlations_json_says_what_was_measured_and_the_bootstrap_seed(tmp_path):
    """studycfg D10 (session 30): every correlation's meta had data, num_samples and seed
    null, though the analysis subset and the bootstrap seed are known."""
    from sharpscope.study.report import write_report

    folder = tmp_path / "by-hand"
    _hand_written_study(folder, [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4])
    data = {"name": "mnist1d", "split": "train", "samples": 1024, "seed": 0}
    measured = {"data": data, "num_samples": 1000, "dtype": "float32", "mode": "eval"}
    for path in folder.glob("runs/*/analysis/*/basic.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "meta": {**measured, "device": "cpu"}}))
    write_report(folder, resamples=10, figures=False, seed=7)
    (gen,) = [
        c
        for c in json.loads((folder / "correlations.json").read_text())
        if (c["measure"], c["target"]) == ("weight_norm", "gen_gap")
    ]
    meta = gen["meta"]
    assert meta["data"] == data and meta["num_samples"] == 1000
    assert (meta["seed"], meta["mode"], meta["dtype"]) == (7, "eval", "float32")
    assert meta["extra"] == {"study": "by-hand"}


def test_correlate_records_its_bootstrap_seed():
    from sharpscope.analysis.correlation import correlate

    result = correlate([1.0, 2.0, 3.0], [1.0, 3.0, 2.0], resamples=5, seed=11)
    assert (result.meta.seed, result.meta.dtype) == (11, "float64")


def test_a_report_without_figures_says_the_figures_left_are_an_earlier_reports(tmp_path):
    """studycfg D7 (session 30): `study report --no-figures` left figures/*.png of an
    earlier report in place without a word, their numbers possibly not the new ones."""
    import warnings

    from sharpscope.study.report import write_report

    folder = tmp_path / "by-hand"
    _hand_written_study(folder, [1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0], [0.1, 0.2, 0.3, 0.4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no figures yet: nothing to say
        write_report(folder, resamples=0, figures=False)
    assert "Not drawn" not in (folder / "report.md").read_text()
    (folder / "figures").mkdir()
    (folder / "figures" / "a_tau_bars.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="figures/ holds the figures of an earlier report"):
        write_report(folder, resamples=0, figures=False)
    assert "Not drawn: figures/ holds" in (folder / "report.md").read_text()
