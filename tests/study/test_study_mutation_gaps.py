"""Gaps found by a mutation audit of the study layer (config, sweep, runner, executors,
measures, report, reproductions): each test fails on a plausible bug that the rest of the
suite let through. Most work on hand-written study folders (no training) or on tiny models."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

from sharpscope.errors import SharpscopeError  # noqa: E402
from sharpscope.study import expand_sweep, study_config_from_dict  # noqa: E402

TRAIN = {"dataset": {"name": "mnist1d"}, "model": {"name": "mlp", "width": 16}, "epochs": 4}


def config(**sections):
    return study_config_from_dict({"train": TRAIN, **sections})


def tiny_problem(seed=0, n=32, fit=0):
    """A 6-8-3 tanh MLP on random data, fitted for ``fit`` full-batch Adam steps."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    data = (torch.randn(n, 6), torch.randint(0, 3, (n,)))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(fit):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(data[0]), data[1]).backward()
        optimizer.step()
    return model, data


# --------------------------------------------------------------------------- measures
def test_m_sharpness_options_reach_the_measurement():
    """The measure's own seed and norm are used (not the analysis seed / L2), and m larger
    than the analysis subset is one subset of all examples (the default m is 128)."""
    from sharpscope.analysis.msharpness import m_sharpness
    from sharpscope.study.measures import measure_m_sharpness

    model, data = tiny_problem()
    options = {"m": [128], "rho": [0.1], "norm": "linf", "seed": 5}
    options = config(analysis={"m_sharpness": options}).analysis.measures["m_sharpness"]
    columns, _ = measure_m_sharpness(model, data, "cross_entropy", options, {"seed": 0})
    want = m_sharpness(model, data, m=32, rho=0.1, norm="linf", seed=5, steps=20)
    assert columns["msharp_m128_rho0.1"] == pytest.approx(want.sharpness, rel=1e-12)
    other_norm = m_sharpness(model, data, m=32, rho=0.1, norm="l2", seed=5, steps=20).sharpness
    assert columns["msharp_m128_rho0.1"] != pytest.approx(other_norm, rel=1e-3)


def test_pac_bayes_columns_name_the_right_variant():
    """pac_bayes is the plain 1/σ², pac_bayes_mag the magnitude-aware one, and target_drop
    reaches the search."""
    from sharpscope.analysis.measures import pac_bayes_flatness
    from sharpscope.study.measures import measure_pac_bayes

    model, data = tiny_problem(n=48, fit=200)  # fits: noise must cost accuracy
    options = {"target_drop": 0.2, "num_draws": 3, "num_halvings": 6}
    options = config(analysis={"pac_bayes": options}).analysis.measures["pac_bayes"]
    assert options["magnitude_aware"] == [False, True]  # the documented default
    common = {"seed": 0, "batch_size": None}
    columns, _ = measure_pac_bayes(model, data, "cross_entropy", options, common)
    for name, aware in (("pac_bayes", False), ("pac_bayes_mag", True)):
        direct = pac_bayes_flatness(
            model, data, magnitude_aware=aware, target_drop=0.2, num_draws=3, num_halvings=6
        )
        assert columns[name] == pytest.approx(direct.flatness, rel=1e-12), name
    assert columns["pac_bayes"] != pytest.approx(columns["pac_bayes_mag"], rel=1e-3)
    default_drop = pac_bayes_flatness(model, data, num_draws=3, num_halvings=6).flatness
    assert columns["pac_bayes"] != pytest.approx(default_drop, rel=1e-6)


def test_a_pac_bayes_search_that_never_meets_the_drop_is_counted_and_reported():
    """A model at chance accuracy loses none under any noise: σ ran to sigma_max and the
    censored 1/σ² was correlated like any other value, with nothing to say so."""
    from sharpscope.study.measures import is_measure_column, measure_pac_bayes
    from sharpscope.study.report import unconverged_warnings

    model, data = tiny_problem(n=48, fit=200)
    plan = config(analysis={"pac_bayes": {"num_draws": 2, "num_halvings": 4}}).analysis
    common = {"seed": 0, "batch_size": None}
    columns, _ = measure_pac_bayes(model, data, "cross_entropy", plan.measures["pac_bayes"], common)
    assert columns["pac_bayes_unconverged"] == 2  # seeded: 4 halvings miss the tolerance here
    assert type(columns["pac_bayes_unconverged"]) is int  # a count, written "2" in results.csv
    assert not is_measure_column("pac_bayes_unconverged")
    finals = [
        {"run_id": "sgd-s0", "pac_bayes_unconverged": 1.0, "spectrum_unconverged": 0.0},
        {"run_id": "sam-s0", "pac_bayes_unconverged": 0.0, "spectrum_unconverged": 0.0},
    ]
    report = "\n".join(unconverged_warnings(finals))
    assert report.startswith("**Warning:** 1 run(s) have a PAC-Bayes σ search that never met")
    assert report.rstrip().endswith("Runs: `sgd-s0`") and "Ritz" not in report


def test_keskar_and_average_sharpness_pass_their_options():
    """subspace_dim (Keskar) and m (average sharpness) reach the analysis functions."""
    from sharpscope.analysis.measures import average_sharpness, epsilon_sharpness
    from sharpscope.study.measures import measure_average_sharpness, measure_keskar

    model, data = tiny_problem(n=32)
    common = {"seed": 0, "batch_size": None}
    plan = config(
        analysis={
            "keskar": {"epsilon": [1e-2], "subspace_dim": 4, "iterations": 3},
            "average_sharpness": {"rho": [0.2], "m": 8, "num_draws": 3},
        }
    ).analysis
    columns, _ = measure_keskar(model, data, "cross_entropy", plan.measures["keskar"], common)
    direct = epsilon_sharpness(model, data, 1e-2, subspace_dim=4, iterations=3)
    full = epsilon_sharpness(model, data, 1e-2, iterations=3)
    assert columns["keskar_eps0.01"] == pytest.approx(direct.sharpness, rel=1e-9)
    assert direct.sharpness != pytest.approx(full.sharpness, rel=1e-6)
    options = plan.measures["average_sharpness"]
    columns, _ = measure_average_sharpness(model, data, "cross_entropy", options, common)
    direct = average_sharpness(model, data, 0.2, m=8, num_draws=3)
    whole = average_sharpness(model, data, 0.2, num_draws=3)
    assert columns["avgsharp_rho0.2"] == pytest.approx(direct.sharpness, rel=1e-9)
    assert direct.sharpness != pytest.approx(whole.sharpness, rel=1e-6)


