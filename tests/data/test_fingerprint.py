"""An analysis reads a run's data factory as the run's training did, and says when the
factory's data changed (sharpscope.data.fingerprint)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from sharpscope.cli._common import load_analysis_inputs
from sharpscope.data import load_data
from sharpscope.data.fingerprint import (
    data_digest,
    data_summary,
    reading_as_trained,
    same_summary,
)
from sharpscope.study.config import study_config_from_dict
from sharpscope.study.runner import _analysis_split
from sharpscope.study.sweep import RunSpec
from sharpscope.trainer import TrainConfig, train

# one set from torch's global generator, without a seed of its own: the trainer seeds
# torch (config.seed) just before it calls the factory
TORCH_UNSEEDED = """\
import torch
def data():
    return {"train": (torch.randn(64, 40), torch.randint(0, 10, (64,))),
            "test": (torch.randn(32, 40), torch.randint(0, 10, (32,)))}
"""
# NumPy's own generator, seeded from the operating system: other data on every call
NUMPY_UNSEEDED = """\
import numpy as np, torch
def data():
    rng = np.random.default_rng()
    pair = lambda n: (torch.tensor(rng.normal(size=(n, 40)), dtype=torch.float32),
                      torch.tensor(rng.integers(0, 10, n)))
    return {"train": pair(64), "test": pair(32)}
"""
SEEDED = """\
import torch
def data():
    g = torch.Generator().manual_seed(0)
    pair = lambda n: (torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g))
    return {"train": pair(64), "test": pair(32)}
"""


def _trained(tmp_path, source, seed=7, epochs=1):
    (tmp_path / "mydata.py").write_text(source)
    factory = f"{tmp_path / 'mydata.py'}:data"
    config = TrainConfig(
        model={"name": "mlp", "width": 8, "depth": 1},
        dataset={"factory": factory},
        optimizer={"name": "sgd", "lr": 0.05},
        epochs=epochs,
        batch_size=16,
        seed=seed,
        out=str(tmp_path / "run"),
        device="cpu",
        progress=False,
    )
    return config, factory


def test_the_data_summary_tells_other_data_and_another_order_apart():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, 3, 4, generator=gen), torch.randint(0, 10, (5000,), generator=gen)
    same = data_summary(x, y)
    assert same[0] == 5000 and same_summary(same, data_summary(x.clone(), y.clone()))
    order = torch.randperm(5000, generator=gen)
    assert not same_summary(same, data_summary(x[order], y[order]))  # the sums alone would agree
    moved = x.clone()
    moved[4500, 0, 0] += 1e-3  # one value in the second chunk of 4096
    assert not same_summary(same, data_summary(moved, y))
    labels = y.clone()
    labels[0] = (labels[0] + 1) % 10
    assert not same_summary(same, data_summary(x, labels))
    assert same_summary(data_summary(x.to(torch.uint8), y), data_summary(x.to(torch.uint8), y))


def test_the_data_digest_tells_apart_data_whose_sums_agree():
    """Session 31 (dist B1): a flip or a roll within examples keeps every sum of
    data_summary; the digest that torchrun's processes compare tells them apart."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, 3, 4, generator=gen), torch.randint(0, 10, (5000,), generator=gen)
    flipped = x.clone()
    flipped[4500:] = flipped[4500:].flip(-1)  # in the second chunk of 4096
    assert same_summary(data_summary(x, y), data_summary(flipped, y))
    digest = data_digest(x, y)
    assert digest == data_digest(x.clone(), y.clone())
    assert digest == data_digest(x.transpose(1, 2).contiguous().transpose(1, 2), y)  # strides
    for other in (flipped, x.roll(1, -1), x.double(), x.reshape(5000, 12)):
        assert data_digest(other, y) != digest
    assert data_digest(x, y.flip(0)) != digest
    assert data_digest(x.bfloat16(), y) == data_digest(x.bfloat16(), y)  # no numpy dtype


def test_reading_as_trained_gives_the_callers_random_state_back():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    with reading_as_trained(5):
        inside = torch.rand(2)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(5)
    assert torch.equal(inside, torch.rand(2))


def test_an_analysis_reads_a_torch_unseeded_factory_as_training_did(tmp_path):
    """Before: the analysis called the factory in another random state, so it analysed
    other data than the run trained on, without a word."""
    config, factory = _trained(tmp_path, TORCH_UNSEEDED)
    train(config)
    torch.manual_seed(config.seed)
    trained_x, trained_y = load_data({"factory": factory}, "train").pair()
    torch.manual_seed(999)  # whatever state the analysis starts in
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inputs = load_analysis_inputs(tmp_path / "run" / "last.pt", trust_factories=True)
    assert torch.equal(inputs.split.inputs, trained_x)
    assert torch.equal(inputs.split.targets, trained_y)
    raw = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert same_summary(raw["data_summary"], inputs.split.source_summary)


def test_an_analysis_of_other_data_than_the_run_trained_on_warns(tmp_path):
    config, _ = _trained(tmp_path, NUMPY_UNSEEDED)
    train(config)
    with pytest.warns(UserWarning, match=r"gave other data than when .*last.pt was trained"):
        load_analysis_inputs(tmp_path / "run" / "last.pt", trust_factories=True, samples=16)


def test_a_seeded_factory_and_a_built_in_data_set_give_no_warning(tmp_path):
    config, _ = _trained(tmp_path, SEEDED)
    train(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_analysis_inputs(tmp_path / "run" / "last.pt", trust_factories=True, split="test")
    assert "data_summary" not in torch.load(
        _built_in_run(tmp_path / "builtin"), weights_only=True
    )  # nothing to compare for a built-in data set


def _built_in_run(out):
    config = TrainConfig(
        model={"name": "mlp", "width": 8, "depth": 1},
        dataset={"name": "digits", "samples": 64},
        optimizer={"name": "sgd", "lr": 0.05},
        epochs=1,
        batch_size=16,
        out=str(out),
        device="cpu",
        progress=False,
    )
    train(config)
    return out / "last.pt"


def test_a_resume_on_other_data_warns(tmp_path):
    config, _ = _trained(tmp_path, NUMPY_UNSEEDED, epochs=2)
    config.save_every = 1
    train(config)
    run = tmp_path / "run"
    (run / "epoch_001.pt").replace(run / "last.pt")  # as if stopped after epoch 1
    with pytest.warns(UserWarning, match="the resumed run trains on the data read now"):
        train(config, resume=True)


def test_a_studys_analysis_reads_a_torch_unseeded_factory_as_its_training_did(tmp_path):
    _, factory = _trained(tmp_path, TORCH_UNSEEDED)
    study = study_config_from_dict(
        {
            "study": {"name": "s"},
            "train": {"dataset": factory, "model": "mlp", "epochs": 1},
            "analysis": {"m_sharpness": {"m": [16]}},
        }
    )
    run = RunSpec("r", {}, {"dataset": {"factory": factory}, "seed": 3}, [1])
    torch.manual_seed(3)
    expected = load_data(factory, "train").inputs
    torch.manual_seed(999)
    split, _ = _analysis_split(run, study)
    assert torch.equal(split.inputs, expected)
    assert np.isfinite(split.source_summary).all()
