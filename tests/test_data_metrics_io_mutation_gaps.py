"""Exact-answer tests for mutants of metrics / evaluation / data / io that the suite missed
(session-24 mutation testing, notes_out/s24/mut_train.md). Each passes on the current code and
fails on its mutant."""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from sharpscope.errors import SharpscopeError
from sharpscope.evaluation import check_model_on_data, evaluate
from sharpscope.metrics import expected_calibration_error, predictive_metrics

F64 = torch.float64


# E03 / E04 -- the default ECE has 15 bins (metrics.py docstring, evaluate's "15-bin ECE")
def test_default_ece_has_fifteen_bins():
    """Confidences 0.68 (right) and 0.72 (wrong) share the 15-bin bin (0.667, 0.733]:
    ECE = |1 - 1.40| / 2 = 0.20. With 10 or 20 bins they fall apart (0.7 is an edge):
    (0.32 + 0.72) / 2 = 0.52."""
    p = torch.tensor([[0.68, 0.32], [0.72, 0.28]], dtype=F64)
    y = torch.tensor([0, 1])
    assert expected_calibration_error(p, y) == pytest.approx(0.20, abs=1e-12)
    assert predictive_metrics(p, y)["ece"] == pytest.approx(0.20, abs=1e-12)
    assert expected_calibration_error(p, y, num_bins=10) == pytest.approx(0.52, abs=1e-12)


# V05 -- evaluate(probs_fn=...) scores the given probabilities (bSAM's model average)
def test_evaluate_scores_the_probabilities_of_probs_fn_not_the_softmax():
    x = torch.randn(4, 3)
    y = torch.tensor([0, 1, 1, 0])
    model = torch.nn.Linear(3, 2)
    fixed = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]], dtype=F64)
    got = evaluate(model, x, y, F.cross_entropy, probs_fn=lambda xb: fixed)
    assert got["acc"] == 0.5
    assert got["nll"] == pytest.approx(
        -(torch.log(fixed[[0, 1, 2, 3], [0, 1, 1, 0]])).mean().item()
    )


# V06 -- the example of the largest class is among those the model is checked on
def test_a_model_with_fewer_outputs_than_the_largest_class_fails_before_training():
    """The first 8 labels are 0..2, label 9 comes later: a 5-output model must be refused."""
    x = torch.randn(20, 4)
    y = torch.zeros(20, dtype=torch.long)
    y[:8] = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    y[15] = 9
    with pytest.raises(SharpscopeError):
        check_model_on_data(torch.nn.Linear(4, 5), x, y, F.cross_entropy)


# N02 / N04 -- round(fraction * N) examples, chosen by the seeded permutation of the noise stream
def test_symmetric_label_noise_is_the_documented_draw():
    from sharpscope.data.noise import symmetric_label_noise

    targets = torch.arange(10) % 4
    seed, fraction, classes = 2, 0.27, 4  # round(2.7) = 3 flips, int(2.7) = 2
    gen = torch.Generator().manual_seed((seed * 1_000_003 + 7_919) % 2**63)
    chosen = torch.randperm(10, generator=gen)[:3]
    shift = torch.randint(1, classes, (3,), generator=gen)
    expected = targets.clone()
    expected[chosen] = (targets[chosen] + shift) % classes
    got = symmetric_label_noise(targets, fraction, classes, seed=seed)
    assert torch.equal(got, expected)
    assert int((got != targets).sum()) == 3


def test_the_flipped_examples_are_not_the_first_ones():
    from sharpscope.data.noise import symmetric_label_noise

    clean = torch.zeros(1000, dtype=torch.long)
    flipped = symmetric_label_noise(clean, 0.4, 10, seed=0) != clean
    assert int(flipped.sum()) == 400
    # a seeded random choice: both halves hold about 200 of them, not 400 and 0
    assert 150 < int(flipped[:500].sum()) < 250


# A01 -- the trainer calls random_crop_flip with its default padding: 4 pixels (He et al.)
def test_random_crop_flip_pads_four_pixels_by_default():
    from sharpscope.data.augment import random_crop_flip

    images = torch.randn(16, 3, 8, 8)
    default = random_crop_flip(images, torch.Generator().manual_seed(3))
    four = random_crop_flip(images, torch.Generator().manual_seed(3), padding=4)
    assert torch.equal(default, four)


def _saved_checkpoint(path):
    from sharpscope.io import FORMAT, VERSION, save_checkpoint
    from sharpscope.registry import build_model

    spec = {"name": "mlp", "width": 8, "depth": 1}
    model = build_model(spec, (40,), 10)
    save_checkpoint(
        path,
        {
            "format": FORMAT,
            "version": VERSION,
            "model": spec,
            "data": {"name": "mnist1d"},
            "input_shape": [40],
            "num_classes": 10,
            "state_dict": model.state_dict(),
            "metrics": {},
        },
    )
    return path


# I10 -- Checkpoint.sha256 (meta.checkpoint_sha256 of every analysis) is the file's SHA-256
def test_checkpoint_sha256_is_the_files_own_digest(tmp_path):
    from sharpscope.io import load_checkpoint

    path = _saved_checkpoint(tmp_path / "c.pt")
    assert load_checkpoint(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


# I09 -- a data_spec passed to load_checkpoint wins over the one the checkpoint records
def test_a_given_data_spec_wins_over_the_recorded_one(tmp_path):
    from sharpscope.io import load_checkpoint

    path = _saved_checkpoint(tmp_path / "c.pt")
    assert load_checkpoint(path).data_spec["name"] == "mnist1d"
    assert load_checkpoint(path, data_spec={"name": "digits"}).data_spec["name"] == "digits"