def test_spectrum_seed_option_wins_over_the_analysis_seed():
    from sharpscope.analysis.spectrum import spectrum
    from sharpscope.study.measures import measure_spectrum

    model, data = tiny_problem(n=48)
    options = {"k": 2, "trace_probes": 6, "num_probes": 1, "num_lanczos_steps": 6, "seed": 7,
               "max_steps": 30, "tol": 1e-3}  # fmt: skip
    options = config(analysis={"spectrum": options}).analysis.measures["spectrum"]
    columns, _ = measure_spectrum(
        model, data, "cross_entropy", options, {"seed": 0, "batch_size": None}
    )
    kwargs = {k: v for k, v in options.items() if k != "seed"}
    seven = spectrum(model, data, seed=7, **kwargs).trace
    assert seven != pytest.approx(spectrum(model, data, seed=0, **kwargs).trace, rel=1e-9)
    assert columns["trace"] == pytest.approx(seven, rel=1e-12)


def test_keskar_columns_are_measures():
    from sharpscope.study.measures import is_measure_column

    for name in ("keskar_eps0.001", "pac_bayes_mag", "avgsharp_rho0.05", "lambda_5"):
        assert is_measure_column(name), name
    for name in ("test_acc", "gen_gap", "num_params", "msharp_err_m16_rho0.05"):
        assert not is_measure_column(name), name


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"analysis": {"batch_size": 0}}, "analysis.batch_size must be a positive integer, got 0"),
        ({"sweep": {"optimizer": ["sam"], "m": [0]}}, "sweep.m must be a positive integer"),
        ({"sweep": {"rho": [float("inf")]}}, "sweep.rho must be in [0, inf], got inf"),
        ({"sweep": {"rho": [True]}}, "sweep.rho must be a number, got True"),
        ({"sweep": {"lr": [0.0]}}, "sweep.lr must be > 0, got 0.0"),
        ({"sweep": {"optimizer": ["sgd", "sgd"]}}, "sweep.optimizer lists an optimizer twice"),
        ({"sweep": {"seed": {"sgd": [0]}}}, "sweep.seed is per-optimizer only for rho, m"),
        (
            {"optimizers": {"base": {"lr": 0.05}}, "sweep": {"optimizer": ["base"]}},
            "'base' is the base optimizer's settings, not a sweep.optimizer entry",
        ),
        ({"optimizers": {"base": {"name": "sam"}}}, "optimizers.base must be one of sgd"),
        # an unknown name listed sam, asam, ... as choices, which base refuses next
        ({"optimizers": {"base": {"name": "sgdd"}}}, "optimizers.base must be one of sgd, adam"),
        (
            {"analysis": {"landscape": {"interpolate": [["sgd"]]}}},
            "analysis.landscape.interpolate must be a list of optimizer pairs",
        ),
        ({"study": {"reproduction": "z"}}, "unknown study.reproduction 'z'; choose one of: a"),
        (  # was accepted, and no interpolation was computed or reported
            {"analysis": {"landscape": {"interpolate": [["sgd", "adam"]]}}},
            "analysis.landscape.interpolate names optimizer 'adam', which is not in "
            "sweep.optimizer (sgd)",
        ),
    ],
    ids=[
        "zero-int",
        "zero-m",
        "inf",
        "bool",
        "zero-lr",
        "twice",
        "seed-table",
        "base-label",
        "base-sam",
        "base-unknown",
        "interpolate",
        "reproduction",
        "interpolate-unknown",
    ],
)
def test_more_bad_configs_raise_one_line(sections, message):
    with pytest.raises(SharpscopeError) as info:
        config(**sections)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_an_unknown_train_key_lists_only_keys_a_study_takes():
    """The list named optimizer and out, which [train] then refuses with their own lines."""
    with pytest.raises(SharpscopeError, match=r"unknown key 'epoch' in \[train\]") as info:
        config(train={**TRAIN, "epoch": 1})
    valid = str(info.value).split("valid keys: ")[1].split(", ")
    assert "epochs" in valid and "optimizer" not in valid and "out" not in valid


def test_analysis_defaults_and_options_are_kept():
    """The documented defaults of the measure tables, samples "all" meaning all examples,
    and the analysis seed."""
    plan = config(
        analysis={
            "samples": "all",
            "seed": 4,
            "m_sharpness": {},
            "adaptive_sharpness": {},
            "average_sharpness": {"rho": [0.1]},
            "pac_bayes": {},
            "keskar": {},
        }
    ).analysis
    assert plan.samples is None and plan.seed == 4
    # analysis.md section 5 for studies: SAM's and ASAM's training radii (never a single
    # rho), 20 Auto-PGD steps, Keskar's two epsilons
    assert plan.measures["m_sharpness"]["rho"] == [0.05, 0.1]
    assert plan.measures["adaptive_sharpness"]["rho"] == [0.5, 1.0]  # ASAM's scale
    assert plan.measures["m_sharpness"]["steps"] == plan.measures["adaptive_sharpness"]["steps"]
    assert plan.measures["m_sharpness"]["steps"] == 20
    assert plan.measures["keskar"]["epsilon"] == [1e-3, 5e-4]
    assert plan.measures["m_sharpness"]["m"] == [128]
    assert plan.measures["average_sharpness"]["adaptive_rho"] == [0.1]  # follows rho
    assert plan.measures["pac_bayes"]["magnitude_aware"] == [False, True]


