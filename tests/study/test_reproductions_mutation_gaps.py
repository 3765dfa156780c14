"""Gap tests for mutants of sharpscope/study/reproductions.py that the suite let through
(session 24, mut_study), on a study folder written by hand (no training)."""

from __future__ import annotations

import json
import statistics

import pytest

from sharpscope.study import study_config_from_dict
from sharpscope.study.sweep import expand_sweep

LRS = (0.05, 0.1)
SEEDS = (0, 1)


def _record(measure, columns, config, result=None):
    from sharpscope.results import to_jsonable
    from sharpscope.study.runner import _analysis_params

    params = {"basic": 1} if measure == "basic" else to_jsonable(_analysis_params(measure, config))
    return json.dumps({"measure": measure, "columns": columns, "result": result or {},
                       "params": params})  # fmt: skip


@pytest.fixture
def folder(tmp_path):
    """SGD and SAM at two learning rates and two seeds, one analysed epoch (2); every
    number depends on the run's index so that picking the wrong run shows."""
    from sharpscope.study.runner import prepare_study_dir, write_results

    out = tmp_path / "study"
    config = study_config_from_dict(
        {
            "study": {"name": "lr-by-hand"},
            "train": {"dataset": {"name": "mnist1d"}, "model": {"name": "mlp"}, "epochs": 2},
            "sweep": {"optimizer": ["sgd", "sam"], "lr": list(LRS), "seed": list(SEEDS)},
            "analysis": {
                "epochs": ["last"],
                "spectrum": {},
                "m_sharpness": {"m": [16, 64], "rho": [0.05], "steps": 1},
            },
        }
    )
    runs = expand_sweep(config)
    prepare_study_dir(out, config, runs)
    for index, run in enumerate(runs):
        run_dir = out / "runs" / run.run_id
        (run_dir / "status.json").write_text('{"state": "done"}')
        gap = 0.05 + 0.03 * index
        evals = [{"kind": "eval", "epoch": e, "train_acc": 0.95, "test_acc": 0.95 - gap,
                  "train_loss": 0.1 + index / 100 + e, "test_loss": 0.2 + gap}
                 for e in (1, 2)]  # fmt: skip
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
        analysis = run_dir / "analysis" / "epoch_002"
        analysis.mkdir(parents=True)
        lmax = 10 * gap + (index % 3)  # not a function of the trace
        trace = float((index * 5) % 7) + 1.0
        spectrum = {"lambda_max": lmax, "lambda_5": 1.0, "ratio": lmax, "trace": trace}
        result = {"density": {"grid": [0.0, 1.0, 2.0], "values": [0.1, 1.0, 0.1]},
                  "lambda_max": lmax}  # fmt: skip
        (analysis / "spectrum.json").write_text(_record("spectrum", spectrum, config, result))
        columns = {"msharp_m16_rho0.05": gap * (1 + (index % 2)), "msharp_m64_rho0.05": gap}
        (analysis / "m_sharpness.json").write_text(_record("m_sharpness", columns, config))
        basic = {"weight_norm": 5.0 - index / 3, "num_params": 10}
        (analysis / "basic.json").write_text(_record("basic", basic, config))
    write_results(out)
    return out


def _finals(folder):
    from sharpscope.study.report import final_rows
    from sharpscope.study.runner import read_results

    return final_rows(read_results(folder / "results.csv"))


# F05 a_spectra_table's trace column averages the trace (not λmax)
def test_figures_a_table_trace_is_the_mean_trace(folder, tmp_path):
    from sharpscope.study import reproductions

    _, numbers = reproductions.figures_a(folder, tmp_path / "figs")
    rows = _finals(folder)
    for entry in numbers["table"]:
        group = [r for r in rows if r["optimizer"] == entry["optimizer"]]
        assert entry["trace"] == pytest.approx(statistics.mean(r["trace"] for r in group))


