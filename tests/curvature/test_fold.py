"""Folding eval-mode BatchNorm into the layer before it: same function, same Hessian."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.curvature import HessianOperator
from sharpscope.curvature.fold import find_foldable_pairs, fold_batchnorm
from sharpscope.registry import build_model

from cases import PreNormOutputReused

F64 = torch.float64


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def with_running_stats(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Move the BatchNorm statistics off (0, 1) so folding has something to fold."""
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


ZOO = [
    ({"name": "cnn", "width": 2, "norm": "batch"}, (1, 8, 8), 2),
    ({"name": "resnet20", "width": 4, "norm": "batch", "shortcut": "A"}, (3, 8, 8), 19),
    ({"name": "resnet20", "width": 4, "norm": "batch", "shortcut": "B"}, (3, 8, 8), 21),
    ({"name": "cnn1d", "width": 4, "norm": "batch"}, (1, 40), 3),
    ({"name": "mlp", "width": 16, "depth": 2, "norm": "batch"}, (10,), 2),
]


@pytest.mark.parametrize("spec,shape,expected", ZOO, ids=lambda p: str(p))
def test_zoo_models_fold_to_the_same_function(spec, shape, expected):
    torch.manual_seed(0)
    x = 2 + 3 * torch.randn(16, *shape)
    model = with_running_stats(build_model(spec, shape, 10), x)
    folded, pairs = fold_batchnorm(model, x[:2])
    if expected is not None:
        assert len(pairs) == expected
    assert pairs and folded is not model
    # names, shapes and the very tensors are shared; the original is untouched
    assert [n for n, _ in folded.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(a is b for a, b in zip(folded.parameters(), model.parameters()))
    assert all(a is b for a, b in zip(folded.buffers(), model.buffers()))
    assert all("forward" not in vars(m) for m in model.modules())
    folded.eval()
    with torch.no_grad():
        assert rel(folded(x), model(x)) <= 1e-5


def test_the_fold_uses_the_batchnorm_layers_own_eps():
    """BatchNorm2d(eps=0.1) with running variances 0.01-0.2: the folded network must equal
    the eval-mode one (all zoo models use eps = 1e-5, which hides a hard-coded eps)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, eps=0.1), nn.ReLU()).eval()
    with torch.no_grad():
        net[1].running_var.uniform_(0.01, 0.2)
        net[1].running_mean.uniform_(-1, 1)
    x = torch.randn(3, 1, 5, 5)
    folded, pairs = fold_batchnorm(net, x[:2])
    assert len(pairs) == 1
    with torch.no_grad():
        assert rel(folded(x), net(x)) <= 1e-5


def test_folded_hessian_equals_the_original_in_float64():
    torch.manual_seed(0)
    x = torch.rand(40, 1, 8, 8)
    y = torch.randint(0, 10, (40,))
    model = with_running_stats(
        build_model({"name": "cnn", "width": 2, "norm": "batch"}, (1, 8, 8), 10), x
    )
    V = torch.randn(3, sum(p.numel() for p in model.parameters()), dtype=F64)
    ops = {
        fold: HessianOperator(model, (x, y), dtype="float64", fold_bn=fold, hvp_mode="reverse")
        for fold in (True, False)
    }
    assert ops[True].bn_folded == ["features.1", "features.5"] and ops[False].bn_folded == []
    assert ops[True].describe()["bn_folded"] == ["features.1", "features.5"]
    assert rel(ops[True].hvp_block(V), ops[False].hvp_block(V)) <= 1e-12
    g_fold, g_orig = ops[True].loss_and_gradient()[1], ops[False].loss_and_gradient()[1]
    assert rel(g_fold, g_orig) <= 1e-12


class InplaceBetween(nn.Module):
    """conv -> in-place ReLU -> BN: the BN input is the conv's output object, modified."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.norm = (
            nn.Conv1d(1, 3, 3),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(3),
        )
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.norm(self.act(self.conv(x))).mean(-1))


class SharedNorm(nn.Module):
    """One BN applied after two different layers: it runs twice, so it is not folded."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.norm = nn.Linear(4, 3), nn.Linear(4, 3), nn.BatchNorm1d(3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(self.norm(self.a(x)) + self.norm(self.b(x)))


class StandardizedConv1d(nn.Conv1d):
    """A conv subclass with its own forward (weight standardization): never folded."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2), keepdim=True)) / (w.std(dim=(1, 2), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


