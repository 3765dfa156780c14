"""Exact answers for the precomputed input layers of a landscape slice that the other
tests left open (mutation testing, session 25: sharpscope/analysis/input_layer.py)."""

from __future__ import annotations

import torch
from torch import nn

from sharpscope.analysis._functional import ParamLayout, flat_parameters
from sharpscope.analysis.input_layer import FAN_IN_PER_TERM, PrecomputedInputLayers, fan_in

F64 = torch.float64


# kills: fan_in without the division by groups (input_layer.py:151). A grouped
# convolution's output reads in_channels / groups channels: multiply-adds per output
# value = (in_channels / groups) · prod(kernel_size).
def test_fan_in_of_grouped_convolutions():
    assert fan_in(nn.Conv1d(4, 6, 3, groups=2)) == 2 * 3
    assert fan_in(nn.Conv2d(6, 6, (3, 2), groups=3)) == 2 * 6
    assert fan_in(nn.Conv3d(8, 8, 1, groups=8)) == 1
    assert fan_in(nn.Linear(7, 2)) == 7


def _build(in_features: int, directions: int):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(in_features, 3), nn.Tanh(), nn.Linear(3, 2)).to(F64).eval()
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    x = torch.randn(5, in_features, dtype=F64)
    dirs = torch.zeros(directions, layout.size, dtype=F64)
    return PrecomputedInputLayers.build(net, layout, theta, dirs, [(x, torch.zeros(5))])


# kills: `fan_in < min_fan_in` -> `fan_in <= min_fan_in` (input_layer.py:226). The
# default threshold is "at least FAN_IN_PER_TERM per stored term": a fan-in of exactly
# 32 · (K + 1) is precomputed, one less is not.
def test_fan_in_exactly_at_the_default_threshold_is_precomputed():
    assert FAN_IN_PER_TERM == 32
    for k in (1, 2):
        at = FAN_IN_PER_TERM * (k + 1)
        built, why = _build(at, k)
        assert built is not None and why == "" and built.names == ["0"]
        built, why = _build(at - 1, k)
        assert built is None
        assert (
            why == f"the input layer 0 has fan-in {at - 1}, under the {at} where precomputing pays"
        )


class ReadsTheWeightForSomeExamples(nn.Module):
    """The parent reads the input layer's weight, but only for examples whose first input
    exceeds 100 (torch.where: the NaN of an unread weight does not leak into the others)."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(128, 8), nn.Linear(8, 3)

    def forward(self, x):
        extra = torch.where(x[:, :1] > 100, self.a.weight.sum(), torch.zeros((), dtype=x.dtype))
        return self.h(torch.tanh(self.a(x))) + extra


# kills: the check run on the first example only, `batches[0][0][:1]` for `[:64]`
# (input_layer.py:218). build's docstring: the copy must reproduce the model's outputs on
# the first 64 examples; here only the second example shows that the weight is read.
def test_the_check_runs_on_the_first_64_examples_not_the_first_one():
    torch.manual_seed(0)
    net = ReadsTheWeightForSomeExamples().to(F64).eval()
    layout = ParamLayout.of(net)
    theta = flat_parameters(net, layout)
    x = torch.randn(6, 128, dtype=F64)
    x[1, 0] = 1000.0
    directions = torch.randn(1, layout.size, dtype=F64)
    points = torch.tensor([[1.0]], dtype=F64)
    built, why = PrecomputedInputLayers.build(
        net, layout, theta, directions, [(x, torch.zeros(6))], check_points=points
    )
    assert built is None and why == "the precomputed outputs did not reproduce the model's"
