"""`sharpscope study run|report` and `sharpscope figures` through the CLI."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from sharpscope.cli import app

from cases import tiny_study_toml, torchrun

runner = CliRunner()

TINY = tiny_study_toml("cli-tiny", m=[16, 64])


def _one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_study_run_then_report(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "study"
    args = ["study", "run", str(config), "--out", str(out), "--no-report", "--workers", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["run_id"] for r in rows] == ["sgd-s0", "sgd-s1", "sam-s0", "sam-s1"]
    assert all(r["status"] == "done" and r["msharp_m64_rho0.05"] for r in rows)
    assert not (out / "report.md").exists()

    result = runner.invoke(app, ["study", "report", str(out), "--resamples", "20"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert "# Study `cli-tiny`" in report and "| `msharp_m16_rho0.05` |" in report
    assert (out / "figures" / "correlations.pdf").exists()
    assert json.loads((out / "correlations.json").read_text())[0]["kind"] == "correlation"
    # the headline table also goes to the screen, one row per measure and gap
    table_rows = [line for line in result.output.splitlines() if "msharp_m16_rho0.05" in line]
    assert table_rows and "gen_gap" in table_rows[0]

    # a second run resumes: nothing left to do, also with the data somewhere else
    again = ["study", "run", str(config), "--out", str(out), "--no-report"]
    result = runner.invoke(app, [*again, "--data-root", str(tmp_path / "elsewhere")])
    assert result.exit_code == 0 and "4 of 4 runs already complete" in result.output, result.output
    stored = json.loads((out / "study.json").read_text())["config"]["train"]
    assert stored["data_root"] == str(tmp_path / "elsewhere")
    for run_id in ("sgd-s0", "sam-s1"):  # what the runs themselves read on a retry
        run = json.loads((out / "runs" / run_id / "run.json").read_text())
        assert run["train"]["data_root"] == str(tmp_path / "elsewhere")

    # status: every run and where it stands; a run whose training stopped midway shows it
    (out / "runs" / "sam-s1" / "status.json").unlink()
    result = runner.invoke(app, ["study", "status", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 done, 1 training" in result.output and "sam-s1" in result.output
    # no `study run` holds the folder's lock, so that run was interrupted: say how to resume
    assert "were interrupted; run the same command again" in result.output
    from sharpscope.study.runner import study_lock

    with study_lock(out):  # a `study run` working in the folder: its runs are not stale
        result = runner.invoke(app, ["study", "status", str(out)])
    assert result.exit_code == 0 and "interrupted" not in result.output, result.output


def test_study_list_names_every_builtin_config():
    from sharpscope.study.config import builtin_config_names

    result = runner.invoke(app, ["study", "list"])
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines() if line.strip()]
    assert names == builtin_config_names()


def test_bad_inputs_give_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace("[sweep]", "[sweep]\nrhoo = [0.1]"))
    result = runner.invoke(app, ["study", "run", str(bad), "--out", str(tmp_path / "x")])
    _one_line_error(result, "unknown key 'rhoo' in [sweep]", "valid keys: optimizer, rho")

    result = runner.invoke(app, ["study", "run", str(tmp_path / "missing.toml")])
    _one_line_error(result, "study config not found")

    result = runner.invoke(app, ["study", "run", str(bad), "--quick"])
    _one_line_error(result, "either CONFIG.toml or --quick")

    result = runner.invoke(app, ["study", "run"])
    _one_line_error(result, "missing CONFIG.toml", "quick")

    result = runner.invoke(app, ["study", "report", str(tmp_path)])
    _one_line_error(result, "not a sharpscope study folder")

    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    result = runner.invoke(
        app, ["study", "run", str(config), "--out", str(tmp_path / "y"), "--executor", "pbs"]
    )
    _one_line_error(result, "unknown executor 'pbs'", "local, slurm")


def test_quick_and_builtin_names_select_the_shipped_configs(monkeypatch, tmp_path):
    seen = []

    def fake_run_study(config, out, **kwargs):
        seen.append((config.name, kwargs["workers"], kwargs["executor"]))
        raise SystemExit(0)

    import sharpscope.study.runner as runner_module

    monkeypatch.setattr(runner_module, "run_study", fake_run_study)
    result = runner.invoke(app, ["study", "run", "--quick", "--workers", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["study", "run", "a-spectra-quick", "--executor", "slurm"])
    assert result.exit_code == 0, result.output
    assert seen == [("quick", 2, "local"), ("a-spectra-quick", 1, "slurm")]


def test_help_of_study_and_figures():
    for args in (
        ["study", "--help"],
        ["study", "run", "--help"],
        ["study", "report", "--help"],
        ["figures", "--help"],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["figures", "--only", "z"])
    _one_line_error(result, "unknown reproduction 'z'", "quick, a, b")


def test_out_that_is_a_file_is_refused_before_any_run(tmp_path):
    """study run and figures said "error: File exists: X" after setting out."""
    (tmp_path / "a-file").write_text("")
    result = runner.invoke(app, ["study", "run", "--quick", "--out", str(tmp_path / "a-file")])
    _one_line_error(result, f"--out {tmp_path / 'a-file'} is a file; it must be a folder")
    result = runner.invoke(app, ["figures", "--out", str(tmp_path / "a-file" / "figs")])
    _one_line_error(result, f"{tmp_path / 'a-file'} is a file, not a folder")
    result = runner.invoke(app, ["figures", "--cache", str(tmp_path / "a-file")])
    _one_line_error(result, "--cache", "is a file; it must be a folder")


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{", "is not valid JSON (line 1, column 2)"),
        ("<<<<<<< HEAD\n{}", "is not valid JSON (line 1, column 1)"),
        ("[]", "holds an array, not the figures summary (an object of reproductions)"),
        ("null", "holds null, not the figures summary (an object of reproductions)"),
    ],
)
def test_a_figures_summary_that_is_not_an_object_is_one_line_before_any_study(
    tmp_path, monkeypatch, text, why
):
    """Session 28 (resume.md B4): an unreadable figures/summary.json (a tracked file: a
    merge-conflict marker, a hand edit) ended in a JSONDecodeError traceback, and one that
    held a list in a TypeError once its study had run and its figures were drawn."""
    import sharpscope.study.runner as runner_module

    def no_study(*args, **kwargs):
        raise AssertionError("a study ran")

    monkeypatch.setattr(runner_module, "run_study", no_study)
    figs = tmp_path / "figs"
    figs.mkdir()
    (figs / "summary.json").write_text(text)
    args = ["figures", "--out", str(figs), "--cache", str(tmp_path / "c"), "--only", "quick"]
    result = runner.invoke(app, args)
    _one_line_error(
        result,
        f"error: {figs / 'summary.json'} {why}; delete it (it is written again) or choose "
        "another --out",
    )


def test_missing_cifar_files_are_refused_before_the_study_folder_is_written(tmp_path):
    from cases import write_cifar

    config = tmp_path / "cifar.toml"
    config.write_text(
        TINY.replace('{name = "mnist1d", samples = 192}', '{name = "cifar10", samples = 8}')
    )
    out = tmp_path / "study"
    args = ["study", "run", str(config), "--out", str(out), "--no-report"]
    result = runner.invoke(app, [*args, "--data-root", str(tmp_path / "nowhere")])
    _one_line_error(result, "cifar10 files not found in", "nowhere", "data_batch_1")
    assert not out.exists()

    root = tmp_path / "data"
    folder = write_cifar(root, "cifar10")
    (folder / "test_batch").unlink()  # a partial copy names what it lacks
    result = runner.invoke(app, [*args, "--data-root", str(root)])
    _one_line_error(result, "lacks test_batch")
    assert not out.exists()


def test_an_m_larger_than_the_analysis_split_is_refused_before_any_run_trains(tmp_path):
    """With ``analysis.samples = "all"`` the config check cannot compare m with the data;
    the runs trained and then each m-sharpness stopped (session-25 finding). The study
    now reads the analysis split's size first: here the 192 examples of the subset."""
    config = tmp_path / "big_m.toml"
    config.write_text(
        tiny_study_toml("big_m", m=[16, 193]).replace(
            "samples = 64", 'samples = "all"\nsplit = "test"'
        )
    )
    out = tmp_path / "study"
    result = runner.invoke(app, ["study", "run", str(config), "--out", str(out), "--no-report"])
    _one_line_error(
        result,
        "analysis.m_sharpness.m 193 is larger than the 192 examples the analyses use "
        "(the test split of mnist1d); choose m <= 192",
    )
    assert not out.exists()


