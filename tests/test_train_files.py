"""What ``train`` writes, read back without sharpscope (session 29)."""

from __future__ import annotations

import json

import pytest
import torch

import sharpscope as ss


@pytest.mark.parametrize("optimizer", [{"name": "adam", "lr": 0.01}, {"name": "bsam"}])
def test_config_json_optimizer_resolved_equals_the_checkpoints_optimizer(optimizer, tmp_path):
    """README: optimizer_resolved is the optimizer 'as the checkpoint records it'; the
    checkpoint held Adam's and bSAM's betas as a tuple, config.json as a list, so the two
    compared unequal in a script that loads both."""
    config = ss.TrainConfig(
        dataset={"name": "mnist1d", "samples": 128},
        model={"name": "mlp", "width": 8, "depth": 1},
        optimizer=optimizer,
        epochs=1,
        batch_size=64,
        out=str(tmp_path),
        device="cpu",
    )
    ss.train(config)
    stored = torch.load(tmp_path / "last.pt", weights_only=True)["optimizer"]
    written = json.loads((tmp_path / "config.json").read_text())["optimizer_resolved"]
    assert stored == written
    assert isinstance(stored["betas"], list)
