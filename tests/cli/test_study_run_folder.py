"""``sharpscope study run DIR`` resumes the study in DIR (README: "`study run DIR` runs the
factories that DIR's config names"; it was refused as "a folder, not a TOML file")."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from sharpscope.cli import app

from cases import tiny_study_toml

runner = CliRunner()


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_study_run_on_a_study_folder_resumes_it_in_place(tmp_path):
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_study_toml("folder-tiny", m=[16]))
    out = tmp_path / "study"
    args = ["study", "run", str(config), "--out", str(out), "--no-report", "--workers", "1"]
    assert runner.invoke(app, args).exit_code == 0
    before = json.loads((out / "study.json").read_text())
    shutil.rmtree(out / "runs" / "sam-s1")  # a run lost: the resume trains it again
    result = runner.invoke(app, ["study", "run", str(out), "--no-report", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "3 of 4 runs already complete" in result.output
    assert json.loads((out / "runs" / "sam-s1" / "status.json").read_text())["state"] == "done"
    after = json.loads((out / "study.json").read_text())
    assert after["source"] == before["source"] == str(config)
    assert after["config"] == before["config"]
    # --out naming the same folder is fine; another one is refused
    same = runner.invoke(app, ["study", "run", str(out), "--out", str(out), "--no-report"])
    assert same.exit_code == 0 and "4 of 4 runs already complete" in same.output, same.output
    other = runner.invoke(app, ["study", "run", str(out), "--out", str(tmp_path / "x")])
    one_line_error(other, f"study run {out} resumes the study in {out}", "config.toml")
    assert not (tmp_path / "x").exists()


def test_study_run_on_a_folder_that_is_no_study_is_one_line(tmp_path):
    one_line_error(
        runner.invoke(app, ["study", "run", str(tmp_path)]),
        "is not a sharpscope study folder (no study.json)",
    )


def test_study_run_on_a_folder_whose_config_toml_was_edited_is_refused(tmp_path):
    """Session 30 (studycfg B8): `study run DIR` resumed the config study.json recorded and
    wrote DIR/config.toml over a hand edit of it, without a word."""
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_study_toml("edited-tiny", m=[16]))
    out = tmp_path / "study"
    args = ["study", "run", str(config), "--out", str(out), "--no-report", "--workers", "1"]
    assert runner.invoke(app, args).exit_code == 0
    shown = out / "config.toml"
    original = shown.read_text()
    edited = original.replace("[train]", "[train]\nlabel_smoothing = 0.1", 1)
    assert edited != original
    for text in (edited, "[broken"):
        shown.write_text(text)
        result = runner.invoke(app, ["study", "run", str(out), "--no-report"])
        one_line_error(
            result,
            f"{shown} differs from the config that {out / 'study.json'} recorded",
            f"study run {shown} --out {out}",
        )
        assert shown.read_text() == text  # the edit is kept
    shown.write_text(original + "\n# a comment and blank lines change nothing\n")
    again = runner.invoke(app, ["study", "run", str(out), "--no-report"])
    assert again.exit_code == 0 and "4 of 4 runs already complete" in again.output, again.output
