"""Gap tests for mutants of sharpscope/curvature/dense.py that the suite let through
(session 25, mut_spec). The reference is a central finite difference of the gradient
(first derivatives only), independent of both of dense_hessian's paths."""

from __future__ import annotations

import torch
from torch import nn

from sharpscope.curvature import dense_hessian

from cases import AttentionClassifier, finite_difference_hessian, product_function

F64 = torch.float64


# D3: torch.func.hessian's matrix returned without the symmetry check (it is wrong, and
# not symmetric, for nn.TransformerEncoderLayer in eval mode under the math attention
# kernel). Also: with PyTorch's default kernel choice the CPU's fused attention has no
# double backward, which was a raw RuntimeError before dense_hessian chose the math kernel.
def test_eval_mode_attention_gets_the_reverse_over_reverse_hessian():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = AttentionClassifier().double().eval()
    x, y = torch.randn(6, 5, 4, dtype=F64), torch.randint(0, 3, (6,))
    H = dense_hessian(model, (x, y))  # PyTorch's default attention kernel choice
    with sdpa_kernel([SDPBackend.MATH]):
        exact = finite_difference_hessian(model, x, y)
    assert torch.equal(H, H.T) or float((H - H.T).abs().max()) <= 1e-10 * float(H.abs().max())
    torch.testing.assert_close(H, exact, rtol=0, atol=1e-7)


# D5: frozen parameters (requires_grad=False) counted in the Hessian
def test_frozen_parameters_are_left_out_of_the_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(10, 3, dtype=F64), torch.randint(0, 2, (10,))
    full = dense_hessian(model, (x, y))
    model[0].weight.requires_grad_(False)
    H = dense_hessian(model, (x, y))
    assert H.shape == (4 + 8 + 2, 4 + 8 + 2)
    torch.testing.assert_close(H, full[12:, 12:], rtol=0, atol=1e-12)


class _ProductModel(nn.Module):
    """a·b·x through ``function`` (an old-style autograd.Function of a and b)."""

    def __init__(self, function) -> None:
        super().__init__()
        self.function = function
        self.a = nn.Parameter(torch.tensor([0.5], dtype=F64))
        self.b = nn.Parameter(torch.tensor([-0.3], dtype=F64))

    def forward(self, x):
        return self.function.apply(self.a, self.b) * x


# an old-style autograd.Function gets the reverse-over-reverse Hessian (torch.func.hessian
# raised a raw RuntimeError for it); mean MSE of a·b - 0: H = 2 [[b², 2ab], [2ab, a²]]
def test_an_old_style_autograd_function_gets_the_exact_hessian():
    x, y = torch.ones(4, 1, dtype=F64), torch.zeros(4, 1, dtype=F64)
    H = dense_hessian(_ProductModel(product_function()), (x, y), "mse")
    a, b = 0.5, -0.3
    exact = torch.tensor([[2 * b * b, 4 * a * b], [4 * a * b, 2 * a * a]], dtype=F64)
    torch.testing.assert_close(H, exact, rtol=1e-14, atol=1e-14)


# D4: the symmetry check loosened from 1e-10 to 1e-2 of the largest entry: a double
# backward wrong by 0.1% must be refused in one line, not returned as the Hessian
def test_a_slightly_wrong_double_backward_is_refused():
    import pytest

    from sharpscope.errors import SharpscopeError

    skewed = product_function(a_factor=1 + 1e-3)  # ∂²/∂a∂b = 1.001, ∂²/∂b∂a = 1
    x, y = torch.ones(4, 1, dtype=F64), torch.zeros(4, 1, dtype=F64)
    with pytest.raises(SharpscopeError, match="second derivatives of this model are not symmetric"):
        dense_hessian(_ProductModel(skewed), (x, y), "mse")