def test_analysis_on_all_examples_survives_the_study_folder(tmp_path):
    """``samples = "all"`` was dropped from study.json (to_dict left out None), so every run
    was analysed on the default 1024 examples and never counted as complete."""
    from sharpscope.study.runner import run_study

    plan = config(analysis={"samples": "all"}).analysis
    assert plan.samples is None
    again = study_config_from_dict(config(analysis={"samples": "all"}).to_dict())
    assert again.analysis.samples is None
    tiny = study_config_from_dict(
        {
            "study": {"name": "all"},
            "train": {
                "dataset": {"name": "mnist1d", "samples": 96},
                "model": {"name": "mlp", "width": 8, "depth": 1},
                "epochs": 1,
                "batch_size": 32,
                "device": "cpu",
            },
            "sweep": {"optimizer": ["sgd"]},
            "analysis": {"samples": "all", "m_sharpness": {"m": [16], "steps": 1}},
        }
    )
    assert run_study(tiny, tmp_path).done == ["sgd-s0"]
    record = json.loads((tmp_path / "runs/sgd-s0/analysis/epoch_001/m_sharpness.json").read_text())
    assert record["params"]["samples"] is None
    second = run_study(tiny, tmp_path)
    assert second.done == [] and second.skipped == ["sgd-s0"]


# --------------------------------------------------------------------------- sweep
def test_optimizer_defaults_and_what_is_recorded():
    """ASAM's default ρ is 0.5; a configured Adam base does not leak into SGD runs; momentum
    does not apply to Adam (one run, recorded empty); an unset weight decay is recorded 0."""
    runs = expand_sweep(
        config(
            optimizers={"base": {"name": "adam", "lr": 2e-3}},
            sweep={"optimizer": ["sgd", "adam", "asam"], "momentum": [0.5, 0.9]},
        )
    )
    by = {}
    for run in runs:
        by.setdefault(run.params["optimizer"], []).append(run)
    (asam,) = by["asam"]  # its base is the configured Adam: no momentum either
    assert asam.params["rho"] == 0.5 and asam.train["optimizer"]["rho"] == 0.5
    assert asam.train["optimizer"]["base"] == {"name": "adam", "lr": 2e-3}
    (adam,) = by["adam"]
    assert adam.params["momentum"] is None and adam.params["weight_decay"] == 0.0
    assert adam.train["optimizer"] == {"name": "adam", "lr": 2e-3}
    assert len(by["sgd"]) == 2
    for run in by["sgd"]:
        assert run.train["optimizer"]["lr"] == 0.1  # SGD's own default, not Adam's lr
        assert run.params["momentum"] in (0.5, 0.9)


# --------------------------------------------------------------------------- executors
def test_visible_gpus_and_default_workers(monkeypatch):
    from sharpscope.study.executors import check_executor, default_workers, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert visible_gpus() == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", " 2, ,4")
    assert visible_gpus() == ["2", "4"]
    if not torch.cuda.is_available():  # GPUs listed but no CUDA: one worker per core
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7,8")
        assert default_workers() == len(os.sched_getaffinity(0))
    with pytest.raises(SharpscopeError, match="--workers must be a positive integer, got True"):
        check_executor("local", True)


# --------------------------------------------------------------------------- report
SEEDS = (0, 1, 2, 3)
GAPS = {  # final gen_gap of each finished run: SAM's smaller, seeds spread
    ("sgd", 0): 0.30, ("sgd", 1): 0.25, ("sgd", 2): 0.40, ("sgd", 3): 0.35,
    ("sam", 0): 0.10, ("sam", 1): 0.20, ("sam", 2): 0.15,
}  # fmt: skip
ERROR_RUN = ("sam", 3)  # raised: state "error", no analysis


def _record(measure, columns, config, result=None):
    """An analysis record as the runner writes it (with the params it compares on resume)."""
    from sharpscope.results import to_jsonable
    from sharpscope.study.runner import _analysis_params

    params = {"basic": 1} if measure == "basic" else to_jsonable(_analysis_params(measure, config))
    record = {"measure": measure, "columns": columns, "result": result or {}, "params": params}
    return json.dumps(record)


