"""``sharpscope landscape`` on tiny checkpoints."""

from __future__ import annotations

import importlib
import re
import time

import pytest
import torch
from typer.testing import CliRunner

from sharpscope.analysis.landscape import LandscapeResult
from sharpscope.cli import app

from cases import SLOW_AGENT, loss_that_kills_rank_1
from cases import write_checkpoint as write_spec_checkpoint

runner = CliRunner()
SPEC = {"name": "cnn1d", "norm": "batch", "width": 4, "depth": 2}
COMMON = ["--samples", "32", "--device", "cpu"]


def write_checkpoint(path, seed, spec=SPEC, epoch=1):
    return write_spec_checkpoint(path, spec, (40,), {"name": "mnist1d"}, seed=seed, epoch=epoch)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    trajectory = root / "run"
    trajectory.mkdir()
    for epoch in (1, 2, 3):
        write_checkpoint(trajectory / f"epoch_{epoch:03d}.pt", seed=10 + epoch, epoch=epoch)
    return {
        "a": write_checkpoint(root / "a.pt", seed=0),
        "b": write_checkpoint(root / "b.pt", seed=1),
        "wide": write_checkpoint(root / "wide.pt", seed=2, spec={**SPEC, "width": 6}),
        "run": trajectory,
    }


def test_landscape_1d_writes_npz_and_plots(ckpts, tmp_path):
    out = tmp_path / "one"
    args = ["landscape", str(ckpts["a"]), "--dims", "1", "--grid", "5", "--out", str(out)]
    result = runner.invoke(app, [*args, *COMMON])
    assert result.exit_code == 0, result.output
    assert "random 1-D landscape, grid 5" in result.output
    saved = LandscapeResult.load(out / "landscape.npz")
    assert saved.complete and saved.loss.shape == (5,) and saved.meta.checkpoint == str(ckpts["a"])
    for name in ("landscape_1d.pdf", "landscape_1d.png"):
        assert (out / name).stat().st_size > 0


def test_landscape_2d_resumes_to_the_same_grid(ckpts, tmp_path):
    base = ["landscape", str(ckpts["a"]), "--grid", "3", *COMMON, "--save-every", "0"]
    fresh = runner.invoke(app, [*base, "--out", str(tmp_path / "fresh")])
    assert fresh.exit_code == 0, fresh.output
    for name in ("contour", "surface"):
        assert (tmp_path / "fresh" / f"landscape_{name}.pdf").exists()
    part = runner.invoke(app, [*base, "--out", str(tmp_path / "part"), "--max-points", "4"])
    assert part.exit_code == 0 and "incomplete" in part.output
    loaded = int(LandscapeResult.load(tmp_path / "part" / "landscape.npz").computed.sum())
    assert 4 <= loaded < 9
    # another seed is refused, and nothing said it was resuming (it said so before the check)
    other = runner.invoke(app, [*base, "--out", str(tmp_path / "part"), "--seed", "1"])
    assert other.exit_code != 0 and "different settings (data, seed)" in other.output
    assert "(resuming)" not in other.output and "(resumed)" not in other.output
    rest = runner.invoke(app, [*base, "--out", str(tmp_path / "part"), "--no-plots"])
    assert rest.exit_code == 0, rest.output
    assert "landscape (resumed)" in rest.output and "landscape (resumed)" not in fresh.output
    # counts of this call, not of the whole grid
    assert f"9/9 points: {9 - loaded} computed in " in rest.output
    assert f"s, {loaded} loaded from the earlier run" in rest.output
    a = LandscapeResult.load(tmp_path / "fresh" / "landscape.npz")
    b = LandscapeResult.load(tmp_path / "part" / "landscape.npz")
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)


def test_landscape_interpolation_and_pca(ckpts, tmp_path):
    args = ["landscape", str(ckpts["a"]), "--dims", "1", "--grid", "5", *COMMON]
    interp = runner.invoke(
        app, [*args, "--directions", str(ckpts["b"]), "--out", str(tmp_path / "i")]
    )
    assert interp.exit_code == 0, interp.output
    saved = LandscapeResult.load(tmp_path / "i" / "landscape.npz")
    assert saved.direction_kind == "interpolation" and saved.states
    torch.testing.assert_close(saved.x, torch.linspace(-0.5, 1.5, 5, dtype=torch.float64))
    pca = runner.invoke(
        app,
        [
            "landscape",
            str(ckpts["a"]),
            "--grid",
            "3",
            *COMMON,
            "--directions",
            str(ckpts["run"]),
            "--out",
            str(tmp_path / "p"),
            "--no-plots",
        ],
    )
    assert pca.exit_code == 0, pca.output
    saved = LandscapeResult.load(tmp_path / "p" / "landscape.npz")
    assert saved.direction_kind == "pca" and saved.trajectory.shape == (3, 2)
    assert f"note: {ckpts['a']} is not among the checkpoints of {ckpts['run']}" in pca.output


