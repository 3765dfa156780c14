"""``train --deterministic``: the settings inside and after, and the error for an op without one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from sharpscope.determinism import CUBLAS_WORKSPACE_CONFIG, deterministic_algorithms
from sharpscope.errors import SharpscopeError
from sharpscope.trainer import TrainConfig, train

# a model whose forward records the determinism setting, and one that needs put_, which has
# no deterministic implementation on the CPU
MODELS = """
import torch
from torch import nn

class Recording(nn.Linear):
    def __init__(self, *args):
        super().__init__(*args)
        self.seen = []

    def forward(self, x):
        self.seen.append(torch.are_deterministic_algorithms_enabled())
        return super().forward(x)

class UsesPut(nn.Linear):
    def forward(self, x):
        out = super().forward(x)
        return out + torch.zeros(1).put_(torch.tensor([0]), torch.ones(1))

def recording():
    return Recording(40, 10)

def uses_put():
    return UsesPut(40, 10)
"""


def _config(tmp_path, model, **changes):
    values = dict(
        dataset={"name": "mnist1d", "samples": 256},
        model={"factory": model},
        optimizer={"name": "sgd", "lr": 0.05},
        epochs=1,
        batch_size=64,
        out=str(tmp_path / "run"),
        progress=False,
        device="cpu",
    )
    values.update(changes)
    return TrainConfig.from_dict(values)


@pytest.fixture
def models_file(tmp_path):
    path = tmp_path / "det_models.py"
    path.write_text(MODELS)
    return path


def test_settings_inside_and_restored_after(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True
    try:
        with deterministic_algorithms():
            assert torch.are_deterministic_algorithms_enabled()
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE_CONFIG
        assert not torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.deterministic and torch.backends.cudnn.benchmark
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own setting is kept
        with deterministic_algorithms():
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # and is still there after
        with deterministic_algorithms(enabled=False):
            assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.backends.cudnn.benchmark = False


def test_a_previous_warn_only_setting_is_restored_after():
    """torch.use_deterministic_algorithms(True, warn_only=True) before the block is so after
    it (restoring only the enabled flag turned warnings into errors)."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with deterministic_algorithms():
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


def test_training_runs_with_the_setting_and_records_it(tmp_path, models_file):
    seen = train(_config(tmp_path, f"{models_file}:recording", deterministic=True)).model.seen
    assert len(seen) > 4 and all(seen)  # every forward, evaluation included
    assert not torch.are_deterministic_algorithms_enabled()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["deterministic"] is True
    seen = train(_config(tmp_path, f"{models_file}:recording", out=str(tmp_path / "b"))).model.seen
    assert len(seen) > 4 and not any(seen)


def test_an_operation_without_a_deterministic_kernel_is_one_clear_error(tmp_path, models_file):
    train(_config(tmp_path, f"{models_file}:uses_put"))  # fine without the flag
    with pytest.raises(SharpscopeError, match="--deterministic: the model uses put_"):
        train(_config(tmp_path / "b", f"{models_file}:uses_put", deterministic=True))
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(SharpscopeError, match="deterministic must be true or false"):
        _config(tmp_path, f"{models_file}:recording", deterministic="yes")


def test_command_line_flag(tmp_path, models_file):
    def run(*flags):
        return subprocess.run(
            [sys.executable, "-m", "sharpscope", "train", "--dataset", "mnist1d",
             "--samples", "256", "--model", f"{models_file}:uses_put", "--optimizer", "sgd",
             "--epochs", "1", "--batch-size", "64", "--device", "cpu", "--no-progress",
             "--out", str(tmp_path / "cli"), *flags],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    failed = run("--deterministic")
    assert failed.returncode != 0
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "put_" in lines[0] and "Traceback" not in failed.stderr