def hand_built_study(folder):
    """A study folder written by hand (no training): SGD and SAM, seeds 0-3, analysed at
    epochs 1 and 2 on the test split; sam-s3 raised. lambda_max is 10·gap (τ = 1), trace
    is unrelated, msharp_m{m}_rho{ρ} = m·ρ·gap, densities differ per seed."""
    from sharpscope.study.runner import prepare_study_dir

    config = study_config_from_dict(
        {
            "study": {"name": "by-hand", "description": "hand-written runs"},
            "train": {"dataset": {"name": "mnist1d"}, "model": {"name": "mlp"}, "epochs": 2},
            "sweep": {"optimizer": ["sgd", "sam"], "seed": list(SEEDS)},
            "analysis": {
                "epochs": [1, "last"],
                "split": "test",
                "samples": 256,
                "spectrum": {},
                "m_sharpness": {"m": [16, 64], "rho": [0.1, 0.05], "steps": 1},
            },
        }
    )
    runs = expand_sweep(config)
    prepare_study_dir(folder, config, runs)
    for index, run in enumerate(runs):
        key = (run.params["optimizer"], run.params["seed"])
        run_dir = folder / "runs" / run.run_id
        if key == ERROR_RUN:
            (run_dir / "status.json").write_text('{"state": "error", "error": "boom here"}')
            continue
        (run_dir / "status.json").write_text('{"state": "done"}')
        gap = GAPS[key]
        evals = [
            {"kind": "eval", "epoch": e, "train_acc": 0.95, "test_acc": 0.95 - g,
             "train_loss": 0.1, "test_loss": 0.1 + 2 * g}
            for e, g in ((1, 0.05), (2, gap))
        ]  # fmt: skip
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
        for epoch in (1, 2):
            g = gap if epoch == 2 else 0.05
            analysis = run_dir / "analysis" / f"epoch_{epoch:03d}"
            analysis.mkdir(parents=True)
            lmax, l5 = 10 * g + 0.01 * index, 1.0 + index / 10
            trace = float((index * 7) % 5) + 1.0
            spectrum = {"lambda_max": lmax, "lambda_5": l5, "ratio": lmax / l5, "trace": trace}
            density = {"grid": [0.0, 1.0, 2.0], "values": [0.1, 1.0 + run.params["seed"], 0.1]}
            result = {"density": density, "lambda_max": lmax}
            (analysis / "spectrum.json").write_text(_record("spectrum", spectrum, config, result))
            columns = {
                f"msharp_m{m}_rho{rho}": m * rho * g for m in (16, 64) for rho in (0.1, 0.05)
            }
            (analysis / "m_sharpness.json").write_text(_record("m_sharpness", columns, config))
            norm = {"weight_norm": 5.0 - index / 3, "num_params": 10}
            (analysis / "basic.json").write_text(_record("basic", norm, config))
    return config, runs


@pytest.fixture
def by_hand(tmp_path):
    folder = tmp_path / "by-hand"
    hand_built_study(folder)
    return folder


