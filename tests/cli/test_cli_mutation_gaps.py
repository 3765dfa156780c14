"""Gaps found by a mutation audit of ``sharpscope/cli``: flags that must reach the analysis
or the training spec, the defaults of interface.md and the README, what is printed and
recorded, and one-line errors (CliRunner on tiny checkpoints, as the other CLI tests)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sharpscope.analysis.landscape import LandscapeResult
from sharpscope.analysis.msharpness import m_sharpness
from sharpscope.cli import app
from sharpscope.data import load_data
from sharpscope.io import load_checkpoint

from cases import tiny_study_toml, write_checkpoint

runner = CliRunner()
MLP = {"name": "mlp", "width": 8, "depth": 1}  # digits, 610 parameters
CNN = {"name": "cnn1d", "norm": "batch", "width": 4, "depth": 2}  # MNIST-1D
FAST = ["--samples", "64", "--probes", "2", "--lanczos-steps", "8", "--trace-probes", "9"]
FAST += ["--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def mlp_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mlp") / "tiny.pt"
    return write_checkpoint(path, MLP, (1, 8, 8), {"name": "digits"})


@pytest.fixture(scope="module")
def cnn_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "tiny.pt"
    return write_checkpoint(path, CNN, (40,), {"name": "mnist1d"})


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def one_error_line(result) -> str:
    """The single ``error:`` line of a failed command (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def spectrum_json(ckpt, tmp_path, *extra, name="s.json"):
    out = tmp_path / name
    result = ok(runner.invoke(app, ["spectrum", str(ckpt), *FAST, *extra, "--json", str(out)]))
    return json.loads(out.read_text()), result


# ---------------------------------------------------------------- spectrum


def cli_defaults(*command: str) -> dict[str, object]:
    """``--flag -> default`` of a command, as typer uses them when a flag is not given
    (and ``--help`` shows them)."""
    import typer.main

    group = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]
    return {flag: param.default for param in group.params for flag in param.opts}


def test_spectrum_defaults_are_those_of_the_readme():
    """SLQ 90 steps x 10 probes with Ghorbani's kernel, Hutch++, tol 1e-5, top 5."""
    defaults = cli_defaults("spectrum")
    assert (defaults["--probes"], defaults["--lanczos-steps"], defaults["--k"]) == (10, 90, 5)
    assert defaults["--kernel"] == "ghorbani" and defaults["--trace-method"] == "hutchpp"
    assert defaults["--tol"] == 1e-5


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        (["--kernel", "papyan"], lambda d: d["density"]["kernel"] == "papyan"),
        (["--deflate", "2"], lambda d: len(d["density"]["deflated"]) == 2),
        (
            ["--trace-method", "hutchinson", "--trace-probes", "4"],
            lambda d: (
                d["trace_method"] == "hutchinson"
                and d["meta"]["extra"]["hvp_count_parts"]["trace"] == 4
            ),
        ),
        ([], lambda d: d["meta"]["extra"]["hvp_count_parts"]["trace"] == 9),  # FAST's 9
        (["--hvp-mode", "forward"], lambda d: d["meta"]["extra"]["hvp_mode"] == "forward"),
        (
            ["--batch-size", "16"],
            lambda d: (
                (d["meta"]["extra"]["num_batches"], d["meta"]["extra"]["max_batch_size"]) == (4, 16)
            ),
        ),
        (
            ["--seed", "4"],
            lambda d: d["meta"]["seed"] == 4 and d["meta"]["extra"]["seeds"]["top"] == 4,
        ),
        (["--dtype", "float64"], lambda d: d["meta"]["dtype"] == "float64"),
    ],
    ids=[
        "kernel",
        "deflate",
        "trace-method",
        "trace-probes",
        "hvp-mode",
        "batch-size",
        "seed",
        "dtype",
    ],
)
def test_spectrum_flags_reach_the_analysis_and_its_record(mlp_ckpt, tmp_path, extra, check):
    data, _ = spectrum_json(mlp_ckpt, tmp_path, *extra)
    assert check(data), data["meta"]["extra"]


def test_spectrum_weight_decay_shifts_every_eigenvalue_by_wd(mlp_ckpt, tmp_path):
    plain, _ = spectrum_json(mlp_ckpt, tmp_path, "--dtype", "float64", name="plain.json")
    wd, _ = spectrum_json(
        mlp_ckpt, tmp_path, "--dtype", "float64", "--weight-decay", "0.5", name="wd.json"
    )
    assert wd["meta"]["extra"]["weight_decay"] == 0.5
    shifted = [v + 0.5 for v in plain["eigenvalues"]]
    assert wd["eigenvalues"] == pytest.approx(shifted, rel=1e-6)


def test_spectrum_prints_the_values_it_writes(mlp_ckpt, tmp_path):
    data, result = spectrum_json(mlp_ckpt, tmp_path)
    printed = dict(
        line.split(": ", 1)
        for line in result.stdout.splitlines()
        if line.startswith(("lambda", "trace"))
    )
    assert float(printed["lambda_max"]) == pytest.approx(data["lambda_max"], rel=1e-5)
    assert float(printed["lambda_5"]) == pytest.approx(data["lambda_5"], rel=1e-5)
    assert float(printed["lambda_max/lambda_5"]) == pytest.approx(data["ratio"], rel=1e-5)
    trace, stderr = re.fullmatch(r"(\S+) \+- (\S+) \(hutchpp\)", printed["trace"]).groups()
    assert float(trace) == pytest.approx(data["trace"], rel=1e-5)
    assert float(stderr) == pytest.approx(data["trace_stderr"], rel=1e-5)


