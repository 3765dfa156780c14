"""The command line's shared pieces: one-line messages for paths that cannot be used."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest

from sharpscope.cli._common import check_output_file, check_output_folder, os_error_line
from sharpscope.errors import SharpscopeError


def test_os_errors_say_whether_a_file_or_a_folder_is_needed(tmp_path):
    """They were "File exists: X" and "Not a directory: X/run" (errno's own words)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    exists = FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(a_file))
    assert os_error_line(exists) == (
        f"{a_file} is a file, where a folder is needed; give a folder path (new or existing)"
    )
    under = NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(a_file / "run"))
    assert os_error_line(under).startswith(f"{a_file} is a file, not a folder, so {a_file}/run")
    folder = IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(tmp_path))
    assert (
        os_error_line(folder) == f"{tmp_path} is a folder, where a file is needed; give a file name"
    )
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a_file))
    assert os_error_line(full) == f"{os.strerror(errno.ENOSPC)}: {a_file}"


def test_output_checks_pass_new_paths_and_refuse_the_wrong_kind(tmp_path):
    (tmp_path / "a-file").write_text("")
    check_output_file("--json", tmp_path / "new" / "deeper" / "s.json")
    check_output_file("--json", tmp_path / "a-file")  # overwritten, as before
    check_output_folder("--out", tmp_path / "new" / "run", holds="the results")
    check_output_folder("--out", tmp_path, holds="the results")
    with pytest.raises(SharpscopeError, match="is a folder; give a file name"):
        check_output_file("--json", tmp_path)
    with pytest.raises(SharpscopeError, match="is a file; it must be a folder"):
        check_output_folder("--out", tmp_path / "a-file", holds="the results")
    with pytest.raises(SharpscopeError, match="a-file is a file, not a folder"):
        check_output_folder("--out", tmp_path / "a-file" / "x" / "y", holds="the results")


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_a_place_where_no_file_can_be_made_is_refused_before_the_work(tmp_path):
    """Permission bits said yes (root), yet /proc takes no new file: the result was thrown
    away after the computation. A real probe file says so up front and leaves nothing."""
    # (not root: the permission check refuses first)
    refused = r"(cannot write in /proc \(|no permission to write in /proc)"
    with pytest.raises(SharpscopeError, match=rf"^--json /proc/sharpscope-result.json: {refused}"):
        check_output_file("--json", Path("/proc/sharpscope-result.json"))
    with pytest.raises(SharpscopeError, match=rf"^--out /proc/run: {refused}"):
        check_output_folder("--out", Path("/proc/run"), holds="the results")
    check_output_file("--json", tmp_path / "s.json")
    assert list(tmp_path.iterdir()) == []  # the probe is gone


def test_the_out_of_memory_line_names_each_commands_own_memory_flags():
    """--chunk-size for the vectorized analyses, --device cpu only when a GPU ran out."""
    import torch

    from sharpscope.cli._common import out_of_memory_line

    cpu, gpu = RuntimeError("can't allocate memory"), torch.OutOfMemoryError("CUDA out of memory")
    assert "--chunk-size (subsets" in out_of_memory_line(cpu, "msharpness")
    assert "--chunk-size (grid points" in out_of_memory_line(cpu, "landscape")
    assert "--device cpu" not in out_of_memory_line(cpu, "msharpness")
    assert out_of_memory_line(gpu, "train") == (
        "out of memory; try a smaller --batch-size N, fewer --samples N or --device cpu"
    )


def test_warnings_are_printed_by_rank_0_alone(monkeypatch, capsys):
    """Under torchrun every rank printed the same warning line."""
    from sharpscope.cli._common import show_warning_in_one_line

    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        show_warning_in_one_line(
            UserWarning("--optimizer sgd replaces the config's sam"), UserWarning
        )
        assert ("warning: --optimizer sgd replaces" in capsys.readouterr().err) is shown