def _nan_free(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, list):
        return [_nan_free(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_free(v) for k, v in value.items()}
    return value


def test_correlation_files_hold_the_bootstrap_of_the_given_seed(by_hand):
    """correlations.json is correlation_table of the final rows with the report's seed, and
    every correlations.csv cell is its number: τ interval ends in order, the p-value, ψ and
    the group count of each axis."""
    from sharpscope.study.report import correlation_table, final_rows, write_report
    from sharpscope.study.runner import read_results, read_study_dir

    write_report(by_hand, resamples=40, seed=3, figures=False)
    stored = json.loads((by_hand / "correlations.json").read_text())
    finals = final_rows(read_results(by_hand / "results.csv"))
    swept = read_study_dir(by_hand)["swept"]
    want = correlation_table(finals, swept, resamples=40, seed=3)
    assert _nan_free(stored) == _nan_free(json.loads(json.dumps([c.to_dict() for c in want])))
    other_seed = correlation_table(finals, swept, resamples=40, seed=0)
    assert [c.tau_interval for c in other_seed] != [c.tau_interval for c in want]
    by = {(c.measure, c.target): c for c in want}
    rows = list(csv.DictReader((by_hand / "correlations.csv").open()))
    assert len(rows) == len(want)
    for row in rows:
        c = by[(row["measure"], row["gap"])]
        assert int(row["num_models"]) == c.num_models == 7
        for column, value in (
            ("tau", c.tau), ("tau_low", c.tau_interval[0]), ("tau_high", c.tau_interval[1]),
            ("p_value", c.p_value), ("psi_optimizer", c.psi["optimizer"]),
        ):  # fmt: skip
            assert float(row[column] or "nan") == pytest.approx(value, nan_ok=True), column
        assert int(row["groups_optimizer"]) == c.num_groups["optimizer"] == 3  # seeds 0-2
        if math.isfinite(c.tau_interval[0]):
            assert float(row["tau_low"]) <= float(row["tau_high"])


def test_report_counts_and_lists_runs_that_raised(by_hand):
    """A run in state 'error' is one failed run (not one per analysed epoch) and is listed
    with its message; the runs table shows gaps in percent; ψ cells give group counts."""
    from sharpscope.study.report import write_report

    text = write_report(by_hand, resamples=0, figures=False).read_text()
    assert "- runs: 8 (7 finished, 1 failed, 0 pending); swept: optimizer, seed" in text
    # a run trained but stopped before its analyses is named so (`study status` says
    # "analysing"), not counted as pending like a run not yet trained
    (by_hand / "runs" / "sgd-s0" / "status.json").write_text('{"state": "trained"}')
    again = write_report(by_hand, resamples=0, figures=False).read_text()
    assert "(6 finished, 1 failed, 1 trained but not yet analysed, 0 pending)" in again
    (by_hand / "runs" / "sgd-s0" / "status.json").write_text('{"state": "done"}')
    assert "## Failed runs" in text and "- `sam-s3` (error): boom here" in text
    # runs table: sgd-s2's gen_gap 0.40 is 40.0%, its test accuracy 55.0%
    assert "| sgd | 2 | 2 | 55.0% | 40.0% |" in text
    (line,) = [x for x in text.splitlines() if x.startswith("| `lambda_max` |")][:1]
    assert line.count("(3)") == 1 and "| 7 |" in line  # ψ optimizer over 3 seed groups
    assert "- measures on the test split, 256 examples, at epochs 1, last" in text


def test_report_figures_state_the_split_and_plot_every_measure(by_hand):
    """The caption names the analysed split; measures_vs_gap holds up to 9 measures (here
    all 7 correlated ones)."""
    from sharpscope.study.report import measurement_caption, write_report

    assert measurement_caption(by_hand) == "measured on mnist1d/test n=256"
    write_report(by_hand, resamples=0)
    correlations = json.loads((by_hand / "correlations.json").read_text())
    measures = [c["measure"] for c in correlations if c["target"] == "gen_gap"]
    assert len(measures) == 9  # lambda_max, lambda_5, ratio, trace, 4 msharp, weight_norm
    with (by_hand / "figures" / "measures_vs_gap.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header == ["run_id", "optimizer", "gen_gap", *measures]


def test_correlation_table_needs_three_values_and_a_varying_axis():
    """A measure with two finite values is left out, a gap with two finite values gives no
    correlations, and a swept axis that no longer varies among the finished runs is no ψ."""
    from sharpscope.study.report import correlation_table, measure_columns, study_axes

    rows = [
        {"run_id": str(i), "optimizer": opt, "lr": 0.1, "seed": i % 2, "gen_gap": 0.1 * i,
         "loss_gap": 0.2 * i if i < 2 else None, "lambda_max": float(i),
         "trace": float(i) if i < 2 else None}
        for i, opt in enumerate(["sgd", "sam", "sgd", "sam"])
    ]  # fmt: skip
    assert measure_columns(rows) == ["lambda_max"]
    assert study_axes(rows, ["optimizer", "lr", "seed"]) == ["optimizer"]
    (only,) = correlation_table(rows, ["optimizer", "lr", "seed"], resamples=0)
    assert (only.measure, only.target) == ("lambda_max", "gen_gap")
    assert set(only.psi) == {"optimizer"}


# --------------------------------------------------------------------------- reproductions
def test_figures_a_table_and_spectra_of_the_first_seed(by_hand, tmp_path):
    """(a): per (optimizer, epoch) the mean and the sample sd (ddof 1) over seeds, the ratio
    column averages λ1/λ5, the markdown shows test error; the spectra are the lowest seed's."""
    from sharpscope.study import reproductions
    from sharpscope.study.runner import read_results, write_results

    write_results(by_hand)
    out = tmp_path / "figures"
    _, numbers = reproductions.figures_a(by_hand, out)
    rows = [r for r in read_results(by_hand / "results.csv") if r["status"] == "done"]
    table = {(t["optimizer"], t["epoch"]): t for t in numbers["table"]}
    sam = [r for r in rows if r["optimizer"] == "sam" and r["epoch"] == 2]
    entry = table[("sam", 2)]
    assert entry["num_seeds"] == 3
    assert entry["lambda_max_std"] == pytest.approx(statistics.stdev(r["lambda_max"] for r in sam))
    assert entry["ratio"] == pytest.approx(statistics.mean(r["ratio"] for r in sam))
    assert entry["ratio_std"] == pytest.approx(statistics.stdev(r["ratio"] for r in sam))
    assert entry["test_acc"] == pytest.approx(0.80)
    md = (out / "a_spectra_table.md").read_text()
    (line,) = [x for x in md.splitlines() if x.startswith("| sam | 2 |")]
    assert line.endswith("| 20.0% |")
    spectra = json.loads((out / "a_spectra.json").read_text())
    assert set(spectra) == {"sgd", "sam"}
    for label in ("sgd", "sam"):  # seed 0's density: its peak is 1.0 (seed s: 1 + s)
        assert [e["epoch"] for e in spectra[label]] == [1, 2]
        assert all(e["values"] == [0.1, 1.0, 0.1] for e in spectra[label])


def test_figures_c_orders_m_and_rho_and_shows_the_smallest_rho(by_hand, tmp_path):
    from sharpscope.study import reproductions
    from sharpscope.study.runner import write_results

    write_results(by_hand)
    out = tmp_path / "figures"
    _, numbers = reproductions.figures_c(by_hand, out)
    points = [(p["m"], p["rho"], p["num_models"]) for p in numbers["tau_vs_m"]]
    assert points == [(16, 0.05, 7), (16, 0.1, 7), (64, 0.05, 7), (64, 0.1, 7)]
    with (out / "c_msharpness_vs_gap.csv").open() as handle:
        header = next(csv.reader(handle))
    assert header[-2:] == ["msharp_m16_rho0.05", "msharp_m64_rho0.05"]


def _write_results_csv(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(k for r in rows for k in r))
    with (folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, names)
        writer.writeheader()
        writer.writerows(rows)


def _row(run_id, optimizer, seed, **values):
    base = {"run_id": run_id, "status": "done", "optimizer": optimizer, "seed": seed, "epoch": 3}
    return {**base, **values}


def test_figures_b_plots_only_runs_with_m_against_sgd(tmp_path):
    """(b): the m axis holds SAM's runs (not VaSSO's, which has no m); SGD's line is its
    mean test error in percent."""
    from sharpscope.study import reproductions

    rows = [
        _row("sgd-s0", "sgd", 0, test_acc=0.70),
        _row("sgd-s1", "sgd", 1, test_acc=0.60),
        _row("sam-m16-s0", "sam", 0, m=16, test_acc=0.80),
        _row("sam-m64-s0", "sam", 0, m=64, test_acc=0.75),
        _row("vasso-s0", "vasso", 0, test_acc=0.50),
    ]
    _write_results_csv(tmp_path / "b", rows)
    _, numbers = reproductions.figures_b(tmp_path / "b", tmp_path / "figures")
    assert numbers["sgd_test_error"] == {"sgd": pytest.approx(35.0)}
    points = [
        (p["optimizer"], p["m"], p["test_error_pct_mean"]) for p in numbers["test_error_vs_m"]
    ]
    assert points == [("sam", 16, pytest.approx(20.0)), ("sam", 64, pytest.approx(25.0))]


def test_figures_e_names_the_failed_runs(tmp_path):
    from sharpscope.study import reproductions

    rows = [
        _row(f"sgd-noise{n}-s0", "sgd", 0, label_noise=n, test_acc=0.8 - n) for n in (0.0, 0.2)
    ] + [{"run_id": "sam-noise0.2-s0", "status": "failed", "optimizer": "sam", "seed": 0,
          "label_noise": 0.2, "epoch": 1}]  # fmt: skip
    _write_results_csv(tmp_path / "e", rows)
    _, numbers = reproductions.figures_e(tmp_path / "e", tmp_path / "figures")
    assert numbers["failed_runs"] == ["sam-noise0.2-s0"]


def test_figures_f_model_average_and_lets_by_registry_name(tmp_path, monkeypatch):
    """(f): the BMA calibration row holds the model average's accuracy, and a LETS run under
    another label (optimizer_name lets) gets its learned-ρ figure."""
    from sharpscope.study import reproductions
    from sharpscope.study.runner import prepare_study_dir

    folder = tmp_path / "f"
    config = study_config_from_dict(
        {
            "study": {"name": "f"},
            "sweep": {"optimizer": ["sgd"], "seed": [0]},
            "analysis": {"samples": 256, "m_sharpness": {"m": [128], "rho": [0.05]}},
        }
    )
    prepare_study_dir(folder, config, expand_sweep(config))
    assert reproductions.variants_caption(folder).endswith("; m-sharpness m=128, ρ=0.05")
    rows = [
        _row("sgd-s0", "sgd", 0, optimizer_name="sgd", test_acc=0.7, test_ece=0.1, test_nll=1.0),
        _row("bsam-s0", "bsam", 0, optimizer_name="bsam", test_acc=0.6, test_ece=0.2,
             test_nll=1.1, test_acc_bma=0.9, test_ece_bma=0.05, test_nll_bma=0.5),
        _row("lets-adam-s0", "lets-adam", 0, optimizer_name="lets", test_acc=0.65,
             test_ece=0.1, test_nll=1.0),
    ]  # fmt: skip
    _write_results_csv(folder, rows)
    steps = [{"kind": "step", "epoch": 1, "step": s, "rho": 0.05 * s} for s in (1, 2)]
    (folder / "runs" / "lets-adam-s0").mkdir(parents=True)
    (folder / "runs" / "lets-adam-s0" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in steps)
    )
    captions = {}
    save = reproductions._save

    def keep_caption(fig, path, data, caption=""):
        captions[path.name] = caption
        return save(fig, path, data, caption)

    monkeypatch.setattr(reproductions, "_save", keep_caption)
    files, numbers = reproductions.figures_f(folder, tmp_path / "figures")
    # session 27: f_variants' bars are mean ± sd too, and it said so nowhere
    assert "; one seed (no error bars); m-sharpness m=128" in captions["f_variants"]
    assert captions["f_calibration"].endswith("; one seed (no error bars); 15-bin ECE")
    two = [*rows, {**rows[0], "run_id": "sgd-s1", "seed": 1}]
    assert "; mean ± sd over 2 seeds; " in reproductions.variants_caption(folder, two)
    bma = numbers["calibration"]["bsam (BMA)"]
    assert bma["test_acc"] == pytest.approx(0.9) and bma["test_ece"] == pytest.approx(0.05)
    assert "f_lets_rho" in {p.stem for p in files}
    rho = json.loads((tmp_path / "figures" / "f_lets_rho.json").read_text())
    assert rho == {"lets-adam (seed 0)": {"step": [1, 2], "rho": [0.05, 0.1]}}


def test_make_figures_raises_on_runs_that_raised_and_keeps_other_summaries(
    by_hand, tmp_path, monkeypatch
):
    """A run that raises stops `figures` with its message; a rerun of one reproduction keeps
    the other reproductions' entries of figures/summary.json."""
    from sharpscope.study import config as config_module
    from sharpscope.study import reproductions
    from sharpscope.study.runner import load_study_config_from_dir

    config = load_study_config_from_dir(by_hand)
    monkeypatch.setattr(config_module, "load_builtin_config", lambda name: config)
    (by_hand / "runs" / "sam-s3" / "last.pt").write_bytes(b"not a checkpoint")
    figures = tmp_path / "figs"
    figures.mkdir()
    (figures / "summary.json").write_text('{"a": {"title": "kept"}}')
    with pytest.raises(SharpscopeError, match="study by-hand: run sam-s3 raised: "):
        reproductions.make_figures(figures, cache=tmp_path, only=["quick"])
    (by_hand / "runs" / "sam-s3" / "status.json").write_text('{"state": "failed", "error": "x"}')
    reproductions.make_figures(figures, cache=tmp_path, only=["quick"])
    summary = json.loads((figures / "summary.json").read_text())
    assert summary["a"] == {"title": "kept"} and summary["quick"]["runs"] == 7


def test_make_figures_checks_every_cache_folder_before_running(tmp_path):
    """A cache folder that holds something else is refused up front, naming --cache, and
    nothing is written."""
    from sharpscope.study import reproductions

    (tmp_path / "cache" / "quick").mkdir(parents=True)
    (tmp_path / "cache" / "quick" / "notes.txt").write_text("mine")
    with pytest.raises(
        SharpscopeError,
        match=r"is not a sharpscope study folder; choose another cache folder \(--cache\)",
    ):
        reproductions.make_figures(tmp_path / "figs", cache=tmp_path / "cache", only=["quick"])
    assert not (tmp_path / "figs").exists()


# --------------------------------------------------------------------------- runner
def test_run_states_and_completeness_follow_the_analysis_plan(by_hand):
    """A done run missing an analysis is 'analysing'; a run that raised is 'error'; an
    analysis on another split is not the same analysis (it is recomputed)."""
    from sharpscope.study.runner import load_study_config_from_dir, run_is_complete, run_states

    states = {s["run_id"]: s["state"] for s in run_states(by_hand)}
    assert states["sgd-s0"] == "done" and states["sam-s3"] == "error"
    (by_hand / "runs" / "sgd-s0" / "analysis" / "epoch_001" / "spectrum.json").unlink()
    states = {s["run_id"]: s["state"] for s in run_states(by_hand)}
    assert states["sgd-s0"] == "analysing" and states["sgd-s1"] == "done"
    config = load_study_config_from_dir(by_hand)
    run = next(r for r in expand_sweep(config) if r.run_id == "sgd-s1")
    assert run_is_complete(by_hand, run, config)
    values = config.to_dict()
    values["analysis"]["split"] = "train"
    on_train = study_config_from_dict(values)
    assert not run_is_complete(by_hand, run, on_train)


def test_failed_run_row_and_device_change_on_reuse(by_hand):
    """A diverged run's row carries its last evaluated epoch; the same study on another
    device reuses the folder (device is a machine setting, like data_root)."""
    from sharpscope.study.runner import collect_rows, load_study_config_from_dir, prepare_study_dir

    (by_hand / "runs" / "sgd-s3" / "status.json").write_text('{"state": "failed", "error": "d"}')
    rows = [r for r in collect_rows(by_hand) if r["run_id"] == "sgd-s3"]
    assert [(r["status"], r["epoch"]) for r in rows] == [("failed", 2)]
    # diverged before its first evaluation: no epoch (it was 0, which a filter on epoch took)
    (by_hand / "runs" / "sgd-s3" / "metrics.jsonl").write_text("")
    rows = [r for r in collect_rows(by_hand) if r["run_id"] == "sgd-s3"]
    assert [(r["status"], r["epoch"]) for r in rows] == [("failed", None)]
    # `study status` says so too: no epoch, not "0/N" as if an epoch 0 had been evaluated
    from sharpscope.study.runner import run_states

    state = next(s for s in run_states(by_hand) if s["run_id"] == "sgd-s3")
    assert (state["state"], state["epoch"]) == ("failed", None)
    from typer.testing import CliRunner

    from sharpscope.cli import app

    shown = CliRunner().invoke(app, ["study", "status", str(by_hand)])
    assert shown.exit_code == 0, shown.output
    line = next(x for x in shown.output.splitlines() if "sgd-s3" in x)
    assert f"-/{state['epochs']}" in line and f"0/{state['epochs']}" not in line, line
    values = load_study_config_from_dir(by_hand).to_dict()
    values["train"]["device"] = "cpu"
    moved = study_config_from_dict(values)
    prepare_study_dir(by_hand, moved, expand_sweep(moved))
    run = json.loads((by_hand / "runs" / "sgd-s0" / "run.json").read_text())
    assert run["train"]["device"] == "cpu"


def test_interpolation_pairs_share_the_seed_and_wait_for_both_runs(by_hand):
    """SGD and SAM are paired seed by seed; a pair with a run that is not done is skipped
    (it has no final weights)."""
    from sharpscope.study.runner import load_study_config_from_dir, pair_path, pair_runs, run_pairs

    config = load_study_config_from_dir(by_hand)
    runs = expand_sweep(config)
    pairs = [(a.run_id, b.run_id, tag) for a, b, tag in pair_runs(runs, "sgd", "sam")]
    assert pairs == [(f"sgd-s{s}", f"sam-s{s}", f"s{s}") for s in SEEDS]
    values = config.to_dict()
    values["analysis"]["landscape"] = {"interpolate": [["sgd", "sam"]]}
    with_pairs = study_config_from_dict(values)
    for seed in (0, 1, 2):  # already computed: only the pair with sam-s3 (raised) is left
        path = pair_path(by_hand, "sgd", "sam", f"s{seed}")
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"")
    run_pairs(by_hand, with_pairs, runs, log=lambda message: None)
    assert not pair_path(by_hand, "sgd", "sam", "s3").exists()


