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


# Each scenario runs in a fresh process: once PyTorch's newer fp32_precision switches are
# set, its legacy allow_tf32 ones cannot be read in that process any more.
PRECISION_STATE = """
import sys
import torch
from sharpscope.precision import ieee_float32

backends = torch.backends
LEAVES = ("cuda.matmul", "cudnn.conv", "cudnn.rnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn")

def leaf(name):
    ns = backends
    for part in name.split("."):
        ns = getattr(ns, part)
    return ns

def state():
    out = {}
    try:
        out["matmul"] = torch.get_float32_matmul_precision()
    except RuntimeError:
        out["matmul"] = "raises"
    for name, ns in (("cudnn", backends.cudnn), ("cuda", backends.cuda.matmul)):
        try:
            out[name] = ns.allow_tf32
        except RuntimeError:
            out[name] = "raises"
    for name in LEAVES if hasattr(backends.cuda.matmul, "fp32_precision") else ():
        out[name] = leaf(name).fp32_precision
    return out

torch.manual_seed(0)
a, b = torch.randn(200, 200), torch.randn(200, 200)
reference = a @ b  # in PyTorch's default IEEE float32
exec(sys.argv[1])  # the caller's settings
before = state()
with ieee_float32():
    inside = state()
    product = a @ b
assert state() == before, (before, state())
assert inside.get("cudnn") is not True and inside.get("cuda") is not True, inside
assert all(inside[k] in ("none", "ieee") for k in LEAVES if k in inside), inside
torch.testing.assert_close(product, reference, rtol=0, atol=0)
print("ok")
"""

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")


@pytest.mark.parametrize(
    "settings",
    [
        "",
        "backends.cuda.matmul.allow_tf32 = True; backends.cudnn.allow_tf32 = False",
        "torch.set_float32_matmul_precision('medium')",
        "torch.set_float32_matmul_precision('high')",
        pytest.param(
            "backends.cuda.matmul.fp32_precision = 'tf32'",
            marks=pytest.mark.skipif(not NEW_API, reason="torch < 2.9"),
        ),
        pytest.param(
            "backends.fp32_precision = 'tf32'",
            marks=pytest.mark.skipif(not NEW_API, reason="torch < 2.9"),
        ),
        pytest.param(
            "backends.mkldnn.matmul.fp32_precision = 'bf16'",
            marks=pytest.mark.skipif(not NEW_API, reason="torch < 2.9"),
        ),
    ],
    ids=["default", "legacy", "medium", "high", "new-matmul", "new-global", "onednn-bf16"],
)
def test_ieee_float32_under_every_way_of_setting_tf32(settings):
    """precision B5 (session 31): with PyTorch's newer switches set
    (`torch.backends.cuda.matmul.fp32_precision = "tf32"`) every analysis failed with a
    RuntimeError traceback, on the CPU too; after `set_float32_matmul_precision("medium")`
    (Lightning's advice) the CPU analyses ran oneDNN's bf16 products, and afterwards
    `torch.get_float32_matmul_precision()` raised; a default process came back with
    `cuda.matmul.fp32_precision` "ieee" instead of "none". Inside: IEEE products;
    after: every setting as it was, readable as before."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", PRECISION_STATE, settings], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


class Tanh(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize(
    "analysis",
    [
        lambda model, data: landscape(model, data, 1, grid=5, seed=0).loss,
        lambda model, data: landscape(model, data, 1, grid=5, seed=0, vectorize=True).loss,
        lambda model, data: m_sharpness(model, data, m=32, rho=0.05).sharpness,
        lambda model, data: average_sharpness(model, data, rho=0.05, num_draws=2).sharpness,
        lambda model, data: top_eigenvalues(model, data, k=1).eigenvalues,
    ],
    ids=["landscape", "landscape-vmap", "msharpness", "average-sharpness", "spectrum"],
)
def test_an_analysis_inside_the_callers_autocast_is_the_one_outside(analysis):
    """precision B1 (session 31): inside a caller's `torch.autocast`, the landscape came
    out flat (every point reused autocast's cached bf16 copy of the centre's weights),
    m-sharpness ran in bf16 while its meta said float32, and the spectrum blamed the
    model's second derivatives. The analyses now turn the caller's autocast off."""
    torch.manual_seed(0)
    model = Tanh()
    data = (torch.randn(128, 10), torch.randint(0, 3, (128,)))
    outside = analysis(model, data)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(data[0])  # the caller's forward pass fills autocast's weight cache
        inside = analysis(model, data)
        assert torch.is_autocast_enabled("cpu")  # the caller's region goes on
    torch.testing.assert_close(torch.as_tensor(inside), torch.as_tensor(outside), rtol=0, atol=0)