def test_a_second_ctrl_c_does_not_cut_short_what_the_first_one_saves(capsys):
    """A second Ctrl-C right after the first raised again inside the command's handler:
    spectrum lost the finished parts it was writing and train the line naming last.pt."""
    import signal
    import time

    import typer

    from sharpscope.cli._common import guarded

    saved = []

    @guarded
    def command():
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C, in the middle of the work
            time.sleep(5)
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGINT)  # the second, while the work is being saved
            time.sleep(0.2)
            saved.append("finished parts")
            raise

    before = {n: signal.getsignal(n) for n in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(typer.Exit) as stopped:
        command()
    assert {n: signal.getsignal(n) for n in before} == before  # in-process calls go on
    assert stopped.value.exit_code == 130 and saved == ["finished parts"]
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_command_that_ends_normally_restores_the_signal_handlers():
    import signal

    from sharpscope.cli._common import guarded

    before = signal.getsignal(signal.SIGINT)
    assert guarded(lambda: 7)() == 7
    assert signal.getsignal(signal.SIGINT) is before


def test_a_sigterm_under_torchrun_says_the_launcher_may_have_stopped_the_job(monkeypatch):
    """When one rank fails, torchrun's agent sends SIGTERM to the others, often before they
    notice the lost peer: "interrupted" alone hid why (a flaky test showed it)."""
    from sharpscope.cli._common import Terminated, stop_reason

    assert stop_reason(Terminated()) == "interrupted"
    assert stop_reason(KeyboardInterrupt()) == "interrupted"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert stop_reason(Terminated()).startswith("interrupted by SIGTERM (torchrun stops every")
    assert stop_reason(KeyboardInterrupt()) == "interrupted"  # Ctrl-C is the user's own


def test_a_sigterm_while_a_lost_process_is_handled_does_not_cut_the_saving_short():
    """CI, session 28: rank 1 died; rank 0 was saving the spectrum's finished parts for
    the lost process when torchrun's SIGTERM arrived, and the Terminated raised there
    replaced the line that names them with a bare "interrupted by SIGTERM"."""
    from sharpscope.cli._common import STOP_SIGNALS, Terminated, _stop_once
    from sharpscope.distributed import PeerLost

    before = {n: signal.getsignal(n) for n in STOP_SIGNALS}
    try:
        try:
            raise PeerLost("another process of this torchrun job stopped (gloo: ...)")
        except PeerLost:
            assert _stop_once(signal.SIGTERM, None) is None  # ignored: the saving goes on
        assert all(signal.getsignal(n) == signal.SIG_IGN for n in STOP_SIGNALS)
        with pytest.raises(Terminated):  # at any other moment it stops the command
            _stop_once(signal.SIGTERM, None)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_every_command_names_a_sigterm_from_torchrun(monkeypatch, capsys):
    """Session 27: msharpness (and any command without its own handler) said a bare
    "interrupted" when torchrun stopped it, as if the user had pressed Ctrl-C."""
    import typer

    from sharpscope.cli._common import Terminated, guarded

    @guarded
    def command():
        raise Terminated()

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 143
    assert capsys.readouterr().err.startswith(
        "error: interrupted by SIGTERM (torchrun stops every process when one of them fails"
    )


@pytest.mark.parametrize(
    "args",
    [
        ["landscape", "x.pt", "--out", ""],
        ["study", "run", "--quick", "--out", " "],
        ["figures", "--out", ""],
        ["figures", "--cache", ""],
        ["spectrum", "x.pt", "--json", ""],
        ["spectrum", "x.pt", "--plot", ""],
        ["spectrum", "x.pt", "--eigenvectors", ""],
        ["msharpness", "x.pt", "--json", ""],
        ["bench", "optimizers", "--json", ""],
    ],
)
def test_an_empty_output_path_is_a_usage_error_not_the_working_folder(args, tmp_path, monkeypatch):
    """Session 27: `--out ""` (an unset variable in a script) was Path("."): a study, a
    landscape or the figures were written into the working folder."""
    from typer.testing import CliRunner

    from sharpscope.cli import app

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    flag = args[[i for i, a in enumerate(args) if not a.strip()][0] - 1]
    assert f"error: Invalid value for '{flag}': a path is needed, got an empty one" in (
        result.output
    ), result.output
    assert list(tmp_path.iterdir()) == []