def test_interpolation_pairs_agree_in_every_swept_hyperparameter_and_have_their_own_files():
    """With lr and label noise swept, all SGD -> SAM pairs were tagged by the seed alone:
    one file was written and the others skipped as done; and only SGD's first lr was paired."""
    from sharpscope.study.runner import pair_runs

    plan = config(
        sweep={
            "optimizer": ["sgd", "sam"],
            "rho": {"sam": [0.05, 0.1]},
            "lr": [0.05, 0.2],
            "label_noise": [0.0, 0.2],
            "seed": [0],
        }
    )
    pairs = pair_runs(expand_sweep(plan), "sgd", "sam")
    assert len(pairs) == 8  # 2 lr x 2 noise, each with both radii
    for a, b, _ in pairs:
        assert (a.params["lr"], a.params["label_noise"]) == (
            b.params["lr"],
            b.params["label_noise"],
        )
    tags = [tag for _, _, tag in pairs]
    assert len(set(tags)) == 8
    assert "rho0.1-lr0.2-noise0.2-s0" in tags
    plain = config(sweep={"optimizer": ["sgd", "sam"], "seed": [0, 1]})
    assert [t for _, _, t in pair_runs(expand_sweep(plain), "sgd", "sam")] == ["s0", "s1"]
    # optimizers whose own lr differ (SGD 0.1, Adam 1e-3: not swept) still pair, seed by seed
    mixed = expand_sweep(config(sweep={"optimizer": ["sgd", "adam", "bsam"], "seed": [0, 1]}))
    for other in ("adam", "bsam"):
        found = [(x.run_id, y.run_id) for x, y, _ in pair_runs(mixed, "sgd", other)]
        assert found == [("sgd-s0", f"{other}-s0"), ("sgd-s1", f"{other}-s1")], other
    # SAM's radii against each other: each unordered pair once, never a run with itself
    radii = config(sweep={"optimizer": ["sam"], "rho": [0.05, 0.1, 0.2], "seed": [0]})
    found = [(x.run_id, y.run_id) for x, y, _ in pair_runs(expand_sweep(radii), "sam", "sam")]
    assert found == [
        ("sam-rho0.05-s0", "sam-rho0.1-s0"),
        ("sam-rho0.05-s0", "sam-rho0.2-s0"),
        ("sam-rho0.1-s0", "sam-rho0.2-s0"),
    ]


