"""The Python API refuses arguments of the wrong type in one line of its own.

A float count reached a slice, a string radius a comparison, a huge seed torch's
generator: the user got Python's or torch's message from deep inside (acceptance
report, session 20)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sharpscope as ss
from sharpscope.errors import SharpscopeError


@pytest.fixture
def case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    return model, (torch.randn(16, 4), torch.randint(0, 3, (16,)))


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, d: ss.top_eigenvalues(m, d, k=2.0), "k must be an integer, got 2.0 (float)"),
        (lambda m, d: ss.top_eigenvalues(m, d, k=2, seed=2**70), "seed must be an integer from"),
        (lambda m, d: ss.top_eigenvalues(m, d, k=True), "k must be an integer, got True (bool)"),
        (
            lambda m, d: ss.hessian_trace(m, d, num_probes=6.0),
            "num_probes must be an integer, got 6.0 (float)",
        ),
        (
            lambda m, d: ss.spectral_density(m, d, num_lanczos_steps="9"),
            "num_lanczos_steps must be an integer, got '9' (str)",
        ),
        (lambda m, d: ss.spectrum(m, d, seed="a"), "seed must be an integer from 0 to 2^62"),
        (lambda m, d: ss.landscape(m, d, 1, grid=3, span="1"), "span must be a number, got '1'"),
        (lambda m, d: ss.landscape(m, d, 1, grid=3, chunk_size=0), "chunk_size must be >= 1"),
        (lambda m, d: ss.m_sharpness(m, d, m=8, rho="0.05"), "rho must be a number, got '0.05'"),
        (
            lambda m, d: ss.m_sharpness(m, d, m=8, rho=0.05, steps=1.0),
            "steps must be an integer, got 1.0 (float)",
        ),
        (lambda m, d: ss.load_checkpoint(3), "load_checkpoint takes a file path, got 3 (int)"),
    ],
)
def test_a_wrong_type_is_one_line_of_ours(case, call, message):
    model, data = case
    with pytest.raises(SharpscopeError) as info:
        call(model, data)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_numpy_integers_and_floats_are_accepted(case):
    np = pytest.importorskip("numpy")
    model, data = case
    result = ss.m_sharpness(model, data, m=np.int64(8), rho=np.float64(0.05), seed=np.int64(1))
    assert result.m == 8 and result.sharpness >= 0
    assert ss.top_eigenvalues(model, data, k=np.int64(2), seed=np.int64(1)).eigenvalues.shape == (
        2,
    )