def test_unsafe_patterns_are_not_folded():
    x0 = torch.randn(8, 1, 9)
    custom = nn.Sequential(StandardizedConv1d(1, 3, 3), nn.BatchNorm1d(3))
    assert find_foldable_pairs(with_running_stats(custom, x0), x0[:2]) == []
    x1 = torch.randn(8, 1, 9)
    assert find_foldable_pairs(with_running_stats(InplaceBetween(), x1), x1[:2]) == []
    x2 = torch.randn(8, 4)
    assert find_foldable_pairs(with_running_stats(SharedNorm(), x2), x2[:2]) == []
    # a Linear on (N, L, F) puts its features last, BatchNorm1d normalizes axis 1
    seq = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    x3 = torch.randn(8, 3, 3)
    assert find_foldable_pairs(with_running_stats(seq, x3), x3[:2]) == []
    no_stats = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False))
    assert find_foldable_pairs(no_stats, x2[:2]) == []


def test_a_wrong_fold_is_caught_by_the_preflight_and_the_original_kept():
    torch.manual_seed(0)
    x = torch.randn(30, 1, 9)
    y = torch.randint(0, 2, (30,))
    model = with_running_stats(PreNormOutputReused(), x)
    assert find_foldable_pairs(model, x[:2]) == [("conv", "norm")]  # hooks cannot tell
    op = HessianOperator(model, (x, y), dtype="float64", hvp_mode="reverse")
    assert op.bn_folded == [] and op.bn_fold_rejected
    reference = HessianOperator(model, (x, y), dtype="float64", hvp_mode="reverse", fold_bn=False)
    v = torch.randn(op.dim, dtype=F64)
    assert rel(op.hvp(v), reference.hvp(v)) <= 1e-12


def test_no_folding_with_batch_statistics_or_without_the_check():
    torch.manual_seed(0)
    x = torch.rand(24, 1, 8, 8)
    y = torch.randint(0, 10, (24,))
    model = build_model({"name": "cnn", "width": 2, "norm": "batch"}, (1, 8, 8), 10).eval()
    assert HessianOperator(model, (x, y), bn_mode="batch").bn_folded == []
    assert HessianOperator(model, (x, y), check=False).bn_folded == []
    assert HessianOperator(model, (x, y)).bn_folded == ["features.1", "features.5"]


def test_a_sharp_float32_resnet_keeps_its_fold():
    """The fold's float32 rounding is compared norm-wise, not entry by entry.

    On a barely trained ResNet-20 (loss 8.6, gradient norm 173) thousands of gradient
    entries of the folded model differ from the original's by more than the pre-flight's
    element-wise 5e-5 relative; norm-wise the difference is 1.3e-4, rounding. The fold must
    be kept, and its products are those of the original model (up to float32 rounding).
    """
    torch.manual_seed(0)
    x = torch.randn(256, 3, 16, 16)
    y = torch.randint(0, 10, (256,))
    model = build_model({"name": "resnet20", "width": 16}, (3, 16, 16), 10)
    generator = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(30):
        idx = torch.randint(0, 256, (64,), generator=generator)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()
    op = HessianOperator(model, (x, y), hvp_mode="reverse")
    original = HessianOperator(model, (x, y), hvp_mode="reverse", fold_bn=False)
    assert len(op.bn_folded) == 21 and not op.bn_fold_rejected
    _, g_folded = op.loss_and_gradient()
    _, g_original = original.loss_and_gradient()
    entrywise = torch.isclose(g_folded, g_original, rtol=5e-5, atol=1e-6)
    assert int((~entrywise).sum()) > 100  # an element-wise check would have undone the fold
    assert rel(g_folded, g_original) < 1e-3
    # the same Hessian: float32 products of the folded model against float64 ones of the
    # original (in float32 either model's products can be the less accurate: 1e-6 to 3e-3
    # here, depending on the convolution kernels oneDNN picks for the thread count)
    exact = HessianOperator(model, (x, y), hvp_mode="reverse", dtype=F64, fold_bn=False)
    v = torch.randn(op.dim, dtype=F64, generator=generator)
    assert rel(op.hvp(v), exact.hvp(v)) < 1e-2


def test_finding_pairs_leaves_a_spectral_norm_model_in_train_mode_untouched():
    """Regression (acceptance report, session 15): reading ``layer.weight`` after the
    probe had restored train mode ran a spectral_norm power-iteration step, writing the
    user's ``_u``/``_v`` buffers and changing the function the Hessian was of."""
    import sharpscope as ss

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    nn.utils.parametrizations.spectral_norm(net[0])
    net = net.double().train()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert find_foldable_pairs(net, x) == [("0", "1")]
    ss.top_eigenvalues(net, (x, y), k=1)
    ss.m_sharpness(net, (x, y), 8, 0.05)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and net.training