def test_max_steps_equal_to_k_is_allowed_and_unconverged_values_are_flagged(mlp_ckpt, tmp_path):
    """Lanczos finds at most one eigenvalue per step, so --max-steps k is the least allowed;
    five steps leave residuals above a tight tol, which the summary says."""
    data, result = spectrum_json(mlp_ckpt, tmp_path, "--max-steps", "5", "--tol", "1e-12")
    assert len(data["eigenvalues"]) == 5 and not all(data["converged"])
    bad = [i + 1 for i, c in enumerate(data["converged"]) if not c]
    assert f"warning: eigenvalue(s) {bad} have residuals above tol 1e-12" in result.stdout


def test_restart_size_equal_to_k_is_refused(mlp_ckpt):
    result = runner.invoke(app, ["spectrum", str(mlp_ckpt), *FAST, "--restart-size", "5"])
    assert "--restart-size 5 must be larger than --k 5" in one_error_line(result)


def test_deflating_exactly_every_parameter_fails_before_the_top_k(mlp_ckpt):
    result = runner.invoke(app, ["spectrum", str(mlp_ckpt), *FAST, "--deflate", "610"])
    line = one_error_line(result)
    assert "--deflate 610 must be fewer than the number of parameters (610)" in line


def test_pyhessian_backend_takes_a_trace_budget_of_its_own(mlp_ckpt, tmp_path):
    """Hutch++'s multiple-of-3 rule is the sharpscope backend's: PyHessian takes 10."""
    pytest.importorskip("pyhessian")
    args = [a for a in FAST if a not in ("--trace-probes", "9")]
    result = runner.invoke(
        app,
        ["spectrum", str(mlp_ckpt), *args, "--backend", "pyhessian", "--k", "1"]
        + ["--trace-probes", "10"],
    )
    ok(result)
    assert "pyhessian-hutchinson" in result.stdout


# ---------------------------------------------------------------- msharpness


def msharpness_json(ckpt, tmp_path, *extra, name="ms.json"):
    out = tmp_path / name
    args = ["msharpness", str(ckpt), "--samples", "64", "--device", "cpu", "--no-progress"]
    result = ok(runner.invoke(app, [*args, *extra, "--json", str(out)]))
    return json.loads(out.read_text()), result


def test_msharpness_defaults_are_those_of_the_interface(cnn_ckpt, tmp_path):
    """interface.md: msharpness CKPT [--m 128] [--rho 0.05] [--steps 1]."""
    saved, result = msharpness_json(cnn_ckpt, tmp_path, "--samples", "256")
    assert (saved["m"], saved["rho"], saved["steps"], saved["adaptive"]) == (128, 0.05, 1, False)
    assert saved["num_subsets"] == 2
    assert "m-sharpness (m=128, rho=0.05, l2, 1 step)" in result.stdout


@pytest.mark.parametrize(
    ("extra", "settings", "api"),
    [
        (
            ["--adaptive", "--eta", "0.5"],
            {"adaptive": True, "eta": 0.5},
            {"adaptive": True, "eta": 0.5},
        ),
        (["--logit-normalize"], {"logit_normalize": True}, {"logit_normalize": True}),
        (
            ["--random-start", "--restarts", "2", "--seed", "3"],
            {"random_start": True, "restarts": 2},
            {"random_start": True, "restarts": 2, "seed": 3},
        ),
        (
            ["--adaptive", "--steps", "2", "--projection", "rescale"],
            {"projection": "rescale", "steps": 2},
            {"adaptive": True, "steps": 2, "projection": "rescale"},
        ),
    ],
    ids=["eta", "logit-normalize", "random-start", "projection"],
)
def test_msharpness_flags_reach_the_analysis(cnn_ckpt, tmp_path, extra, settings, api):
    """Each flag is recorded in the JSON, and the value is the API's with that setting."""
    saved, _ = msharpness_json(cnn_ckpt, tmp_path, "--m", "16", "--rho", "0.1", *extra)
    for key, value in settings.items():
        assert saved[key] == value, key
    split = load_data("mnist1d", "train", samples=64, seed=api.get("seed", 0))
    direct = m_sharpness(load_checkpoint(cnn_ckpt).model, split.pair(), m=16, rho=0.1, **api)
    assert saved["sharpness"] == pytest.approx(direct.sharpness, rel=1e-5)


def test_msharpness_seed_moves_the_random_starts(cnn_ckpt, tmp_path):
    args = ["--m", "16", "--rho", "0.1", "--random-start"]
    zero, _ = msharpness_json(cnn_ckpt, tmp_path, *args, name="s0.json")
    # the same 64 examples (a subset of the checkpoint's data set is fixed by its own spec)
    three, _ = msharpness_json(
        cnn_ckpt, tmp_path, *args, "--seed", "3", "--data-opt", "seed=0", name="s3.json"
    )
    assert three["meta"]["seed"] == 3
    assert three["clean_loss"] == pytest.approx(zero["clean_loss"], rel=1e-6)
    assert three["sharpness"] != zero["sharpness"]


