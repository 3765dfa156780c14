"""Gaps found by a mutation audit of ``sharpscope/cli/study.py`` (session 25): the default
worker count, the summary line's counts, exit codes, --resamples 0, and the status hint
for runs left analysing. run_study, write_report and run_states are replaced by fakes."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import sharpscope.study.executors as executors
import sharpscope.study.report as report
import sharpscope.study.runner as runner_module
from sharpscope.cli import app
from sharpscope.study.runner import StudySummary

runner = CliRunner()


def _fake_study(monkeypatch, seen, **outcome):
    def run_study(config, out, **kwargs):
        seen.append((config.name, Path(out), kwargs["workers"], kwargs["executor"]))
        return StudySummary(out=Path(out), results=Path(out) / "results.csv", num_runs=9, **outcome)

    monkeypatch.setattr(runner_module, "run_study", run_study)


# C1 cli/study.py run: without --workers, `default_workers()` -> `1` (the documented
# default, one worker per GPU else per CPU core, ignored)
def test_study_run_without_workers_takes_the_default_worker_count(monkeypatch, tmp_path):
    seen = []
    _fake_study(monkeypatch, seen)
    monkeypatch.setattr(executors, "default_workers", lambda: 7)
    result = runner.invoke(
        app, ["study", "run", "--quick", "--out", str(tmp_path / "s"), "--no-report"]
    )
    assert result.exit_code == 0, result.output
    assert seen == [("quick", tmp_path / "s", 7, "local")]


# C3 cli/study.py run: the summary line counted the skipped runs as done
# C4 cli/study.py run: the summary line printed the failed count as the error count
# C2 cli/study.py run: `if summary.errors` -> `if False` (runs that raised: exit 0)
def test_study_run_prints_each_count_and_exits_2_when_runs_raised(monkeypatch, tmp_path):
    seen = []
    _fake_study(
        monkeypatch,
        seen,
        done=["a"],
        skipped=["b", "c", "d"],
        failed=["e", "f"],
        errors={"g": "RuntimeError: boom"},
    )
    args = [
        "study",
        "run",
        "--quick",
        "--out",
        str(tmp_path / "s"),
        "--no-report",
        "--workers",
        "1",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "1 runs done, 3 skipped, 2 failed (diverged), 1 errors in 0 s" in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: 1 run(s) raised errors (rerun to retry them); first: g: RuntimeError: boom"
    ]


# C9 cli/study.py run: Ctrl-C exit code `interrupt_exit_code(exc)` -> `1` (the shell's 130)
def test_study_run_interrupted_exits_130_and_says_how_to_resume(monkeypatch, tmp_path):
    def interrupted(config, out, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner_module, "run_study", interrupted)
    out = tmp_path / "s"
    result = runner.invoke(app, ["study", "run", "--quick", "--out", str(out), "--workers", "1"])
    assert result.exit_code == 130, result.output
    assert f"error: interrupted; the runs finished so far are kept in {out}" in result.output


# C5 cli/study.py report: `check_counts(..., minimum=0)` -> `minimum=1` (--resamples 0,
# "no bootstrap" in the help, refused)
def test_study_report_takes_zero_resamples(monkeypatch, tmp_path):
    seen = []

    def write_report(folder, resamples=1000, figures=True):
        seen.append((Path(folder), resamples, figures))
        return Path(folder) / "report.md"

    monkeypatch.setattr(report, "write_report", write_report)
    result = runner.invoke(
        app, ["study", "report", str(tmp_path), "--resamples", "0", "--no-figures"]
    )
    assert result.exit_code == 0, result.output
    assert seen == [(tmp_path, 0, False)]


# C6 cli/study.py status: only "training" runs got the resume hint, not "analysing" ones
def test_study_status_names_runs_left_analysing_as_interrupted(monkeypatch, tmp_path):
    rows = [
        {"run_id": "a", "state": "done", "epoch": 2, "epochs": 2, "error": ""},
        {"run_id": "b", "state": "analysing", "epoch": 2, "epochs": 2, "error": ""},
    ]
    running = [False]
    monkeypatch.setattr(runner_module, "run_states", lambda folder: rows)
    monkeypatch.setattr(runner_module, "study_running", lambda folder: running[0])
    result = runner.invoke(app, ["study", "status", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "1 analysing, 1 done" in result.output
    assert "were interrupted; run the same command again to resume them" in " ".join(
        result.output.split()
    )
    running[0] = True
    result = runner.invoke(app, ["study", "status", str(tmp_path)])
    assert result.exit_code == 0 and "interrupted" not in result.output, result.output
