"""Hessians through operations PyTorch does not differentiate twice (tvmodels, session 31)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import sharpscope as ss
from sharpscope.curvature.twice import twice_differentiable


class Relu6Sigmoid(nn.Module):
    def forward(self, x):
        return F.relu6(x + 3.0) / 6.0


def _block(gate: nn.Module) -> nn.Module:
    """A squeeze-excitation-like block, as MobileNetV3's, gated by ``gate``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Hardswish(), nn.Linear(8, 8), gate, nn.Linear(8, 3))


@pytest.mark.parametrize("hvp_mode", ["reverse", "forward"])
def test_a_hardsigmoid_model_gets_the_hessian_of_its_relu6_form(hvp_mode):
    """nn.Hardsigmoid (every torchvision MobileNetV3) has no second derivative in PyTorch
    ("derivative for aten::hardsigmoid_backward is not implemented"): every Hessian
    analysis refused the model. Its eigenvalues are now those of the same function written
    as relu6(x + 3) / 6, whose float64 Hessian torch.func computes directly."""
    model = _block(nn.Hardsigmoid()).double()
    torch.manual_seed(1)
    x, y = torch.randn(64, 6, dtype=torch.float64) * 2, torch.randint(0, 3, (64,))
    reference = _block(Relu6Sigmoid()).double()
    names = [n for n, _ in reference.named_parameters()]
    shapes = [p.shape for _, p in reference.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in reference.parameters()])

    def loss(flat):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return F.cross_entropy(functional_call(reference, params, (x,)), y)

    dense = torch.linalg.eigvalsh(torch.func.hessian(loss)(theta)).flip(0)[:3]
    result = ss.top_eigenvalues(model, (x, y), k=3, hvp_mode=hvp_mode, tol=1e-10)
    torch.testing.assert_close(result.eigenvalues.double(), dense, rtol=1e-6, atol=1e-10)
    assert F.hardsigmoid is not None and F.hardsigmoid.__module__ == "torch.nn.functional"


def test_the_twice_differentiable_forms_are_the_functions_and_are_undone():
    x = torch.linspace(-5, 5, 101, requires_grad=True)
    with twice_differentiable():
        inside = nn.Hardsigmoid()(x)
        (grad,) = torch.autograd.grad(inside.sum(), x, create_graph=True)
        (second,) = torch.autograd.grad(grad.sum(), x)  # refused outside
    outside = F.hardsigmoid(x)
    assert torch.equal(inside, outside)
    (plain,) = torch.autograd.grad(outside.sum(), x)
    assert torch.equal(grad, plain) and torch.count_nonzero(second) == 0
    with pytest.raises(RuntimeError, match="not implemented"):
        (g,) = torch.autograd.grad(F.hardsigmoid(x).sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)