def test_msharpness_summary_line_says_adaptive_and_prints_the_error_increase(cnn_ckpt, tmp_path):
    saved, result = msharpness_json(cnn_ckpt, tmp_path, "--m", "16", "--rho", "0.5", "--adaptive")
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith("adaptive m-sharpness (m=16, rho=0.5, l2, 1 step): ")
    loss, error = re.search(r"step\): (\S+), 0-1 error increase (\S+) over", line).groups()
    assert float(loss) == pytest.approx(saved["sharpness"], rel=1e-5)
    assert float(error) == pytest.approx(saved["error_increase"], rel=1e-5, abs=1e-12)
    assert saved["sharpness"] != saved["error_increase"]


# ---------------------------------------------------------------- landscape

LAND = ["--samples", "32", "--device", "cpu", "--no-progress", "--no-plots"]


def landscape_run(ckpt, out, *extra):
    result = ok(runner.invoke(app, ["landscape", str(ckpt), *LAND, *extra, "--out", str(out)]))
    return LandscapeResult.load(out / "landscape.npz"), result


def test_landscape_defaults_are_those_of_the_interface(cnn_ckpt, tmp_path):
    """interface.md: [--dims 1|2] [--grid 41] [--span 1.0]; the default --out is ./landscape."""
    assert cli_defaults("landscape")["--dims"] == 2
    saved, _ = landscape_run(cnn_ckpt, tmp_path / "l", "--dims", "1")
    assert saved.loss.shape == (41,)
    torch.testing.assert_close(saved.x, torch.linspace(-1, 1, 41, dtype=torch.float64))
    assert (saved.norm, saved.bias) == ("filter", "ignore")


def test_landscape_without_out_writes_to_the_landscape_folder(cnn_ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["landscape", str(cnn_ckpt), *LAND, "--dims", "1", "--grid", "3"]
    ok(runner.invoke(app, args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landscape"]
    assert LandscapeResult.load(tmp_path / "landscape" / "landscape.npz").complete


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        (["--norm", "layer"], lambda r: r.norm == "layer"),
        (["--bias", "keep"], lambda r: r.bias == "keep"),
    ],
    ids=["norm", "bias"],
)
def test_landscape_direction_options_reach_the_analysis(cnn_ckpt, tmp_path, extra, check):
    saved, _ = landscape_run(cnn_ckpt, tmp_path / "l", "--dims", "1", "--grid", "3", *extra)
    assert check(saved)


def test_landscape_no_states_keeps_the_running_statistics_fixed(cnn_ckpt, tmp_path):
    other = write_checkpoint(tmp_path / "b.pt", CNN, (40,), {"name": "mnist1d"}, seed=1)
    args = ["--dims", "1", "--grid", "3", "--directions", str(other)]
    default, _ = landscape_run(cnn_ckpt, tmp_path / "d", *args)
    fixed, _ = landscape_run(cnn_ckpt, tmp_path / "f", *args, "--no-states")
    assert default.states and not fixed.states
    assert not torch.equal(default.loss, fixed.loss)


def test_landscape_seed_draws_other_random_directions(cnn_ckpt, tmp_path):
    zero, _ = landscape_run(cnn_ckpt, tmp_path / "s0", "--dims", "1", "--grid", "3")
    args = ["--dims", "1", "--grid", "3", "--seed", "1", "--data-opt", "seed=0"]
    one, _ = landscape_run(cnn_ckpt, tmp_path / "s1", *args)
    assert one.meta.seed == 1
    assert not torch.allclose(one.directions, zero.directions)
    assert float(one.loss[1]) == pytest.approx(float(zero.loss[1]), rel=1e-6)  # same centre


def test_pca_folder_keeps_the_centre_once_and_orders_the_trajectory_by_epoch(tmp_path):
    """The checkpoint analysed may sit in the folder of its trajectory (runs keep
    last.pt beside epoch_NNN.pt): it is the trajectory's end, counted once (its row is 0),
    whether or not an epoch file repeats it (session 26: a distinct last.pt was left out,
    a repeated one kept). The trajectory is in epoch order, whatever the file names."""
    import shutil

    ordered, shuffled = tmp_path / "ordered", tmp_path / "shuffled"
    ordered.mkdir()
    shuffled.mkdir()
    names = {1: "c.pt", 2: "a.pt", 3: "b.pt"}  # name order a, b, c = epochs 2, 3, 1
    for epoch in (1, 2, 3):
        for folder, name in ((ordered, f"epoch_{epoch:03d}.pt"), (shuffled, names[epoch])):
            write_checkpoint(
                folder / name, CNN, (40,), {"name": "mnist1d"}, seed=10 + epoch, epoch=epoch
            )
    centre = write_checkpoint(ordered / "last.pt", CNN, (40,), {"name": "mnist1d"}, epoch=4)
    shutil.copy(centre, shuffled / "0.pt")  # first by name, last by epoch
    args = ["--dims", "1", "--grid", "3"]
    first, _ = landscape_run(centre, tmp_path / "p1", *args, "--directions", str(ordered))
    second, _ = landscape_run(centre, tmp_path / "p2", *args, "--directions", str(shuffled))
    assert first.trajectory.shape == (4, 1)
    torch.testing.assert_close(first.trajectory, second.trajectory)
    assert not torch.allclose(first.trajectory[0], first.trajectory[1])
    assert float(first.trajectory[-1].abs().max()) == 0.0
    # an epoch file that repeats last.pt: the same four points
    shutil.copy(centre, ordered / "epoch_004.pt")
    third, _ = landscape_run(centre, tmp_path / "p3", *args, "--directions", str(ordered))
    torch.testing.assert_close(first.trajectory, third.trajectory)


def test_landscape_summary_names_the_smallest_loss_and_where(cnn_ckpt, tmp_path):
    saved, result = landscape_run(cnn_ckpt, tmp_path / "l", "--dims", "1", "--grid", "5")
    at = int(saved.loss.argmin())
    assert f"min loss {float(saved.loss[at]):.6g} at ({float(saved.x[at]):.4g})" in result.stdout


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--dims", "3"], "--dims must be 1 or 2, got 3"),
        (["--bias", "drop"], "--bias must be one of"),
    ],
    ids=["dims", "bias"],
)
def test_landscape_dims_and_bias_are_checked_in_one_line(cnn_ckpt, tmp_path, extra, message):
    result = runner.invoke(
        app, ["landscape", str(cnn_ckpt), *LAND, *extra, "--out", str(tmp_path / "x")]
    )
    assert message in one_error_line(result)
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- train

