"""``sharpscope landscape`` on tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from sharpscope.analysis.landscape import LandscapeResult
from sharpscope.cli import app
from sharpscope.io import FORMAT, VERSION, save_checkpoint
from sharpscope.registry import build_model

runner = CliRunner()
SPEC = {"name": "cnn1d", "norm": "batch", "width": 4, "depth": 2}
COMMON = ["--samples", "32", "--device", "cpu"]


def write_checkpoint(path, seed, spec=SPEC, epoch=1):
    torch.manual_seed(seed)
    net = build_model(spec, (40,), 10)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    save_checkpoint(
        path,
        {
            "format": FORMAT,
            "version": VERSION,
            "model": spec,
            "data": {"name": "mnist1d"},
            "input_shape": [40],
            "num_classes": 10,
            "epoch": epoch,
            "step": epoch,
            "metrics": {},
            "state_dict": net.state_dict(),
        },
    )
    return path


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
    rest = runner.invoke(app, [*base, "--out", str(tmp_path / "part"), "--no-plots"])
    assert rest.exit_code == 0 and "9/9 points" in rest.output
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


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--grid", "2"], "--grid must be at least 3"),
        (["--directions", "nowhere.pt"], "--directions must be random, eigen"),
        (["--norm", "unit"], "--norm must be one of"),
    ],
)
def test_landscape_bad_input_is_one_line(ckpts, tmp_path, extra, message):
    args = ["landscape", str(ckpts["a"]), *COMMON, "--out", str(tmp_path), *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_landscape_refuses_checkpoints_of_another_architecture(ckpts, tmp_path):
    args = ["landscape", str(ckpts["a"]), "--dims", "1", "--grid", "3", *COMMON]
    result = runner.invoke(app, [*args, "--directions", str(ckpts["wide"]), "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "different architecture" in result.output and "Traceback" not in result.output
