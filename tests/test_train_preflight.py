"""Before training: a model that does not fit the data, --augment on data that are not
images, and a resume with another process count each say so in one line."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.trainer import TrainConfig, train


def _config(tmp_path, **changes):
    values = dict(
        dataset={"name": "mnist1d", "samples": 128},
        model={"name": "mlp", "width": 16, "depth": 1},
        optimizer={"name": "sgd", "lr": 0.05},
        epochs=1,
        batch_size=64,
        out=str(tmp_path),
        progress=False,
        device="cpu",
    )
    values.update(changes)
    return TrainConfig.from_dict(values)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("torch.nn.Linear(64, 10)", "shapes cannot be multiplied"),  # other input size
        ("torch.nn.Linear(40, 5)", "out of bounds"),  # fewer outputs than classes
    ],
)
def test_a_model_that_does_not_fit_the_data_is_one_line(tmp_path, body, message):
    module = tmp_path / "mymodel.py"
    module.write_text(f"import torch\ndef model():\n    return {body}\n")
    config = _config(tmp_path / "run", model={"factory": f"{module}:model"})
    with pytest.raises(SharpscopeError, match=f"the model or loss failed on the data.*{message}"):
        train(config)


def test_augment_on_data_that_are_not_images_is_one_line(tmp_path):
    with pytest.raises(SharpscopeError, match=r"needs images of shape \(C, H, W\)"):
        train(_config(tmp_path, augment=True))


def test_resume_with_another_process_count_warns(tmp_path):
    train(_config(tmp_path / "full", epochs=2, save_every=1))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    state = torch.load(tmp_path / "full" / "epoch_001.pt", weights_only=True)
    assert state["world_size"] == 1
    state["world_size"] = 2  # as if torchrun with two processes had written it
    torch.save(state, resumed / "last.pt")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", resumed / "metrics.jsonl")
    with pytest.warns(UserWarning, match="written by 2 process"):
        train(_config(resumed, epochs=2), resume=True)
    state["world_size"] = 1
    torch.save(state, resumed / "last.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(_config(resumed, epochs=2), resume=True)


def test_each_rows_lr_is_the_one_its_epochs_steps_used(tmp_path):
    """Step decay at epochs 2 and 3 (0-based): epochs 1-2 train at 0.05, epoch 3 at 0.005,
    epoch 4 at 0.0005; the row of an epoch says so, not the next epoch's rate."""
    import json

    schedule = {"name": "step", "milestones": [2, 3], "gamma": 0.1}
    train(_config(tmp_path, epochs=4, schedule=schedule))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in rows if row["kind"] == "eval"]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.0005])