TINY = ["--dataset", "mnist1d", "--samples", "256", "--model", "mlp", "--model-opt", "width=16"]
TINY += ["--model-opt", "depth=1", "--epochs", "1", "--batch-size", "64", "--device", "cpu"]
TINY += ["--no-progress"]


def trained(tmp_path, *args, tiny=TINY):
    out = tmp_path / "run"
    result = ok(runner.invoke(app, ["train", *tiny, *args, "--out", str(out)]))
    return torch.load(out / "last.pt", weights_only=True), result


@pytest.mark.parametrize(
    ("args", "check"),
    [
        (
            ["--optimizer", "sgd", "--momentum", "0.5", "--weight-decay", "0.001", "--nesterov"],
            lambda raw: (
                (raw["optimizer"]["momentum"], raw["optimizer"]["weight_decay"]) == (0.5, 0.001)
                and raw["optimizer"]["nesterov"] is True
            ),
        ),
        (
            ["--optimizer", "asam", "--eta", "0.02"],
            lambda raw: raw["optimizer"]["eta"] == 0.02,
        ),
        (
            ["--optimizer", "lets", "--rho-min", "0.01", "--rho-max", "0.3"],
            lambda raw: (raw["optimizer"]["rho_min"], raw["optimizer"]["rho_max"]) == (0.01, 0.3),
        ),
        (["--optimizer", "bsam", "--lr", "0.2"], lambda raw: raw["optimizer"]["lr"] == 0.2),
        (
            ["--optimizer", "sam", "--base", "adam", "--lr", "0.002"],
            lambda raw: (
                raw["optimizer"]["base"]["name"] == "adam"
                and raw["optimizer"]["base"]["lr"] == 0.002
            ),
        ),
        (
            ["--optimizer", "sam", "--opt", "bn_policy=both"],
            lambda raw: raw["optimizer"]["bn_policy"] == "both",
        ),
        (["--optimizer", "sam", "--m", "16"], lambda raw: raw["optimizer"]["m"] == 16),
        (["--label-noise", "0.2"], lambda raw: raw["data"]["label_noise"] == 0.2),
        (["--data-opt", "noise_seed=3"], lambda raw: raw["data"]["noise_seed"] == 3),
        (["--seed", "3"], lambda raw: raw["config"]["seed"] == 3),
        (["--loss", "mse"], lambda raw: raw["loss"] == "mse" and raw["config"]["loss"] == "mse"),
        (
            ["--schedule", "constant"],
            lambda raw: raw["config"]["schedule"]["name"] == "constant",
        ),
    ],
    ids=[
        "sgd-base",
        "eta",
        "rho-min-max",
        "bsam-lr",
        "base",
        "opt",
        "m",
        "label-noise",
        "data-opt",
        "seed",
        "loss",
        "schedule",
    ],
)
def test_train_flags_reach_the_checkpoint(tmp_path, args, check):
    """Each flag ends in the spec or config the checkpoint stores (what resume and the
    analyses read back)."""
    raw, _ = trained(tmp_path, *args)
    assert check(raw), {k: raw[k] for k in ("optimizer", "data", "loss")}


def test_data_is_the_short_spelling_of_dataset(tmp_path):
    tiny = [a if a != "--dataset" else "--data" for a in TINY]
    raw, _ = trained(tmp_path, tiny=tiny)
    assert raw["data"]["name"] == "mnist1d"