# --------------------------------------------------------------------------- shipped settings
def test_shipped_quick_reproductions_have_the_documented_settings():
    """The settings README.md states for the quick reproductions (a)-(f) and `quick`, and
    each reproduction's configs name it."""
    from sharpscope.study.config import builtin_config_names, load_builtin_config
    from sharpscope.study.reproductions import REPRODUCTIONS

    names = builtin_config_names()
    for key, reproduction in REPRODUCTIONS.items():
        assert reproduction.quick in names and reproduction.quick.endswith("quick"), key
        if key != "quick":
            assert reproduction.full in names and reproduction.full.endswith("-full"), key
            for name in (reproduction.quick, reproduction.full):
                assert load_builtin_config(name).reproduction == key, name

    def runs_of(key):
        config = load_builtin_config(REPRODUCTIONS[key].quick)
        return config, expand_sweep(config)

    for key in "abcdef":
        config, runs = runs_of(key)
        for run in runs:
            train, params = run.train, run.params
            assert train["dataset"]["name"] == "mnist1d", key
            assert {k: train["model"][k] for k in ("name", "width", "depth")} == {
                "name": "mlp", "width": 256, "depth": 2}, key  # fmt: skip
            if key in "ef":  # LETS' validation stream; SAM-ON needs normalization layers
                assert train["dataset"]["val_fraction"] == 0.1 and train["model"]["norm"] == "batch"
            if params["optimizer"] == "bsam":
                assert params["lr"] == 1.0 and train["optimizer"]["data_aug_factor"] == 10
            elif key != "c":
                assert (params["lr"], params["momentum"], params["weight_decay"]) == (
                    0.1,
                    0.9,
                    5e-4,
                )
            if key != "c":
                assert params["batch_size"] == 128, key
        if config.analysis.measures:
            assert config.analysis.samples == 512, key
    config, runs = runs_of("a")
    assert {(r.params["optimizer"], r.params["rho"], r.params["seed"]) for r in runs} == {
        ("sgd", None, 0), ("sgd", None, 1), ("sam", 0.1, 0), ("sam", 0.1, 1)}  # fmt: skip
    assert {tuple(r.analysis_epochs) for r in runs} == {(1, 10, 30)}
    config, runs = runs_of("b")
    sam = [r for r in runs if r.params["optimizer"] == "sam"]
    assert sorted({r.params["m"] for r in sam}) == [4, 16, 32, 128]
    assert {(r.params["rho"], r.params["epochs"]) for r in sam} == {(0.1, 20)}
    assert sorted({r.params["seed"] for r in runs}) == [0, 1]
    config, runs = runs_of("c")
    assert len(runs) == 18
    assert sorted({r.params["lr"] for r in runs}) == [0.02, 0.05, 0.2]
    assert sorted({r.params["batch_size"] for r in runs}) == [64, 256]
    assert config.analysis.measures["m_sharpness"]["m"] == [1, 4, 16, 64, 256]
    config, runs = runs_of("e")
    assert sorted({r.params["label_noise"] for r in runs}) == [0.0, 0.2, 0.4, 0.6]
    assert {r.params["epochs"] for r in runs} == {15}
    config, runs = runs_of("f")
    assert {r.params["epochs"] for r in runs} == {15}
    assert sorted({r.params["seed"] for r in runs}) == [0, 1]
    config, runs = runs_of("quick")
    assert len(runs) == 36 and {r.params["epochs"] for r in runs} == {30}
    sam = {r.params["rho"] for r in runs if r.params["optimizer"] == "sam"}
    assert sam == {0.05, 0.1, 0.2}
    assert sorted({r.params["lr"] for r in runs}) == [0.05, 0.1]
    assert sorted({r.params["seed"] for r in runs}) == [0, 1, 2]


