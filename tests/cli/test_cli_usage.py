"""Usage errors (bad option values, unknown options, missing arguments) are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from sharpscope.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "message", "command"),
    [
        (["spectrum", "ck.pt", "--k", "abc"], "Invalid value for '--k'", "sharpscope spectrum"),
        (["spectrum", "ck.pt", "--bogus"], "No such option: --bogus", "sharpscope spectrum"),
        (["spectrum"], "Missing argument 'CKPT'", "sharpscope spectrum"),
        # click gives no context for a missing value: the command line names the command
        (["spectrum", "ck.pt", "--k"], "'--k' requires an argument", "sharpscope spectrum"),
        (["study", "run", "--workers"], "requires an argument", "sharpscope study run"),
        (["nosuch"], "No such command 'nosuch'", "sharpscope"),
        (["--bogus"], "No such option: --bogus", "sharpscope"),
    ],
)
def test_usage_errors_are_one_line_with_exit_code_2(args, message, command):
    """They printed four lines (Usage, Try, blank, Error) like click's own."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert lines[0].endswith(f"; see '{command} -h'")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["study", "run", "--quick", "--workers", "0"], "--workers must be an integer >= 1, got 0"),
        (["figures", "--workers", "0"], "--workers must be an integer >= 1, got 0"),
        (
            ["study", "report", ".", "--resamples", "-1"],
            "--resamples must be an integer >= 0, got -1",
        ),
    ],
)
def test_counts_are_checked_in_the_words_of_the_other_options(args, message):
    """--workers and --resamples used the framework's 'Input should be greater than or
    equal to 1' and an <int range> metavar, unlike every other option."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {message}"


@pytest.mark.parametrize(
    "args", [["--help"], ["-h"], ["spectrum", "-h"], ["study", "run", "--help"]]
)
def test_help_still_works(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: sharpscope")


@pytest.mark.parametrize("args", [[], ["study"]])
def test_no_arguments_still_show_the_help(args):
    result = runner.invoke(app, args)
    assert "Usage: sharpscope" in result.output and "Commands:" in result.output
    assert "error:" not in result.output


def test_the_console_entry_point_prints_one_line_too():
    done = subprocess.run(
        [sys.executable, "-m", "sharpscope", "spectrum", "ck.pt", "--k", "abc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: Invalid value for '--k'")


#: `python -m sharpscope --help` with a Ctrl-C that lands while the command line imports typer
_CTRL_C_WHILE_IMPORTING = """
import builtins, os, runpy, signal, sys
real = builtins.__import__
def ctrl_c_at_typer(name, *args, **kwargs):
    if name == "typer":
        os.kill(os.getpid(), signal.SIGINT)
    return real(name, *args, **kwargs)
builtins.__import__ = ctrl_c_at_typer
sys.argv = ["sharpscope", "--help"]
runpy.run_module("sharpscope", run_name="__main__")
"""


@pytest.mark.parametrize("rank", ["0", "1"])
def test_a_ctrl_c_while_the_command_line_imports_is_one_line_and_exit_130(rank):
    """Session 28 (resume.md B3): a Ctrl-C in the first seconds (typer, torch and the
    commands importing: 4.6 s on a loaded machine) printed the imports' traceback and the
    process died by SIGINT (exit -2). Under torchrun only rank 0 says it."""
    import os

    done = subprocess.run(
        [sys.executable, "-c", _CTRL_C_WHILE_IMPORTING],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RANK": rank},
    )
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr == ("error: interrupted\n" if rank == "0" else "")
    assert done.stdout == ""  # stopped before the help


def test_the_start_up_handler_gives_the_previous_one_back(monkeypatch, capsys):
    """Once the command line is imported, a Ctrl-C is the commands' to handle again."""
    import signal

    from sharpscope import _console

    monkeypatch.setattr(sys, "argv", ["sharpscope", "--help"])
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as exit_code:
        _console.main()
    assert exit_code.value.code == 0 and "Usage: " in capsys.readouterr().out
    assert signal.getsignal(signal.SIGINT) is before


def test_a_broken_matplotlib_backend_setting_does_not_stop_a_command(tmp_path):
    """The commands only write figure files: MPLBACKEND naming a missing module failed
    after the results were written."""
    import os

    env = {**os.environ, "MPLBACKEND": "module://no_such_backend"}
    args = ["train", "--dataset", "mnist1d", "--model", "mlp", "--epochs", "1",
            "--samples", "64", "--batch-size", "32", "--out", str(tmp_path / "run")]  # fmt: skip
    cli = [sys.executable, "-m", "sharpscope"]
    assert subprocess.run([*cli, *args], env=env, capture_output=True).returncode == 0
    done = subprocess.run(
        [*cli, "landscape", str(tmp_path / "run" / "last.pt"), "--dims", "1", "--grid", "3",
         "--samples", "32", "--out", str(tmp_path / "land")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "land" / "landscape_1d.png").is_file()
