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
