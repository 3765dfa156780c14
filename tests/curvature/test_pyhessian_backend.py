"""PyHessian's routines run faithfully on sharpscope's model and data."""

from __future__ import annotations

import copy

import pytest
import torch

from sharpscope.curvature import HessianOperator
from sharpscope.curvature.pyhessian_backend import pyhessian_top_k, pyhessian_trace
from sharpscope.errors import SharpscopeError

pytest.importorskip("pyhessian")
F64 = torch.float64


def test_top_k_and_true_residuals(cnn_case):
    model = copy.deepcopy(cnn_case.model).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    op = HessianOperator(model, cnn_case.data)
    pairs, info = pyhessian_top_k(op, k=3, seed=0)
    V, H = pairs.eigenvectors, cnn_case.H
    # PyHessian returns the next power iterate with the previous Rayleigh quotient.
    torch.testing.assert_close(pairs.eigenvalues, ((V @ H) * V).sum(1), rtol=1e-2, atol=0)
    residual = torch.linalg.vector_norm(V @ H - pairs.eigenvalues[:, None] * V, dim=1)
    torch.testing.assert_close(pairs.true_residuals, residual, rtol=1e-3, atol=1e-6)
    assert abs(float(pairs.eigenvalues[0]) / float(cnn_case.top(1)) - 1) < 1e-2
    assert info["pyhessian_hvps"] >= 3 and info["pyhessian_data_mode"] == "data"
    # PyHessian leaves the model in eval() with .grad set; the backend undoes both.
    assert model.training and all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_dataloader_mode_weights_batches_like_sharpscope(mlp_case):
    one = HessianOperator(mlp_case.model, mlp_case.data, dtype="float64")
    many = HessianOperator(mlp_case.model, mlp_case.data, dtype="float64", batch_size=25)
    a, _ = pyhessian_top_k(one, k=1, seed=3)
    b, info = pyhessian_top_k(many, k=1, seed=3)
    assert info["pyhessian_data_mode"] == "dataloader"  # batches of 25, 25, 10
    assert float(b.eigenvalues[0]) == pytest.approx(float(a.eigenvalues[0]), rel=1e-8)


def test_trace_and_the_callers_rng_is_untouched(mlp_case):
    op = HessianOperator(mlp_case.model, mlp_case.data, dtype="float64")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    est = pyhessian_trace(op, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert est.trace == pytest.approx(float(est.samples.mean()))
    assert est.num_matvecs == est.num_probes == len(est.samples)


def test_unsupported_options_are_refused(mlp_case):
    op = HessianOperator(mlp_case.model, mlp_case.data, weight_decay=0.1)
    with pytest.raises(SharpscopeError, match="weight-decay"):
        pyhessian_top_k(op, k=1)