def test_the_report_spectra_figure_says_how_many_optimizers_it_shows(tmp_path):
    """It stopped at 4 optimizers while its caption said "of each optimizer"."""
    from sharpscope.plotting.style import save_figure
    from sharpscope.study.report import MAX_SPECTRA, _report_figures
    from sharpscope.study.runner import prepare_study_dir

    labels = ["sgd", "sam", "asam", "vasso", "samon", "adam", "adamw"]
    train = {**TRAIN, "model": {"name": "mlp", "width": 16, "norm": "batch"}}  # for SAM-ON
    plan = study_config_from_dict({"train": train, "sweep": {"optimizer": labels, "seed": [0]}})
    runs = expand_sweep(plan)
    prepare_study_dir(tmp_path, plan, runs)
    density = {"grid": [0.0, 1.0, 2.0], "values": [1.0, 0.1, 0.01]}
    for run in runs:
        folder = (
            tmp_path / "runs" / run.run_id / "analysis" / f"epoch_{run.analysis_epochs[-1]:03d}"
        )
        folder.mkdir(parents=True)
        result = {"density": density, "lambda_max": 2.0}
        (folder / "spectrum.json").write_text(json.dumps({"result": result}))
    lines = _report_figures(tmp_path, [], [], runs, save_figure, 0, plan)
    assert MAX_SPECTRA == 6
    assert any("the first run of the first 6 of 7 optimizers" in line for line in lines)
    shown = json.loads((tmp_path / "figures" / "spectra.json").read_text())
    assert len(shown) == 6


def test_the_report_setup_line_shows_swept_training_settings():
    """A swept batch size read as the default: "batch size: 128"."""
    from sharpscope.study.report import _values

    runs = expand_sweep(config(sweep={"optimizer": ["sgd"], "batch_size": [32, 128], "seed": [0]}))
    assert _values(runs, "batch_size") == "32, 128 (swept)"
    assert _values(runs, "epochs") == "4"