def test_the_same_optimizer_as_the_config_keeps_the_configs_hyperparameters(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('optimizer = {name = "adam", lr = 0.003}\n')
    raw, _ = trained(tmp_path, "--config", str(config), "--optimizer", "adam")
    assert raw["optimizer"]["name"] == "adam" and raw["optimizer"]["lr"] == 0.003


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--momentum", "-0.5"], "--momentum must be a finite number >= 0, got -0.5"),
        (["--optimizer", "bsam", "--base", "adam"], "--base does not apply"),
        (["--optimizer", "sam", "--base", "rmsprop"], "unknown base optimizer 'rmsprop'"),
    ],
    ids=["momentum", "bsam-base", "unknown-base"],
)
def test_train_refuses_in_one_line(tmp_path, args, message):
    result = runner.invoke(app, ["train", *TINY, *args, "--out", str(tmp_path / "x")])
    assert message in one_error_line(result)
    assert not (tmp_path / "x").exists()


def test_train_summary_names_the_test_accuracy_and_the_files_written(tmp_path):
    raw, result = trained(tmp_path, "--optimizer", "sgd")
    metrics = raw["metrics"]
    assert metrics["test_acc"] != metrics["train_acc"]
    assert f"test accuracy {metrics['test_acc']:.4f}, " in result.stdout
    assert f"train accuracy {metrics['train_acc']:.4f}, " in result.stdout
    out = tmp_path / "run"
    written = f"wrote {out / 'last.pt'}, {out / 'metrics.jsonl'} and {out / 'config.json'}"
    assert written in " ".join(result.stderr.split()) and "epoch checkpoint" not in result.stderr
    assert (out / "config.json").is_file()


# ---------------------------------------------------------------- study, figures, bench

