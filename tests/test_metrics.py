"""Accuracy, NLL and expected calibration error on hand-computed examples."""

from __future__ import annotations

import math

import pytest
import torch

from sharpscope.metrics import expected_calibration_error, predictive_metrics

F64 = torch.float64


def test_ece_sums_the_absolute_gap_of_each_bin():
    """Bins (0.85, 0.9] and (0.6, 0.65]: ECE = (|1 − 0.9| + |0 − 0.65|)/2, not |Σ_b (acc − conf)|."""
    p = torch.tensor([[0.9, 0.1], [0.65, 0.35]], dtype=F64)
    assert expected_calibration_error(p, torch.tensor([0, 1])) == pytest.approx((0.1 + 0.65) / 2)


def test_ece_bins_are_right_closed():
    """4 bins: confidence 0.75 (correct) falls in (0.5, 0.75], 0.9 (wrong) in (0.75, 1]."""
    p = torch.tensor([[0.75, 0.25], [0.9, 0.1]], dtype=F64)
    ece = expected_calibration_error(p, torch.tensor([0, 1]), num_bins=4)
    assert ece == pytest.approx((0.25 + 0.9) / 2)


def test_nll_uses_the_true_class():
    """NLL = −(ln 0.3 + ln 0.8)/2 for targets (1, 1), one of them not the predicted class."""
    p = torch.tensor([[0.7, 0.3], [0.2, 0.8]], dtype=F64)
    metrics = predictive_metrics(p, torch.tensor([1, 1]))
    assert metrics["nll"] == pytest.approx(-(math.log(0.3) + math.log(0.8)) / 2)
