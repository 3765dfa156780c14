"""SAM-ON: only normalization layers move in the ascent step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.optim import SAMON, BatchClosure, SinglePass
from sharpscope.optim.samon import normalization_parameters

from optim_helpers import CE, bn_batches, bn_net, mlp, params_equal, run, through_file


class SpyClosure(BatchClosure):
    """Records the parameters each pass sees."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []
        self.grads = []

    def __call__(self, *args):
        self.seen.append({n: p.detach().clone() for n, p in self.model.named_parameters()})
        loss = super().__call__(*args)
        self.grads.append(
            {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}
        )
        return loss


@pytest.mark.parametrize("exclude_norm", [False, True])
def test_the_ascent_moves_only_normalization_parameters(exclude_norm):
    model = bn_net()
    x, y = bn_batches(1)[0]
    opt = SAMON(model, torch.optim.SGD, rho=0.5, lr=0.1, exclude_norm=exclude_norm)
    closure = SpyClosure(model, CE, x, y)
    opt.step(closure)
    first, second = closure.seen
    norm_names = {"bn.weight", "bn.bias"}
    moved = {n for n in first if not torch.equal(first[n], second[n])}
    perturbed = (set(first) - norm_names) if exclude_norm else norm_names
    assert moved == perturbed
    eps = torch.cat([(second[n] - first[n]).reshape(-1) for n in sorted(perturbed)])
    g = torch.cat([closure.grads[0][n].reshape(-1) for n in sorted(perturbed)])
    assert eps.norm().item() == pytest.approx(0.5, rel=1e-5)  # ||eps||_N = rho
    torch.testing.assert_close(eps, 0.5 * g / g.norm(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("normalize_bias", [False, True])
def test_elementwise_form_scales_the_norm_weight_and_the_bias_only_if_asked(normalize_bias):
    """eps on (bn.weight, bn.bias) = rho t^2 g / ||t g||, t = (|gamma| + eta, 1 or |beta| + eta)."""
    model = bn_net(dtype=torch.float64)
    opt = SAMON(
        model,
        torch.optim.SGD,
        rho=0.5,
        adaptive="elementwise",
        eta=0.01,
        normalize_bias=normalize_bias,
        lr=0.1,
    )
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    eps = opt.perturbation(params, grads)
    names = [n for n, _ in model.named_parameters()]
    iw, ib = names.index("bn.weight"), names.index("bn.bias")
    bias = params[ib].detach()
    t_bias = bias.abs() + 0.01 if normalize_bias else torch.ones_like(bias)
    t = torch.cat([params[iw].detach().abs() + 0.01, t_bias])
    g = torch.cat([grads[iw], grads[ib]])
    want = 0.5 * t * t * g / (torch.linalg.norm(t * g) + 1e-12)
    torch.testing.assert_close(torch.cat([eps[iw], eps[ib]]), want, rtol=1e-13, atol=1e-15)
    assert [i for i, e in enumerate(eps) if e is not None] == [iw, ib]


def test_samon_on_a_model_without_normalization_layers_is_one_clear_error():
    with pytest.raises(SharpscopeError, match="has none") as info:
        SAMON(mlp(), torch.optim.SGD, lr=0.1)
    assert "--model-opt norm=batch" in str(info.value)  # how the registry's mlp gets some
    # and that way works: the registry's mlp with norm=batch has norm layers to perturb
    from sharpscope.registry import build_model

    SAMON(build_model({"name": "mlp", "norm": "batch"}, (8,), 3), torch.optim.SGD, lr=0.1)
    with pytest.raises(SharpscopeError, match="needs the model"):
        SAMON(bn_net().parameters(), torch.optim.SGD, lr=0.1)


def test_samon_names_norm_layers_that_have_no_parameters():
    """tvmodels doubt 4 (session 31): a network of torchvision's FrozenBatchNorm2d (scale
    and shift as buffers) was told it has no normalization layers."""

    class FrozenBatchNorm2d(nn.Module):  # torchvision's layout, without torchvision
        def __init__(self, n):
            super().__init__()
            self.register_buffer("weight", torch.ones(n))
            self.register_buffer("bias", torch.zeros(n))

        def forward(self, x):
            return x * self.weight[:, None, None] + self.bias[:, None, None]

    frozen = nn.Sequential(
        nn.Conv2d(3, 4, 3), FrozenBatchNorm2d(4), nn.BatchNorm2d(4, affine=False)
    )
    with pytest.raises(SharpscopeError) as info:
        SAMON(frozen, torch.optim.SGD, lr=0.1)
    assert "(its BatchNorm2d, FrozenBatchNorm2d has no parameters: affine=False, or a" in str(
        info.value
    )
    with pytest.raises(SharpscopeError) as info:
        SAMON(mlp(), torch.optim.SGD, lr=0.1)
    assert "no parameters" not in str(info.value)


def test_normalization_layers_are_found_by_type_not_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 8))
    model.add_module("odd", nn.GroupNorm(2, 8))
    names = [n for n, _ in normalization_parameters(model)]
    assert names == ["1.weight", "1.bias", "odd.weight", "odd.bias"]


