"""Gap tests for mutants of sharpscope/curvature/fold.py that the suite let through
(session 25, mut_spec): fold_batchnorm(check=True), which the landscape and m-sharpness
analyses rely on, must keep the original model when the folded one computes another
function (a layer output also used beside the BatchNorm, which hooks cannot see)."""

from __future__ import annotations

import torch
from torch import nn

from sharpscope.curvature.fold import find_foldable_pairs, fold_batchnorm

from cases import PreNormOutputReused


def reused(scale: float) -> nn.Module:
    """BN(z) = scale·z exactly: the folded model computes (2·scale)·z where the model
    computes (1 + scale)·z."""
    torch.manual_seed(0)
    net = PreNormOutputReused().double().eval()
    with torch.no_grad():
        net.norm.running_mean.zero_()
        net.norm.running_var.fill_(1.0 - net.norm.eps)
        net.norm.weight.fill_(scale)
        net.norm.bias.zero_()
    return net


# F6: check=True ignored (the wrong fold returned)
def test_check_keeps_the_original_when_the_fold_changes_the_function():
    net = reused(3.0)
    x = torch.randn(4, 1, 9, dtype=torch.float64)
    assert find_foldable_pairs(net, x) == [("conv", "norm")]  # the hooks cannot tell
    unchecked, pairs = fold_batchnorm(net, x)
    assert pairs == [("conv", "norm")] and not torch.allclose(unchecked(x), net(x))
    kept, pairs = fold_batchnorm(net, x, check=True)
    assert kept is net and pairs == []


# F7: the check's tolerance loosened from 1e-4 to 1e-1 relative
def test_check_rejects_a_fold_that_is_off_by_half_a_percent():
    net = reused(1.01)  # outputs (2.02 vs 2.01)·z through the head: ~0.3% apart
    x = torch.randn(4, 1, 9, dtype=torch.float64)
    folded, _ = fold_batchnorm(net, x)
    with torch.no_grad():
        gap = float((folded(x) - net(x)).abs().max() / net(x).abs().max())
    assert 1e-3 < gap < 5e-2
    kept, pairs = fold_batchnorm(net, x, check=True)
    assert kept is net and pairs == []
    # an exact fold (nothing reused) passes the same check
    plain = nn.Sequential(nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3)).double().eval()
    folded, pairs = fold_batchnorm(plain, x, check=True)
    assert pairs == [("0", "1")] and folded is not plain


# F10: the scale taken as |γ|/σ (a negative BatchNorm weight is legitimate and common
# after training; the suite's models all draw γ in [0.5, 1.5])
def test_negative_batchnorm_weights_fold_with_their_sign():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([-1.5, 0.7, -0.2, 1.1]))
        net[1].bias.uniform_(-0.5, 0.5)
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(6, 5, dtype=torch.float64)
    folded, pairs = fold_batchnorm(net, x)
    assert pairs == [("0", "1")]
    torch.testing.assert_close(folded(x), net(x), rtol=1e-12, atol=1e-12)