def test_pca_keeps_the_analysed_checkpoint_of_the_folder_as_the_trajectorys_end(ckpts, tmp_path):
    """With --epochs not a multiple of --save-every, last.pt is a model of its own; the
    folder's PCA left it out because it is the analysed file (a folder of epoch_002.pt,
    epoch_004.pt and last.pt 'spans fewer than 2 dimensions'; session 26)."""
    import shutil

    run = shutil.copytree(ckpts["run"], tmp_path / "run")
    write_checkpoint(run / "last.pt", seed=99, epoch=4)
    base = ["landscape", str(run / "last.pt"), "--grid", "3", *COMMON, "--no-plots"]
    result = runner.invoke(app, [*base, "--directions", str(run), "--out", str(tmp_path / "p")])
    assert result.exit_code == 0, result.output
    assert "PCA of a trajectory of 4 checkpoints" in result.output
    trajectory = LandscapeResult.load(tmp_path / "p" / "landscape.npz").trajectory
    assert trajectory.shape == (4, 2)
    assert float(trajectory[-1].abs().max()) == 0.0  # the centre, last in epoch order
    # two models: epoch_001.pt and the distinct last.pt span one dimension, enough for 1-D
    for path in run.glob("epoch_00[23].pt"):
        path.unlink()
    args = [*base, "--dims", "1", "--directions", str(run), "--out", str(tmp_path / "q")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "PCA of a trajectory of 2 checkpoints" in result.output


def test_pca_counts_each_set_of_weights_once(ckpts, tmp_path):
    """A training folder holds last.pt beside the last epoch_NNN.pt (the same weights):
    counted twice, that point would weigh twice in the PCA."""
    import shutil

    run = shutil.copytree(ckpts["run"], tmp_path / "run")
    shutil.copy(run / "epoch_003.pt", run / "last.pt")
    base = ["landscape", "--grid", "3", *COMMON, "--directions", str(run), "--no-plots"]
    for centre, name in ((ckpts["a"], "outside"), (run / "last.pt", "inside")):
        result = runner.invoke(
            app, [base[0], str(centre), *base[1:], "--out", str(tmp_path / name)]
        )
        assert result.exit_code == 0, result.output
        assert "PCA of a trajectory of 3 checkpoints" in result.output
        assert ("note:" in result.output) == (name == "outside"), result.output
        saved = LandscapeResult.load(tmp_path / name / "landscape.npz")
        assert saved.trajectory.shape == (3, 2)


@pytest.mark.parametrize(
    ("directions", "extra", "note"),
    [
        ("run", ["--span", "5"], "note: --span does not apply here: a PCA trajectory's axes"),
        ("run", ["--bias", "keep"], None),  # leaves 1-D tensors in the PCA
        ("run", ["--norm", "layer"], "note: --norm does not apply here: a PCA trajectory's"),
        ("b", ["--norm", "layer", "--bias", "keep"], "note: --norm and --bias do not apply"),
        ("eigen", ["--bias", "normalize"], "note: --bias does not apply here: Hessian eigen"),
        ("b", ["--dims", "2", "--norm", "layer"], None),  # its second direction is random
        ("random", ["--span", "2", "--norm", "layer", "--bias", "keep"], None),
        ("run", [], None),
    ],
)
def test_flags_that_shape_no_direction_of_the_kind_are_named(
    ckpts, tmp_path, directions, extra, note
):
    """PCA, eigen and 1-D interpolation directions ignore some of --span/--norm/--bias
    (adversarial L3: `--span 5` on a PCA ran without a word)."""
    chosen = str(ckpts[directions]) if directions in ckpts else directions
    args = ["landscape", str(ckpts["a"]), "--grid", "3", *COMMON, "--no-plots"]
    args += ["--directions", chosen, *(["--dims", "1"] if "--dims" not in extra else [])]
    result = runner.invoke(app, [*args, *extra, "--out", str(tmp_path / "with")])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if " not apply here" in line]
    if note is None:
        assert notes == [], result.output
    else:
        assert len(notes) == 1 and notes[0].startswith(note), result.output
    if note is not None:  # and they truly change nothing
        plain = runner.invoke(app, [*args, "--out", str(tmp_path / "plain")])
        assert plain.exit_code == 0, plain.output
        ignored = LandscapeResult.load(tmp_path / "with" / "landscape.npz")
        default = LandscapeResult.load(tmp_path / "plain" / "landscape.npz")
        torch.testing.assert_close(ignored.x, default.x)
        torch.testing.assert_close(ignored.directions, default.directions)
        torch.testing.assert_close(ignored.loss, default.loss, equal_nan=True)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--grid", "2"], "--grid must be at least 3"),
        (["--directions", "nowhere.pt"], "--directions must be random, eigen"),
        (["--norm", "unit"], "--norm must be one of"),
        (["--states"], "it is for interpolation only (--directions CKPT2)"),
    ],
)
def test_landscape_bad_input_is_one_line(ckpts, tmp_path, extra, message):
    args = ["landscape", str(ckpts["a"]), *COMMON, "--out", str(tmp_path), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert "landscape of" not in result.output  # refused before the data is loaded


def test_landscape_refuses_checkpoints_of_another_architecture(ckpts, tmp_path):
    args = ["landscape", str(ckpts["a"]), "--dims", "1", "--grid", "3", *COMMON]
    result = runner.invoke(app, [*args, "--directions", str(ckpts["wide"]), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "different architecture" in result.output and "Traceback" not in result.output
    # refused before the run's status line and its progress bar (it came after them)
    assert "landscape of" not in result.output and "point/s" not in result.output
    # in a trajectory folder, the error names the file ("checkpoint 0" did not)
    import shutil

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("b", "wide"):
        shutil.copy(ckpts[name], mixed / f"{name}.pt")
    result = runner.invoke(app, [*args, "--directions", str(mixed), "--out", str(tmp_path / "p")])
    assert result.exit_code == 2, result.output
    assert f"error: trajectory checkpoint {mixed / 'wide.pt'} has a different architecture" in (
        result.output
    )
    assert "PCA of a trajectory of 2 checkpoints" in result.output
    assert "landscape of" not in result.output


def test_data_the_model_does_not_take_is_a_one_line_error(ckpts, tmp_path):
    """8x8 digits images into a cnn1d for MNIST-1D: spectrum's wording, exit 2."""
    args = ["landscape", str(ckpts["a"]), "--dims", "1", "--grid", "3", *COMMON]
    result = runner.invoke(app, [*args, "--data", "digits", "--out", str(tmp_path)])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output
    assert errors[0].startswith("error: the model or loss failed on the data: RuntimeError:")


def test_interrupted_run_says_how_to_resume(ckpts, tmp_path, monkeypatch):
    """Ctrl-C: exit 130 and one line; with points saved it names the file and the rerun."""
    # the module (``sharpscope.analysis.landscape`` as an attribute is the function)
    module = importlib.import_module("sharpscope.analysis.landscape")
    real = module.landscape

    def interrupted_after_some_points(*args, **kwargs):
        real(*args, **{**kwargs, "max_points": 3})
        raise KeyboardInterrupt

    def interrupted_at_once(*args, **kwargs):
        raise KeyboardInterrupt

    out = tmp_path / "run"
    args = ["landscape", str(ckpts["a"]), "--grid", "3", *COMMON, "--out", str(out)]
    args += ["--no-plots", "--no-progress"]
    monkeypatch.setattr(module, "landscape", interrupted_at_once)
    result = runner.invoke(app, args)
    assert result.exit_code == 130
    assert result.output.strip().splitlines()[-1] == "error: interrupted"
    monkeypatch.setattr(module, "landscape", interrupted_after_some_points)
    result = runner.invoke(app, args)
    assert result.exit_code == 130 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    match = re.fullmatch(
        r"error: interrupted; (\d)/9 points are saved in (.*): run the same command again "
        r"to resume",
        errors[0],
    )
    assert match and match[2] == str(out / "landscape.npz")
    monkeypatch.setattr(module, "landscape", real)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"s, {match[1]} loaded from the earlier run" in result.output


def test_sigterm_stops_like_ctrl_c_with_exit_143(ckpts, tmp_path, monkeypatch):
    """Slurm's time limit, ``timeout`` and ``kill`` send SIGTERM: the saved points are named
    and the rerun resumes, as after Ctrl-C; the shell's code 128 + 15."""
    import os
    import signal

    module = importlib.import_module("sharpscope.analysis.landscape")
    real = module.landscape

    def terminated_after_some_points(*args, **kwargs):
        real(*args, **{**kwargs, "max_points": 3})
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, to this process
        time.sleep(5)  # the handler raises before this ends

    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "run"
    args = ["landscape", str(ckpts["a"]), "--grid", "3", *COMMON, "--out", str(out)]
    monkeypatch.setattr(module, "landscape", terminated_after_some_points)
    result = runner.invoke(app, [*args, "--no-plots", "--no-progress"])
    assert result.exit_code == 143 and "Traceback" not in result.output
    (error,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert re.match(r"error: interrupted; \d/9 points are saved in .*: run the same", error)
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler is removed


def test_no_progress_hides_the_bar(ckpts, tmp_path):
    args = ["landscape", str(ckpts["a"]), "--dims", "1", "--grid", "3", *COMMON, "--no-plots"]
    shown = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert shown.exit_code == 0, shown.output
    assert "point/s" in shown.stderr
    hidden = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--no-progress"])
    assert hidden.exit_code == 0, hidden.output
    assert "point/s" not in hidden.stderr and "\r" not in hidden.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--save-every", "-1"], "--save-every must be a finite number >= 0, got -1"),
        (["--span", "nan"], "--span must be a finite number > 0, got nan"),
        (["--max-points", "0"], "--max-points must be an integer >= 1, got 0"),
        (
            ["--seed", "99999999999999999999"],
            "--seed must be an integer from 0 to 2^62, got 99999999999999999999",
        ),
        (["--seed", "-1"], "--seed must be an integer from 0 to 2^62, got -1"),
        (["--chunk-size", "0"], "--chunk-size must be an integer >= 1, got 0"),
        (["--out", "{file}"], "--out {file} is a file; it must be a folder"),
        (["--out", "{file}/run"], "{file} is a file, not a folder"),
        (
            ["--out", "{folder}"],  # not "give a file name": the name is fixed
            "--out {folder}: {folder}/landscape.npz is a folder, where the result file goes; "
            "move it away or choose another --out",
        ),
    ],
)
def test_bad_numbers_and_output_paths_fail_before_any_work(ckpts, tmp_path, extra, message):
    """--out FILE computed every point, then said "File exists"; --save-every -1 ran."""
    (tmp_path / "a-folder" / "landscape.npz").mkdir(parents=True)
    (tmp_path / "a-file").write_text("")
    places = {"folder": str(tmp_path / "a-folder"), "file": str(tmp_path / "a-file")}
    extra = [a.format(**places) for a in extra]
    if "--out" not in extra:  # never the default ./landscape, should the check be gone
        extra += ["--out", str(tmp_path / "run")]
    args = ["landscape", str(ckpts["a"]), "--dims", "1", "--grid", "3", *COMMON, *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message.format(**places) in errors[0], result.output
    assert "landscape of" not in result.output and "Traceback" not in result.output


def test_span_help_says_where_an_even_grid_puts_its_points():
    """The help said "Axes [-span, span]"; --grid 4 gives -1, -0.5, 0, 0.5."""
    help_text = " ".join(runner.invoke(app, ["landscape", "--help"]).output.split())
    assert "an even --grid drops +span" in help_text and "-1, -0.5, 0, 0.5" in help_text


def test_a_reader_that_closes_stdout_early_does_not_cost_the_plots(ckpts, tmp_path):
    """``sharpscope landscape ... | head -1``: the summary's reader goes away, and the
    command still writes its files and exits 0 (it printed 'error: Broken pipe' before)."""
    import subprocess
    import sys

    out = tmp_path / "piped"
    args = [sys.executable, "-m", "sharpscope", "landscape", str(ckpts["a"]), "--dims", "1"]
    args += ["--grid", "3", *COMMON, "--no-progress", "--out", str(out)]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # like `| head -0`
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr.decode()
    assert {p.name for p in out.iterdir()} >= {"landscape.npz", "landscape_1d.pdf"}


def test_an_interrupt_is_reported_by_rank_0_only(ckpts, tmp_path, monkeypatch):
    """Under torchrun every rank is interrupted: one line from rank 0, silence elsewhere."""
    module = importlib.import_module("sharpscope.analysis.landscape")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "landscape", interrupted)
    monkeypatch.setenv("RANK", "1")
    args = ["landscape", str(ckpts["a"]), "--grid", "3", *COMMON, "--out", str(tmp_path / "r")]
    result = runner.invoke(app, [*args, "--no-plots", "--no-progress"])
    assert result.exit_code == 130 and "error" not in result.output, result.output


@pytest.mark.parametrize("lost", [1, 0])
def test_a_lost_torchrun_process_is_one_line_that_says_what_is_saved(ckpts, tmp_path, lost):
    """Rank 1 dies mid-grid: rank 0 printed gloo's traceback; the points were saved but no
    line said so. Now one line names them and the same command resumes. Session 27: when
    rank 0 (the writer) is the lost one, rank 1 says it (torchrun's agent checks every 30 s
    with rank 0 lost, so that rank 1 meets the lost peer before a SIGTERM)."""
    import os
    import subprocess
    import sys

    (tmp_path / "dying.py").write_text(loss_that_kills_rank_1(after_calls=20, rank=lost))
    out = tmp_path / "l"
    args = ["landscape", str(ckpts["a"]), "--grid", "9", *COMMON, "--out", str(out)]
    args += ["--no-plots", "--no-progress", "--save-every", "0", "--chunk-size", "4"]
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         *(SLOW_AGENT if lost == 0 else ()),
         "-m", "sharpscope", *args, "--loss", "dying.py:loss"],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert launched.returncode != 0
    errors = [line for line in launched.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "[rank0]: Traceback" not in launched.stderr, launched.stderr
    saved = int(LandscapeResult.load(out / "landscape.npz").computed.sum())
    assert 0 < saved < 81
    assert errors[0].endswith(
        f"); {saved}/81 points are saved in {out / 'landscape.npz'}: run the same command "
        "again to resume"
    )
    # rank 0 notices the lost peer itself, or, on a loaded machine, torchrun's agent
    # stops it first (SIGTERM): both say so
    assert errors[0].startswith(
        (
            "error: another process of this torchrun job stopped (gloo: ",
            "error: interrupted by SIGTERM (torchrun stops every process when one of them fails",
        )
    ), errors[0]


# -- session 28 (notes_out/s28/resume.md) ---------------------------------------------------


def test_a_second_landscape_into_a_folder_in_use_is_refused_and_no_lock_file_stays(ckpts, tmp_path):
    """B2: two `landscape` into one --out both ran and both said they wrote landscape.npz;
    the last writer's file replaced the other's, whose result was lost. A running landscape
    holds OUT/landscape.lock now (removed when it ends), not the folder, which a `train`
    into it holds: a landscape may go into a run's folder while it trains."""
    from sharpscope.locking import exclusive_lock

    out = tmp_path / "l"
    out.mkdir()
    args = ["landscape", str(ckpts["a"]), "--dims", "1", "--grid", "3", *COMMON, "--no-plots"]
    with exclusive_lock(out / "landscape.lock", "held by the first run"):
        refused = runner.invoke(app, [*args, "--out", str(out)])
    assert refused.exit_code == 2, refused.output
    errors = [line for line in refused.output.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: another `sharpscope landscape` is writing into {out}; wait for it to finish "
        "or use another --out"
    ]
    assert "landscape of" not in refused.output  # refused before the inputs load
    assert not (out / "landscape.npz").exists()
    with exclusive_lock(out, "a `train` into the folder"):
        done = runner.invoke(app, [*args, "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert sorted(p.name for p in out.iterdir()) == ["landscape.npz"]  # the lock file is gone
    # a folder made for a run that stops on bad input is not left behind, nor its parents
    fresh = tmp_path / "new" / "deeper"
    bad = runner.invoke(app, [*args, "--directions", str(ckpts["wide"]), "--out", str(fresh)])
    assert bad.exit_code == 2 and "different architecture" in bad.output, bad.output
    assert not (tmp_path / "new").exists()


def test_under_torchrun_a_landscape_folder_in_use_stops_every_rank_at_once(ckpts, tmp_path):
    """B2 under torchrun: rank 0 takes the lock and shares the outcome, so that rank 1 does
    not wait for it in a collective until torchrun kills it."""
    from sharpscope.locking import exclusive_lock

    from cases import error_lines, torchrun

    out = tmp_path / "l"
    out.mkdir()
    args = ["landscape", str(ckpts["a"]), "--dims", "1", "--grid", "3", *COMMON]
    with exclusive_lock(out / "landscape.lock", "held by the first run"):
        refused = torchrun(*args, "--no-plots", "--no-progress", "--out", str(out))
    assert refused.returncode != 0
    assert set(error_lines(refused)) == {
        f"error: another `sharpscope landscape` is writing into {out}; wait for it to finish "
        "or use another --out"
    }, refused.stderr[-2000:]
    assert "SIGKILL" not in refused.stderr and "forcefully exiting" not in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["landscape.lock"]  # the holder's
