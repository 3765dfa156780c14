"""Exact answers for the landscape directions (analysis.md §6) that the other tests left
open (mutation testing, session 25: sharpscope/analysis/directions.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sharpscope.analysis._functional import ParamLayout, flat_parameters, seeded_generator
from sharpscope.analysis.directions import normalize_direction, random_direction

F64 = torch.float64


def _linear22():
    """nn.Linear(2, 2): θ = (W rows (3, 4) and (0, 1), bias (5, 6))."""
    layout = ParamLayout.of(nn.Linear(2, 2))
    return layout, torch.tensor([3.0, 4.0, 0.0, 1.0, 5.0, 6.0], dtype=F64)


# kills: FILTER_EPS = 1e-10 -> 1e-9 (directions.py:34). The guard is Li et al.'s
# d·‖θ‖/(‖d‖ + 1e-10): with a raw filter of norm 1e-10 it halves the scale exactly.
def test_filter_and_layer_guard_is_exactly_1e_10():
    layout, theta = _linear22()
    raw = torch.tensor([1e-10, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=F64)
    d = normalize_direction(raw, theta, layout, "filter", "ignore")
    # row 0: 1e-10 · 5 / (1e-10 + 1e-10) = 2.5; row 1: 1 · 1 / (1 + 1e-10)
    assert d[0].item() == pytest.approx(2.5, rel=1e-12)
    assert d[2].item() == pytest.approx(1 / (1 + 1e-10), rel=1e-14) and d[1] == 0 and d[3] == 0
    assert d[4:].tolist() == [0.0, 0.0]
    tiny = torch.tensor([1e-10, 0.0, 0.0, 0.0, 1.0, 1.0], dtype=F64)
    layer = normalize_direction(tiny, theta, layout, "layer", "ignore")
    # ‖W‖ = √26: 1e-10 · √26 / (2e-10)
    assert layer[0].item() == pytest.approx(math.sqrt(26) / 2, rel=1e-12)


# kills: norm "none" returning d/‖d‖ instead of d (directions.py:84), and the draw of
# the random directions changed: seeded_generator(index, seed) for (seed, index)
# (directions.py:95) or float32 draws cast to float64 (directions.py:95).
# norm="none" is the raw seeded N(0, 1) direction, drawn in float64 from
# seeded_generator(seed, index) (random_direction's docstring: the same direction
# ``index`` of a ``seed`` in every run); every other norm scales that very draw.
def test_random_direction_is_the_documented_float64_draw_and_none_leaves_it_raw():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(F64)
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    raw = torch.randn(layout.size, generator=seeded_generator(7, 1), dtype=F64)
    none = random_direction(theta, layout, seed=7, index=1, norm="none", bias="normalize")
    torch.testing.assert_close(none, raw, rtol=0, atol=0)
    assert torch.equal(normalize_direction(raw, theta, layout, "none", "normalize"), raw)
    filt = random_direction(theta, layout, seed=7, index=1, norm="filter", bias="ignore")
    torch.testing.assert_close(
        filt, normalize_direction(raw, theta, layout, "filter", "ignore"), rtol=0, atol=0
    )