STUDY = tiny_study_toml("cli-gaps", m=[16])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study run with the default --report: report.md and its figures are written."""
    root = tmp_path_factory.mktemp("study")
    config = root / "tiny.toml"
    config.write_text(STUDY)
    out = root / "study"
    result = runner.invoke(app, ["study", "run", str(config), "--out", str(out), "--workers", "1"])
    return out, result


def test_study_run_writes_the_report_by_default(study):
    out, result = study
    ok(result)
    assert (out / "report.md").is_file() and (out / "figures" / "correlations.pdf").is_file()
    assert f"report: {out / 'report.md'}" in " ".join(result.output.split())


def table_cells(output: str, measure: str, gap: str) -> list[str]:
    [line] = [line for line in output.splitlines() if f" {measure} " in line and gap in line]
    return [cell.strip() for cell in re.split(r"[│|┃]", line) if cell.strip()]


def test_study_report_takes_its_resamples_and_no_figures(study, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(study[0], folder)
    shutil.rmtree(folder / "figures")
    args = ["study", "report", str(folder), "--resamples", "20", "--no-figures"]
    result = ok(runner.invoke(app, args))
    assert "bootstrap: 20 resamples" in (folder / "report.md").read_text()
    assert not (folder / "figures").exists()
    # the table on the screen is correlations.csv's: tau, its interval, then Psi
    rows = list(csv.DictReader((folder / "correlations.csv").open()))
    row = next(r for r in rows if r["measure"] == "msharp_m16_rho0.05")
    cells = table_cells(result.stdout, "msharp_m16_rho0.05", row["gap"])
    tau, low, high, psi = (
        f"{float(row[k]):+.2f}" if row[k] else "–"
        for k in ("tau", "tau_low", "tau_high", "psi_overall")
    )
    assert tau != psi
    assert cells[2:] == [tau, f"[{low}, {high}]", psi]


def test_study_run_with_runs_that_raised_exits_2_naming_the_first(tmp_path):
    factory = tmp_path / "broken.py"
    factory.write_text("def model():\n    raise RuntimeError('no weights here')\n")
    config = tmp_path / "err.toml"
    config.write_text(
        STUDY.replace(
            'model = {name = "mlp", width = 8, depth = 1}',
            f'model = {{factory = "{factory}:model"}}',
        )
        .replace('optimizer = ["sgd", "sam"]', 'optimizer = ["sgd"]')
        .replace("seed = [0, 1]", "seed = [0]")
    )
    args = ["study", "run", str(config), "--out", str(tmp_path / "s"), "--no-report"]
    result = runner.invoke(app, [*args, "--workers", "1"])
    line = one_error_line(result)
    assert line.startswith("error: 1 run(s) raised errors (rerun to retry them); first: sgd-s0: ")
    assert "no weights here" in line


def test_figures_passes_its_folders_and_workers(monkeypatch, tmp_path):
    import sharpscope.study.executors as executors
    import sharpscope.study.reproductions as reproductions

    seen = []
    monkeypatch.setattr(executors, "default_workers", lambda: 7)
    monkeypatch.setattr(
        reproductions, "make_figures", lambda out, **kwargs: seen.append((out, kwargs)) or []
    )
    monkeypatch.chdir(tmp_path)
    ok(runner.invoke(app, ["figures"]))
    ok(runner.invoke(app, ["figures", "--workers", "2", "--only", "a", "--out", "f"]))
    (out, first), (out2, second) = seen
    assert out == Path("figures") and first["cache"] == Path("runs") / "studies"
    assert first["workers"] == 7 and first["only"] is None
    assert out2 == Path("f") and second["workers"] == 2 and second["only"] == ["a"]


def test_unknown_benchmark_names_the_choices():
    result = runner.invoke(app, ["bench", "nosuch"])
    line = one_error_line(result)
    assert line == (
        "error: unknown benchmark 'nosuch'; choose one of: optimizers, spectrum, msharpness, "
        "landscape"
    )


# ---------------------------------------------------------------- shared pieces


def test_debug_shows_the_traceback_instead_of_one_line(tmp_path):
    from sharpscope.errors import SharpscopeError

    result = runner.invoke(app, ["--debug", "spectrum", str(tmp_path / "missing.pt")])
    assert isinstance(result.exception, SharpscopeError)
    assert "checkpoint not found" in str(result.exception)
    plain = runner.invoke(app, ["spectrum", str(tmp_path / "missing.pt")])
    assert one_error_line(plain).startswith("error: checkpoint not found")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc and /sys")
@pytest.mark.parametrize("place", ["/proc", "/sys"])
def test_an_output_place_that_refuses_files_is_one_line(cnn_ckpt, place):
    """Paths the early checks cannot foresee (a file system that takes no new files) end
    in one line through the command's guard, not a traceback."""
    args = ["msharpness", str(cnn_ckpt), "--m", "16", "--samples", "64", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--no-progress", "--json", f"{place}/ms.json"])
    assert one_error_line(result).startswith("error: ")


def test_infinite_numbers_are_refused(cnn_ckpt):
    args = ["msharpness", str(cnn_ckpt), "--samples", "64", "--device", "cpu", "--rho", "inf"]
    result = runner.invoke(app, args)
    assert "--rho must be a finite number > 0, got inf" in one_error_line(result)


def test_option_values_false_and_dashed_keys(tmp_path, cnn_ckpt):
    raw, _ = trained(tmp_path, "--optimizer", "asam", "--opt", "normalize_bias=false")
    assert raw["optimizer"]["normalize_bias"] is False
    saved, _ = msharpness_json(cnn_ckpt, tmp_path, "--m", "16", "--data-opt", "label-noise=0.5")
    assert saved["meta"]["data"]["label_noise"] == 0.5


def test_data_opt_overrides_a_key_of_the_checkpoints_own_data_spec(tmp_path):
    ckpt = write_checkpoint(
        tmp_path / "noisy.pt", CNN, (40,), {"name": "mnist1d", "label_noise": 0.2}
    )
    saved, _ = msharpness_json(ckpt, tmp_path, "--m", "16", "--data-opt", "label_noise=0.5")
    assert saved["meta"]["data"]["label_noise"] == 0.5


def test_the_checkpoints_own_loss_is_the_default(tmp_path):
    ckpt = write_checkpoint(tmp_path / "mse.pt", CNN, (40,), {"name": "mnist1d"}, loss="mse")
    saved, _ = msharpness_json(ckpt, tmp_path, "--m", "16", "--rho", "0.1")
    assert saved["loss"] == "mse"
    split = load_data("mnist1d", "train", samples=64, seed=0)
    direct = m_sharpness(load_checkpoint(ckpt).model, split.pair(), m=16, rho=0.1, loss="mse")
    assert saved["sharpness"] == pytest.approx(direct.sharpness, rel=1e-5)


def test_data_root_reaches_the_loader(tmp_path):
    from cases import write_cifar

    write_cifar(tmp_path / "cifar", "cifar10")
    ckpt = write_checkpoint(tmp_path / "c.pt", MLP, (3, 32, 32), {"name": "cifar10"})
    args = ["--m", "5", "--data-root", str(tmp_path / "cifar")]
    out = tmp_path / "c.json"
    cmd = ["msharpness", str(ckpt), "--device", "cpu", "--no-progress", *args, "--json", str(out)]
    ok(runner.invoke(app, cmd))
    saved = json.loads(out.read_text())
    assert saved["meta"]["num_samples"] == 30 and saved["num_subsets"] == 6


def test_a_message_with_a_line_break_is_cut_to_its_first_line(tmp_path):
    """The guard prints the first line of an error whose text runs over several (here a
    path with a line break in its name), so the error stays one line."""
    result = runner.invoke(app, ["msharpness", str(tmp_path / "no\nsuch.pt"), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines() == [f"error: checkpoint not found: {tmp_path}/no"]


@pytest.mark.skipif(
    not Path("/proc/self").is_dir() or os.geteuid() != 0,
    reason="needs Linux /proc and /sys, and root (whom the early write check lets through)",
)
@pytest.mark.parametrize("place", ["/proc", "/sys"])
def test_an_unwritable_output_is_named_as_given(cnn_ckpt, place):
    args = ["msharpness", str(cnn_ckpt), "--m", "16", "--samples", "64", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--no-progress", "--json", f"{place}/ms.json"])
    line = one_error_line(result)
    assert f"{place}/ms.json" in line and ".tmp" not in line


def test_bad_input_without_out_is_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", *TINY, "--val-fraction", "1.5"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr.strip().splitlines() == [
        "error: --val-fraction must be in [0, 1), got 1.5"
    ]


def test_resume_shows_the_progress_bar_unless_this_call_hides_it(tmp_path):
    """--no-progress of the first call is not a setting of the run: the resumed call
    shows the bar again (and takes a --no-progress of its own)."""
    out = tmp_path / "run"
    tiny = [*TINY[: TINY.index("--epochs")], "--epochs", "2", *TINY[TINY.index("--batch-size") :]]
    first = ok(runner.invoke(app, ["train", *tiny, "--save-every", "1", "--out", str(out)]))
    assert "and 2 epoch checkpoints (epoch_001.pt … epoch_002.pt)" in " ".join(first.stderr.split())
    half = (out / "epoch_001.pt").read_bytes()
    for hidden in (False, True):
        (out / "last.pt").write_bytes(half)  # back to the end of epoch 1
        extra = ["--no-progress"] if hidden else []
        result = ok(runner.invoke(app, ["train", "--out", str(out), "--resume", *extra]))
        assert result.stdout.startswith("sgd on mnist1d (mlp), 2 epochs")
        assert ("step/s" in result.stderr) is not hidden, result.stderr


def test_an_analysis_reads_the_cifar_folder_its_run_recorded(tmp_path, monkeypatch):
    """A run's checkpoint records --data-root (absolute): the analyses take it from there,
    from any working directory, unless --data-root names another folder."""
    from cases import write_cifar

    write_cifar(tmp_path / "cifar", "cifar10")
    ckpt = write_checkpoint(
        tmp_path / "c.pt",
        MLP,
        (3, 32, 32),
        {"name": "cifar10"},
        config={"data_root": str(tmp_path / "cifar")},
    )
    monkeypatch.chdir(tmp_path.parent)
    out = tmp_path / "c.json"
    cmd = ["msharpness", str(ckpt), "--m", "5", "--device", "cpu", "--no-progress"]
    ok(runner.invoke(app, [*cmd, "--json", str(out)]))
    assert json.loads(out.read_text())["meta"]["num_samples"] == 30
    line = one_error_line(runner.invoke(app, [*cmd, "--data-root", str(tmp_path / "none")]))
    assert "cifar10 files not found" in line


def test_b3_a_data_root_data_option_is_recorded_absolute_and_data_root_wins(tmp_path, monkeypatch):
    """Bug B3, session 28: `train --data-opt data_root=cifar` recorded 'cifar' in the data
    spec; an analysis from another folder then failed, and its --data-root was ignored
    (the spec's data_root won). Now the run records the folder absolute, and --data-root
    also wins over the relative data_root an older checkpoint's spec holds."""
    from cases import write_cifar

    write_cifar(tmp_path / "cifar", "cifar10")
    monkeypatch.chdir(tmp_path)
    run = ["train", "--dataset", "cifar10", "--data-opt", "data_root=cifar", "--model", "mlp"]
    run += ["--model-opt", "width=8", "--model-opt", "depth=1", "--epochs", "1", "--out", "run"]
    ok(runner.invoke(app, [*run, "--batch-size", "10", "--device", "cpu", "--no-progress"]))
    raw = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert raw["data"] == {"name": "cifar10"}
    assert raw["config"]["data_root"] == str(tmp_path / "cifar")
    twice = runner.invoke(app, [*run[:-1], "run2", "--data-root", "other", "--device", "cpu"])
    assert "is given twice, as other and as the data option data_root=cifar" in (
        one_error_line(twice)
    )
    # on --resume the data option replaces the folder the run recorded, as --data-root does
    shutil.copytree(tmp_path / "cifar", tmp_path / "copy")
    resume = ["train", "--out", "run", "--resume", "--data-opt", "data_root=copy", "--no-progress"]
    assert "nothing to do" in ok(runner.invoke(app, resume)).output
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cmd = ["msharpness", str(tmp_path / "run" / "last.pt"), "--m", "5", "--device", "cpu"]
    cmd += ["--no-progress", "--json", str(tmp_path / "m.json")]
    ok(runner.invoke(app, cmd))
    line = one_error_line(runner.invoke(app, [*cmd, "--data-root", str(tmp_path / "none")]))
    assert f"cifar10 files not found in {tmp_path / 'none'}" in line
    # an older checkpoint: the folder as given, in the data spec
    old = write_checkpoint(
        tmp_path / "old.pt", MLP, (3, 32, 32), {"name": "cifar10", "data_root": "cifar"}
    )
    cmd[1] = str(old)
    assert "files not found in cifar" in one_error_line(runner.invoke(app, cmd))
    ok(runner.invoke(app, [*cmd, "--data-root", str(tmp_path / "cifar")]))
    assert json.loads((tmp_path / "m.json").read_text())["meta"]["num_samples"] == 30


# -- gaps found by mutation testing (session 24, notes_out/s24/mut_cli.md) -------------------


def test_loss_flag_wins_over_the_loss_the_checkpoint_records(tmp_path):
    """Mutant (_common.load_analysis_inputs): `loss or checkpoint.raw.get("loss") or ...`
    -> `checkpoint.raw.get("loss") or loss or ...`: --loss was silently ignored for a
    checkpoint that records a loss (every checkpoint `train` writes)."""
    ckpt = write_checkpoint(tmp_path / "mse.pt", CNN, (40,), {"name": "mnist1d"}, loss="mse")
    saved = msharpness_json(ckpt, tmp_path, "--m", "16", "--rho", "0.1", "--loss", "cross_entropy")[
        0
    ]
    assert saved["loss"] == "cross_entropy"
    split = load_data("mnist1d", "train", samples=64, seed=0)
    direct = m_sharpness(
        load_checkpoint(ckpt).model, split.pair(), m=16, rho=0.1, loss="cross_entropy"
    )
    assert saved["sharpness"] == pytest.approx(direct.sharpness, rel=1e-5)


def test_msharpness_projection_default_is_exact_as_the_api(tmp_path):
    """Mutant (cli/msharpness.py): --projection default "exact" -> "rescale". Adaptive
    multi-step m-sharpness without --projection must be the API's default (exact)."""
    ckpt = write_checkpoint(tmp_path / "c.pt", CNN, (40,), {"name": "mnist1d"})
    saved = msharpness_json(
        ckpt, tmp_path, "--m", "16", "--rho", "0.5", "--adaptive", "--steps", "3"
    )[0]
    assert saved["projection"] == "exact"
    split = load_data("mnist1d", "train", samples=64, seed=0)
    direct = m_sharpness(
        load_checkpoint(ckpt).model, split.pair(), m=16, rho=0.5, adaptive=True, steps=3
    )
    assert direct.projection == "exact"
    assert saved["sharpness"] == pytest.approx(direct.sharpness, rel=1e-5)


def test_no_states_with_random_directions_is_accepted(tmp_path):
    """Mutant (cli/landscape.py): `if states and (...)` -> `if states is not None and (...)`:
    --no-states (leave the BN statistics alone, what random directions do anyway) was
    refused for random directions, so one script could not pass it to every landscape."""
    ckpt = write_checkpoint(tmp_path / "c.pt", CNN, (40,), {"name": "mnist1d"})
    args = ["landscape", str(ckpt), "--samples", "32", "--device", "cpu", "--no-progress"]
    args += [
        "--no-plots",
        "--dims",
        "1",
        "--grid",
        "3",
        "--no-states",
        "--out",
        str(tmp_path / "l"),
    ]
    ok(runner.invoke(app, args))
    saved = LandscapeResult.load(tmp_path / "l" / "landscape.npz")
    assert saved.complete and saved.states is False


@pytest.mark.parametrize(
    ("optimizer", "flags", "expected"),
    [
        (
            "bsam",
            [
                "--damping",
                "0.3",
                "--prior-precision",
                "2.5",
                "--s-init",
                "0.7",
                "--splits",
                "2",
                "--data-aug-factor",
                "1.5",
            ],
            {
                "damping": 0.3,
                "prior_precision": 2.5,
                "s_init": 0.7,
                "splits": 2,
                "data_aug_factor": 1.5,
            },
        ),
        (
            "samon",
            ["--include-norm", "--fast-first-pass"],
            {"exclude_norm": False, "fast_first_pass": True},
        ),
        (
            "lets",
            [
                "--rho-lr",
                "0.3",
                "--hypergrad",
                "fd",
                "--inner",
                "asam",
                "--rho-min",
                "0.01",
                "--rho-max",
                "0.4",
            ],
            {"rho_lr": 0.3, "hypergrad": "fd", "inner": "asam", "rho_min": 0.01, "rho_max": 0.4},
        ),
        (
            "sam",
            [
                "--perturbation",
                "global",
                "--fresh-noise",
                "--max-grad-norm",
                "2.0",
                "--rho",
                "0.07",
            ],
            {"perturbation": "global", "same_noise": False, "max_grad_norm": 2.0, "rho": 0.07},
        ),
        (
            "asam",
            ["--normalize-bias", "--eta", "0.02", "--form", "layerwise", "--m", "16"],
            {"normalize_bias": True, "eta": 0.02, "adaptive": "layerwise", "m": 16},
        ),
        ("vasso", ["--theta", "0.5", "--bn-policy", "both"], {"theta": 0.5, "bn_policy": "both"}),
    ],
)
def test_every_optimizer_flag_of_train_reaches_the_stored_spec(
    tmp_path, optimizer, flags, expected
):
    """Deleting any entry of cli/train.py's OPTIMIZER_FLAGS made its flag accepted and
    silently dropped; between them these real runs use all 22 flags."""
    out = tmp_path / "run"
    model = "cnn1d" if optimizer == "samon" else "mlp"  # SAM-ON needs normalization layers
    args = [
        "train",
        "--dataset",
        "mnist1d",
        "--samples",
        "64",
        "--model",
        model,
        "--epochs",
        "1",
        "--batch-size",
        "32",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(out),
    ]
    result = runner.invoke(app, [*args, "--optimizer", optimizer, *flags])
    assert result.exit_code == 0, result.output
    stored = json.loads((out / "config.json").read_text())["optimizer"]
    assert {k: stored.get(k) for k in expected} == expected


def test_a_file_not_found_names_the_file_in_one_line(capsys):
    """guarded's fallback for a FileNotFoundError no command foresaw (a user's data
    factory opening a missing file) names the file."""
    import errno

    import typer

    from sharpscope.cli._common import guarded

    @guarded
    def command():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "data/missing.npy")

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 2
    assert capsys.readouterr().err == "error: file not found: data/missing.npy\n"