FACTORY_DATA = """\
import torch
def one():
    g = torch.Generator().manual_seed(0)
    return torch.randn(96, 40, generator=g), torch.randint(0, 10, (96,), generator=g)
def split():
    g = torch.Generator().manual_seed(1)
    return {"train": one(), "test": (torch.randn(48, 40, generator=g), torch.randint(0, 10, (48,), generator=g))}
"""


def test_a_study_on_a_factory_of_one_data_set_is_refused_and_one_with_a_test_set_runs(tmp_path):
    """A factory's one set is also each run's test set: every generalization gap 0, so
    no correlation is defined, found only in the report (session 26)."""
    (tmp_path / "mydata.py").write_text(FACTORY_DATA)
    for factory in ("one", "split"):
        config = tmp_path / f"{factory}.toml"
        config.write_text(
            tiny_study_toml(factory, m=[16])
            .replace('{name = "mnist1d", samples = 192}', f'"{tmp_path}/mydata.py:{factory}"')
            .replace("seed = [0, 1]", "seed = [0]")
            .replace("samples = 64", "samples = 32")
        )
    out = tmp_path / "study"
    result = runner.invoke(app, ["study", "run", str(tmp_path / "one.toml"), "--out", str(out)])
    _one_line_error(
        result,
        f"data factory {tmp_path}/mydata.py:one gives one data set, which would also be every "
        "run's test set (generalization gap 0, so no correlation is defined); return "
        '{"train": ..., "test": ...} from it',
    )
    assert not out.exists()
    args = ["study", "run", str(tmp_path / "split.toml"), "--out", str(out), "--no-report"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(float(r["gen_gap"]) != 0 for r in rows)


def test_workers_with_a_cluster_executor_is_refused(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    args = ["study", "run", str(config), "--out", str(tmp_path / "s"), "--workers", "2"]
    result = runner.invoke(app, [*args, "--executor", "submitit-local"])
    _one_line_error(result, "--workers applies to --executor local")
    assert not (tmp_path / "s").exists()


def test_ctrl_c_stops_a_study_with_several_workers_at_once(tmp_path):
    """SIGINT to `study run --workers 2` waited for every queued run to finish first (a
    worker takes the Ctrl-C in its run as that run's failure and goes on)."""
    import signal
    import time

    config = tmp_path / "long.toml"
    config.write_text(
        tiny_study_toml("long", m=[16]).replace("epochs = 1", "epochs = 3000")
        .replace("seed = [0, 1]", "seed = [0, 1, 2, 3]")
    )  # fmt: skip
    out = tmp_path / "study"
    process = _study_with_two_workers(config, out)
    deadline = time.monotonic() + 120
    while not list(out.glob("runs/*/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.1)  # a worker is training
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    assert time.monotonic() - started < 30, stderr  # 8 runs of 3000 epochs take minutes
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.endswith(
        f"error: interrupted; the runs finished so far are kept in {out}: run the same "
        "command again to resume the others\n"
    )
    states = [json.loads(p.read_text())["state"] for p in out.glob("runs/*/status.json")]
    assert states.count("done") < 8


def test_ctrl_c_during_figures_names_the_kept_study_runs(tmp_path):
    """`sharpscope figures` said only "interrupted"; its study runs are kept in --cache and
    a rerun goes on from them, which the line now says."""
    import signal
    import subprocess
    import sys
    import time

    cache, figures = tmp_path / "cache", tmp_path / "figs"
    process = subprocess.Popen(
        [sys.executable, "-m", "sharpscope", "figures", "--only", "quick"]
        + ["--cache", str(cache), "--out", str(figures), "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not list(cache.glob("*/runs/*/last.pt")) and time.monotonic() < deadline:
        time.sleep(0.1)  # the first run is training
    assert process.poll() is None
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.endswith(
        f"error: interrupted; the study runs finished so far are kept in {cache}: run the "
        "same command again to go on from there\n"
    )


def test_the_default_study_folder_is_checked_before_any_work(tmp_path, monkeypatch):
    """Without --out a folder that could not be made was a bare OS error ("Permission
    denied: runs"); it is now checked and named as a given --out is."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").write_text("not a folder")
    result = runner.invoke(app, ["study", "run", "--quick"])
    assert result.exit_code == 2
    assert result.output.startswith(
        "error: default --out runs/studies/quick: runs is a file, not a folder"
    ), result.output


def test_worker_processes_warn_in_one_line_naming_the_study_setting(tmp_path):
    """A study's analysis.samples above the data's was warned about as '--samples', a flag
    no one gave, and pool workers printed Python's raw two-line format (session 26)."""
    config = tmp_path / "many.toml"
    config.write_text(
        tiny_study_toml("many", m=[16])
        .replace("samples = 64", "samples = 256")
        .replace("seed = [0, 1]", "seed = [0]")
    )
    import subprocess
    import sys

    args = ["study", "run", str(config), "--out", str(tmp_path / "s"), "--workers", "2"]
    # a real process: the workers write to its stderr, which CliRunner does not capture
    result = subprocess.run(
        [sys.executable, "-m", "sharpscope", *args, "--no-report"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    expected = (
        "warning: analysis.samples 256 is more than the data set's own samples=192 (the "
        "examples the run used); using all 192"
    )
    warned = [line for line in result.stderr.splitlines() if "256" in line]
    assert warned and all(line == expected for line in warned), result.stderr
    assert "UserWarning" not in result.stderr


def test_an_interrupt_while_the_report_is_written_says_how_to_finish_it(tmp_path, monkeypatch):
    """It said only 'error: interrupted' (session 26): the runs were all finished."""
    import sharpscope.study.report as report_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    config = tmp_path / "tiny.toml"
    config.write_text(TINY.replace("seed = [0, 1]", "seed = [0]"))
    monkeypatch.setattr(report_module, "write_report", interrupted)
    out = tmp_path / "s"
    result = runner.invoke(app, ["study", "run", str(config), "--out", str(out)])
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: interrupted while writing the report; the runs are finished in {out}: "
        f"`sharpscope study report {out}` (or the same command) writes it"
    )
    assert (out / "results.csv").is_file()


def test_a_slurm_study_on_a_machine_without_slurm_leaves_no_folder(tmp_path):
    """The failed start left study.json, config.toml and runs/ behind (session 26)."""
    import shutil

    import pytest

    if shutil.which("srun"):
        pytest.skip("this machine has Slurm")
    config = tmp_path / "tiny.toml"
    config.write_text(TINY)
    out = tmp_path / "s"
    result = runner.invoke(
        app, ["study", "run", str(config), "--out", str(out), "--executor", "slurm"]
    )
    _one_line_error(result, "cannot start the submitit 'slurm' executor", "use --executor local")
    assert not out.exists()


def test_study_run_under_torchrun_is_one_line_not_a_stall(tmp_path):
    """Session 27: under torchrun each rank ran the study; the second was refused by the
    first's lock ("another study run is working in ..."), and the first then waited for it
    in a collective until torchrun killed it 30 s later. Refused at once now."""
    out = tmp_path / "st"
    launched = torchrun("study", "run", "--quick", "--out", str(out))
    assert launched.returncode != 0
    lines = {line for line in launched.stderr.splitlines() if line.startswith("error:")}
    assert lines == {
        "error: `sharpscope study run` does not run under torchrun: it starts its own worker "
        "processes (--workers N, or --executor slurm)"
    }, launched.stderr[-2000:]
    assert "forcefully exiting" not in launched.stderr and not out.exists()


@pytest.mark.parametrize(
    "args", [["figures", "--only", "quick"], ["bench", "optimizers", "--quick"]]
)
def test_figures_and_bench_are_refused_under_torchrun(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert result.output.startswith(f"error: `sharpscope {args[0]}` does not run under torchrun")
    assert list(tmp_path.iterdir()) == []  # no figures/ or runs/ made


def test_ctrl_c_to_the_process_group_prints_no_traceback_from_an_idle_worker(tmp_path):
    """A terminal's Ctrl-C goes to the whole process group. A pool worker that had finished
    its runs and waited for the next one (in ``call_queue.get``) printed a KeyboardInterrupt
    traceback (session 30 studycfg B1): the workers now ignore SIGINT, and the study's
    process, which takes the Ctrl-C, stops them."""
    import os
    import signal
    import time

    config = tmp_path / "idle.toml"
    config.write_text(
        tiny_study_toml("idle", m=[16])
        .replace('optimizer = ["sgd", "sam"]', 'optimizer = ["sgd"]')
        .replace("seed = [0, 1]", "seed = [0]\nepochs = [1, 3000]")
    )  # fmt: skip
    out = tmp_path / "study"
    process = _study_with_two_workers(
        config,
        out,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        # a pytest started as a background job (`&`) ignores SIGINT, and so would the study
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    short, long = out / "runs" / "sgd-ep1-s0", out / "runs" / "sgd-ep3000-s0"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (
        (long / "last.pt").exists() and (short / "status.json").exists()
        and json.loads((short / "status.json").read_text()).get("state") == "done"
    ):  # fmt: skip
        time.sleep(0.1)
    assert process.poll() is None
    time.sleep(1.0)  # the short run's worker is back waiting for work
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.endswith(
        f"error: interrupted; the runs finished so far are kept in {out}: run the same "
        "command again to resume the others\n"
    )


def _study_with_two_workers(config, out, **popen_options):
    """``sharpscope study run CONFIG --out OUT --workers 2 --no-report`` started in the
    background, its output captured."""
    import subprocess
    import sys

    args = [sys.executable, "-m", "sharpscope", "study", "run", str(config), "--out", str(out)]
    return subprocess.Popen(
        [*args, "--workers", "2", "--no-report"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen_options,
    )
