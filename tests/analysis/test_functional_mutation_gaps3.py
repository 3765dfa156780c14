"""Exact answers for the shared evaluation helpers of the sharpness and landscape
analyses that the other tests left open (mutation testing, session 25:
sharpscope/analysis/_functional.py)."""

from __future__ import annotations

import torch

from sharpscope.analysis._functional import is_classification


# kills: is_classification without the one-hot row-sum check (_functional.py:337).
# Multi-hot 0/1 rows (multi-label targets) have no single class: no 0-1 error or
# accuracy is defined for them (argmax would score the first label of each row).
def test_multi_hot_rows_are_not_classification_targets():
    assert is_classification(torch.eye(3, dtype=torch.float64)[[2, 0, 1]])
    assert not is_classification(torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert not is_classification(torch.tensor([[0.0, 0.0, 0.0]]))  # no class at all
