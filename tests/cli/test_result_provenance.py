"""What the command line's result files record of the checkpoints they came from
(session 29), read back without sharpscope as a script would (numpy and json only)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from sharpscope.cli import app

from cases import write_checkpoint as write_spec_checkpoint

runner = CliRunner()
SPEC = {"name": "cnn1d", "norm": "batch", "width": 4, "depth": 2}
COMMON = ["--samples", "32", "--device", "cpu", "--no-plots"]


def write_checkpoint(path, seed, epoch=1):
    return write_spec_checkpoint(path, SPEC, (40,), {"name": "mnist1d"}, seed=seed, epoch=epoch)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("provenance")
    (root / "run").mkdir()
    for epoch in (1, 2, 3):
        write_checkpoint(root / "run" / f"epoch_{epoch:03d}.pt", seed=10 + epoch, epoch=epoch)
    write_checkpoint(root / "a.pt", seed=0)
    write_checkpoint(root / "b.pt", seed=1)
    return root


def plain_meta(path):
    with np.load(path, allow_pickle=False) as archive:
        return json.loads(str(archive["__json__"]))["meta"]


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_checkpoint_typed_relative_is_recorded_absolute(root, monkeypatch):
    """meta.checkpoint was the path as typed ('a.pt'), while the same record holds the data
    root and factories absolute: read from another folder, it pointed nowhere."""
    monkeypatch.chdir(root)
    args = ["msharpness", "a.pt", "--m", "16", "--json", "ms.json", "--samples", "32"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    meta = json.loads((root / "ms.json").read_text())["meta"]
    assert meta["checkpoint"] == str(root / "a.pt")
    assert meta["checkpoint_sha256"] == sha256(root / "a.pt")


def test_an_interpolation_names_its_second_checkpoint(root, monkeypatch):
    """The file named only the first checkpoint: nothing said which model alpha = 1 was.
    Paths typed relative are recorded absolute, as data_root and a study's records are."""
    monkeypatch.chdir(root)
    args = ["landscape", "a.pt", "--dims", "1", "--grid", "3", "--directions", "b.pt"]
    result = runner.invoke(app, [*args, "--out", "i", *COMMON])
    assert result.exit_code == 0, result.output
    meta = plain_meta(root / "i" / "landscape.npz")
    assert meta["checkpoint"] == str(root / "a.pt")
    assert meta["checkpoint_sha256"] == sha256(root / "a.pt")
    assert meta["extra"]["second_checkpoint"] == str(root / "b.pt")
    assert meta["extra"]["second_sha256"] == sha256(root / "b.pt")


def test_a_pca_names_its_trajectory_checkpoints_in_the_order_of_its_rows(root, monkeypatch):
    monkeypatch.chdir(root)
    args = ["landscape", "a.pt", "--grid", "3", "--directions", "run", "--out", "p", *COMMON]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    path = root / "p" / "landscape.npz"
    meta = plain_meta(path)
    rows = meta["extra"]["trajectory_checkpoints"]
    with np.load(path, allow_pickle=False) as archive:
        assert len(rows) == len(archive["trajectory"]) == 3
    files = [root / "run" / f"epoch_{e:03d}.pt" for e in (1, 2, 3)]
    assert rows == [
        {"path": str(f), "epoch": e, "sha256": sha256(f)} for e, f in zip((1, 2, 3), files)
    ]
    assert "second_checkpoint" not in meta["extra"]


def test_the_api_records_loaded_checkpoints_and_nothing_for_bare_models(root):
    import sharpscope as ss
    from sharpscope.analysis.landscape import landscape

    a, b = (ss.load_checkpoint(root / n) for n in ("a.pt", "b.pt"))
    data = ss.load_data("mnist1d", samples=16)
    meta = landscape(a.model, data, dims=1, grid=3, directions=b, states=False).meta
    assert meta.extra["second_checkpoint"] == str(root / "b.pt")
    assert meta.extra["second_sha256"] == b.sha256
    bare = landscape(a.model, data, dims=1, grid=3, directions=b.model, states=False).meta
    assert "second_checkpoint" not in bare.extra


@pytest.mark.parametrize(
    "args",
    [
        ["spectrum", "a.pt", "--skip", "trace,density", "--json", "-"],
        ["msharpness", "a.pt", "--json", "-"],
        ["bench", "optimizers", "--quick", "--json", "-"],
    ],
)
def test_json_dash_is_refused_in_one_line_and_writes_no_file(args, root, monkeypatch):
    """`--json -` wrote a file named '-' (and stdout, which a reader might have taken it
    for, holds the printed summary)."""
    monkeypatch.chdir(root)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "results are written to files, not to stdout" in lines[0]
    assert not (root / "-").exists()


def test_meta_says_how_the_analysed_weights_were_made(root, monkeypatch):
    """precision doubt 4 (session 31): a bf16-trained run's analyses said nothing of it,
    and a bare state_dict saved in bfloat16 was analysed as its float32 copy silently
    (its eigenvalues are those of the rounded weights: 7.289 against 7.320)."""
    import torch

    monkeypatch.chdir(root)
    trained = runner.invoke(
        app,
        ["train", "--dataset", "digits", "--samples", "64", "--batch-size", "32", "--model", "mlp"]
        + [
            "--epochs",
            "1",
            "--precision",
            "bf16",
            "--out",
            "bf",
            "--no-progress",
            "--device",
            "cpu",
        ],
    )
    assert trained.exit_code == 0, trained.output
    state = torch.load(root / "bf" / "last.pt", weights_only=True)["state_dict"]
    torch.save({k: v.bfloat16() for k, v in state.items()}, root / "bare.pt")
    for path, flags, extra in (
        ("bf/last.pt", [], {"trained_precision": "bf16"}),
        ("bare.pt", ["--model", "mlp", "--data", "digits"], {"stored_dtypes": ["bfloat16"]}),
        ("a.pt", [], {}),
    ):
        args = ["msharpness", path, *flags, "--m", "16", "--json", "ms.json", *COMMON[:2]]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        meta = json.loads((root / "ms.json").read_text())["meta"]["extra"]
        got = {k: meta[k] for k in ("trained_precision", "stored_dtypes") if k in meta}
        assert got == extra, path
