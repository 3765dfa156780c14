"""The analyses run in IEEE float32: TF32 off inside, the caller's settings restored."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.analysis.landscape import landscape
from sharpscope.analysis.measures import average_sharpness
from sharpscope.analysis.msharpness import m_sharpness
from sharpscope.analysis.spectrum import top_eigenvalues
from sharpscope.precision import ieee_float32


class FlagRecorder(nn.Module):
    """A linear classifier that records the TF32 flags its forward passes ran under."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)
        self.seen: set[tuple[bool, bool]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.add((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
        return self.linear(x)


@pytest.fixture
def tf32_on():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@pytest.mark.parametrize(
    "analysis",
    [
        lambda model, data: top_eigenvalues(model, data, k=2),
        lambda model, data: m_sharpness(model, data, m=4, rho=0.05),
        lambda model, data: average_sharpness(model, data, rho=0.05, num_draws=2),
        lambda model, data: landscape(model, data, 1, grid=3),
    ],
    ids=["spectrum", "msharpness", "average-sharpness", "landscape"],
)
def test_analyses_run_with_tf32_off_and_restore_it(tf32_on, analysis):
    torch.manual_seed(0)
    model = FlagRecorder()
    data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    analysis(model, data)
    assert model.seen == {(False, False)}
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_settings_are_restored_after_an_error(tf32_on):
    @ieee_float32()
    def fails():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fails()
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


@pytest.mark.parametrize("cudnn, matmul", [(True, False), (False, True)])
def test_each_tf32_flag_gets_its_own_setting_back(cudnn, matmul):
    """Different cudnn and matmul flags before: each is restored to its own value, not swapped."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul
    try:
        with ieee_float32():
            assert not torch.backends.cudnn.allow_tf32
            assert not torch.backends.cuda.matmul.allow_tf32
        after = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before
    assert after == (cudnn, matmul)