# F06 summary.json's granulated_psi_gen_gap is Ψ (not τ); F04 the quick training curves
# are the first seed's at the largest learning rate
def test_figures_quick_summary_and_curves(folder, tmp_path):
    from sharpscope.study import reproductions
    from sharpscope.study.report import correlation_table
    from sharpscope.study.runner import read_study_dir

    out = tmp_path / "figs"
    _, summary = reproductions.figures_quick(folder, out)
    rows = _finals(folder)
    swept = read_study_dir(folder)["swept"]
    want = {c.measure: c.overall for c in correlation_table(rows, swept) if c.target == "gen_gap"}
    assert summary["granulated_psi_gen_gap"] == pytest.approx(want, nan_ok=True)
    taus = {c.measure: c.tau for c in correlation_table(rows, swept) if c.target == "gen_gap"}
    assert any(abs(want[m] - taus[m]) > 1e-6 for m in want)  # Ψ and τ differ here
    curves = json.loads((out / "quick_training_curves.json").read_text())
    for label, run_id in (("sgd", "sgd-lr0.1-s0"), ("sam ρ=0.05", "sam-lr0.1-s0")):
        index = [r.run_id for r in expand_sweep_of(folder)].index(run_id)
        assert [e["train_loss"] for e in curves[label]] == pytest.approx(
            [0.1 + index / 100 + e for e in (1, 2)]
        )


def expand_sweep_of(folder):
    from sharpscope.study.runner import load_study_config_from_dir

    return expand_sweep(load_study_config_from_dir(folder))


# F07 c_tau_vs_m's psi is the granulated Ψ of each m-sharpness column
def test_figures_c_points_hold_psi(folder, tmp_path):
    from sharpscope.study import reproductions
    from sharpscope.study.report import correlation_table
    from sharpscope.study.runner import read_study_dir

    _, numbers = reproductions.figures_c(folder, tmp_path / "figs")
    rows = _finals(folder)
    swept = read_study_dir(folder)["swept"]
    measures = ["msharp_m16_rho0.05", "msharp_m64_rho0.05"]
    want = {c.measure: (c.tau, c.overall)
            for c in correlation_table(rows, swept, measures=measures, gaps=("gen_gap",))}  # fmt: skip
    got = {p["measure"]: (p["tau"], p["psi"]) for p in numbers["tau_vs_m"]}
    assert set(got) == set(want)
    for measure, pair in want.items():
        assert got[measure] == pytest.approx(pair)
    assert any(abs(t - psi) > 1e-6 for t, psi in want.values())  # Ψ and τ differ here


# session 29: the figures' correlation tables have a study's correlations.csv columns
def test_figure_correlation_csvs_have_the_study_correlations_columns(folder, tmp_path):
    """figures/quick_correlations.csv held Correlation.to_dict() rows (target, overall,
    JSON text in cells, a placeholder meta), and c_tau_vs_m.csv only psi, where a
    study's correlations.csv (README) has gap, tau_low/tau_high, psi_overall, psi_<axis>
    and groups_<axis>: a script written for one failed on the other."""
    import csv

    from sharpscope.study import reproductions
    from sharpscope.study.report import write_report

    write_report(folder, figures=False)
    with (folder / "correlations.csv").open() as handle:
        study = {r["measure"]: r for r in csv.DictReader(handle) if r["gap"] == "gen_gap"}
    out = tmp_path / "figs"
    reproductions.figures_quick(folder, out)
    with (out / "quick_correlations.csv").open() as handle:
        reader = csv.DictReader(handle)
        quick = {r["measure"]: r for r in reader}
        header = reader.fieldnames
    assert header == list(next(iter(study.values())))
    assert set(quick) == set(study)
    for measure, row in quick.items():
        for key in ("gap", "num_models", "tau", "psi_overall", "psi_optimizer", "groups_lr"):
            assert row[key] == study[measure][key], (measure, key)
    full = json.loads((out / "quick_correlations.json").read_text())
    assert [c["measure"] for c in full] == list(quick) and full[0]["kind"] == "correlation"
    reproductions.figures_c(folder, out)
    with (out / "c_tau_vs_m.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert {r["measure"] for r in rows} == {"msharp_m16_rho0.05", "msharp_m64_rho0.05"}
    for row in rows:
        assert row["psi"] == row["psi_overall"] == study[row["measure"]]["psi_overall"]
        for key in ("gap", "psi_optimizer", "psi_lr", "groups_optimizer", "m", "rho"):
            assert row[key] != "", key