def test_fast_first_pass_gives_the_same_step():
    a, b = bn_net(), bn_net()
    batches = bn_batches(3)
    run(SAMON(a, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9), a, batches)
    run(SAMON(b, torch.optim.SGD, rho=0.5, lr=0.1, momentum=0.9, fast_first_pass=True), b, batches)
    assert params_equal(a, b)
    assert all(p.requires_grad for p in b.parameters())


def test_sam_epochs_take_plain_base_steps_outside_the_window():
    a, b = bn_net(), bn_net()
    batches = bn_batches(4)
    opt = SAMON(a, torch.optim.SGD, rho=0.5, lr=0.1, sam_epochs=(2, 3), steps_per_epoch=2)
    sgd = SinglePass(b, torch.optim.SGD, lr=0.1)
    run(opt, a, batches[:2])
    run(sgd, b, batches[:2])
    assert params_equal(a, b)  # epoch 0, 1: outside the window (steps 0..3 -> epochs 0, 1)
    run(opt, a, batches[2:])
    run(sgd, b, batches[2:])
    assert params_equal(a, b)
    run(opt, a, batches[:2])  # epoch 2: sharpness-aware
    run(sgd, b, batches[:2])
    assert not params_equal(a, b)
    assert opt.state_dict()["variant"] == {"num_steps": 6}


def _passes_per_step(opt, model, batches):
    passes = []
    for x, y in batches:
        before = opt.gradient_passes
        opt.step(BatchClosure(model, CE, x, y))
        passes.append(opt.gradient_passes - before)
    return passes


def test_sam_epochs_window_excludes_its_end():
    """sam_epochs=(1, 2), one step per epoch: passes per step are 1, 2, 1 (epoch 2 is outside)."""
    model = bn_net()
    opt = SAMON(model, torch.optim.SGD, rho=0.5, lr=0.1, sam_epochs=(1, 2), steps_per_epoch=1)
    assert _passes_per_step(opt, model, bn_batches(3)) == [1, 2, 1]


def test_sam_epochs_window_survives_a_state_dict_round_trip():
    """Resumed after step 0, step 1 is in epoch 1 and so sharpness-aware (2 passes)."""
    model = bn_net()
    batches = bn_batches(2)

    def make():
        return SAMON(model, torch.optim.SGD, rho=0.5, lr=0.1, sam_epochs=(1, 2), steps_per_epoch=1)

    opt = make()
    assert _passes_per_step(opt, model, batches[:1]) == [1]
    resumed = make()
    resumed.load_state_dict(through_file(opt.state_dict()))
    assert _passes_per_step(resumed, model, batches[1:]) == [2]


@pytest.mark.parametrize("bad", [1, "ab", "0,5", (0, 1, 2), (1, 0), ("a", "b")])
def test_a_malformed_sam_epochs_is_one_clear_error(bad):
    # `--opt sam_epochs=1` used to end in "TypeError: 'int' object is not iterable"
    with pytest.raises(SharpscopeError, match="sam_epochs must be"):
        SAMON(bn_net(), torch.optim.SGD, lr=0.1, sam_epochs=bad, steps_per_epoch=1)


def test_frozen_or_unused_norm_layers_are_one_line_errors():
    """All norm parameters frozen: refused when built; a norm layer the forward never
    uses: the step says no perturbed parameter got a gradient."""
    torch.manual_seed(0)
    frozen = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3))
    frozen[1].requires_grad_(False)
    with pytest.raises(SharpscopeError, match="every one of them is frozen"):
        SAMON(frozen, base=torch.optim.SGD, rho=0.5, lr=0.1)

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.ln, self.b = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    model = Unused()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = SAMON(model, base=torch.optim.SGD, rho=0.5, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(SharpscopeError, match="no parameter it perturbs got a gradient"):
        opt.step(closure)


def test_parameters_without_any_norm_layer_get_the_right_message():
    """Acceptance report, session 15: the message named exclude_norm=True when it was off."""
    net = bn_net()
    outside = [
        p
        for n, p in net.named_parameters()
        if id(p) not in {id(q) for _, q in normalization_parameters(net)}
    ]
    with pytest.raises(SharpscopeError, match="none of the model's normalization parameters"):
        SAMON(net, torch.optim.SGD, params=outside, lr=0.1)


def test_a_normalization_layer_added_later_is_perturbed():
    """Its parameters joined by add_param_group were never perturbed (SAM-ON's set was
    fixed at construction)."""
    net = bn_net()
    opt = SAMON(net, torch.optim.SGD, lr=0.1)
    net.add_module("extra_norm", nn.LayerNorm(3))
    opt.add_param_group({"params": list(net.extra_norm.parameters())})
    assert id(net.extra_norm.weight) in opt._perturbed_ids
    assert (
        id(net.extra_norm.bias) in opt._perturbed_ids and id(net.extra_norm.bias) in opt._bias_ids
    )
