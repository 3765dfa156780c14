"""SAM and the shared two-pass machinery against exact answers."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.optim import (
    ASAM,
    BSAM,
    LETS,
    SAM,
    SAMON,
    BatchClosure,
    VaSSO,
    batchnorm_buffers,
)

from optim_helpers import (
    CE,
    bn_batches,
    bn_net,
    mlp,
    mlp_batches,
    norm_mlp,
    params_equal,
    plain_closure,
)

A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)


class Quadratic(nn.Module):
    """L(w) = 1/2 w^T A w as a "model" whose forward is the loss."""

    def __init__(self, w0):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w0, dtype=torch.float64).clone())

    def forward(self, _x=None):
        return 0.5 * self.w @ A @ self.w


def quad_closure(opt, model):
    def closure():
        opt.zero_grad()
        loss = model()
        loss.backward()
        return loss

    return closure


def sam_closed_form(w, rho, lr):
    g = A @ w
    return w - lr * A @ (w + rho * g / g.norm())


def test_one_sam_step_on_a_quadratic_equals_the_closed_form():
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    model = Quadratic(w0)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, bn_policy="both")
    loss = opt.step(quad_closure(opt, model))
    assert loss.item() == pytest.approx((0.5 * w0 @ A @ w0).item())
    torch.testing.assert_close(
        model.w.detach(), sam_closed_form(w0, 0.3, 0.1), rtol=1e-14, atol=1e-14
    )


def test_two_sam_steps_with_momentum_equal_the_closed_form():
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    model = Quadratic(w0)
    opt = SAM(model, torch.optim.SGD, rho=0.2, lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.step(quad_closure(opt, model))
    w, buf = w0.clone(), None
    for _ in range(2):
        g = A @ w
        gt = A @ (w + 0.2 * g / g.norm())
        buf = gt if buf is None else 0.9 * buf + gt
        w = w - 0.05 * buf
    torch.testing.assert_close(model.w.detach(), w, rtol=1e-14, atol=1e-14)


def test_weight_decay_enters_the_descent_but_not_the_ascent():
    """SGD weight decay: w1 = w0 - lr (A(w0 + rho g/||g||) + wd w0) with g = A w0, no wd w in g."""
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    model = Quadratic(w0)
    opt = SAM(model, torch.optim.SGD, rho=0.3, lr=0.1, weight_decay=0.2)
    opt.step(quad_closure(opt, model))
    g = A @ w0  # the data-loss gradient only
    want = w0 - 0.1 * (A @ (w0 + 0.3 * g / g.norm()) + 0.2 * w0)  # coupled, at the restored w
    torch.testing.assert_close(model.w.detach(), want, rtol=1e-14, atol=1e-14)


def test_zero_gradient_gives_zero_perturbation_not_nan():
    model = Quadratic(torch.zeros(3))
    opt = SAM(model, torch.optim.SGD, rho=0.5, lr=0.1)
    opt.step(quad_closure(opt, model))
    assert torch.equal(model.w.detach(), torch.zeros(3, dtype=torch.float64))


def test_max_grad_norm_clips_the_perturbed_gradient():
    w0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    model = Quadratic(w0)
    opt = SAM(model, torch.optim.SGD, rho=0.3, lr=0.1, max_grad_norm=0.5)
    opt.step(quad_closure(opt, model))
    g = A @ w0
    gt = A @ (w0 + 0.3 * g / g.norm())
    gt = gt * min(1.0, 0.5 / (gt.norm().item() + 1e-6))  # torch's clip_grad_norm_ rule
    torch.testing.assert_close(model.w.detach(), w0 - 0.1 * gt, rtol=1e-12, atol=1e-12)


def test_weights_are_restored_by_copy_not_subtraction():
    # rho huge relative to w: w + eps - eps != w in floating point, a copy is exact
    model = mlp()
    ref = copy.deepcopy(model)
    x, y = mlp_batches(1)[0]
    opt = SAM(model, torch.optim.SGD, rho=1e6, lr=0.0)
    opt.step(BatchClosure(model, CE, x, y))
    assert params_equal(model, ref)


class MaskRecorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 3)
        self.masks = []

    def forward(self, x):
        mask = torch.rand_like(x) > 0.5
        self.masks.append(mask)
        return self.lin(x * mask)


@pytest.mark.parametrize("same_noise", [True, False])
def test_same_noise_reuses_the_dropout_masks_of_pass_one(same_noise):
    torch.manual_seed(0)
    model = MaskRecorder()
    x, y = mlp_batches(1)[0]
    opt = SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, same_noise=same_noise)
    state = torch.get_rng_state()
    opt.step(BatchClosure(model, CE, x, y))
    assert len(model.masks) == 2
    assert torch.equal(model.masks[0], model.masks[1]) == same_noise
    torch.set_rng_state(state)
    assert torch.equal(torch.rand_like(x) > 0.5, model.masks[0])


# --------------------------------------------------------------------------- m-sharpness


def _per_group_reference(model, make, x, y, m, lr):
    """Loop over groups of m (last group smaller) with deep copies: the definition."""
    size = len(y)
    starts = list(range(0, size, m))
    grads, buffers, weights = [], [], []
    for s in starts:
        xs, ys = x[s : s + m], y[s : s + m]
        local = copy.deepcopy(model)
        params = list(local.parameters())
        loss = CE(local(xs), ys)
        g = torch.autograd.grad(loss, params)
        buffers.append([b.clone() for b in batchnorm_buffers(local)])
        eps = make(local, lr=lr).perturbation(params, list(g))  # the variant's rule
        with torch.no_grad():
            for p, e in zip(params, eps):
                if e is not None:
                    p.add_(e)
        loss2 = CE(local(xs), ys)
        grads.append(torch.autograd.grad(loss2, params))
        weights.append(len(ys) / size)
    mean = [sum(w * g[i] for w, g in zip(weights, grads)) for i in range(len(grads[0]))]
    with torch.no_grad():
        new = [p - lr * g for p, g in zip(model.parameters(), mean)]
    bn = []
    for i, b in enumerate(batchnorm_buffers(model)):
        if b.is_floating_point():
            bn.append(sum(w * bufs[i] for w, bufs in zip(weights, buffers)))
        else:
            bn.append(b + 1)
    return new, bn


@pytest.mark.parametrize("variant", ["sam", "asam", "samon"])
@pytest.mark.parametrize("m", [4, 5])
def test_m_sharpness_equals_a_loop_over_groups(variant, m):
    model = bn_net(dtype=torch.float64)
    x, y = bn_batches(1, size=12, dtype=torch.float64)[0]
    make = {
        "sam": lambda net, **kw: SAM(net, torch.optim.SGD, rho=0.1, **kw),
        "asam": lambda net, **kw: ASAM.from_model(net, torch.optim.SGD, rho=0.5, **kw),
        "samon": lambda net, **kw: SAMON(
            net, torch.optim.SGD, rho=0.5, adaptive="elementwise", **kw
        ),
    }[variant]
    want_params, want_bn = _per_group_reference(model, make, x, y, m, 0.1)
    opt = make(model, lr=0.1, m=m)
    loss = opt.step(BatchClosure(model, CE, x, y))
    assert loss.shape == ()
    for got, want in zip(model.parameters(), want_params):
        torch.testing.assert_close(got.detach(), want, rtol=1e-10, atol=1e-12)
    for got, want in zip(batchnorm_buffers(model), want_bn):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_m_sharpness_returns_the_loss_of_the_whole_batch():
    """Groups of 5, 5 and 2 weighted by size: the returned loss is CE over all 12 examples."""
    model = mlp(dtype=torch.float64)
    x, y = mlp_batches(1, size=12, dtype=torch.float64)[0]
    want = CE(model(x), y).detach()
    loss = SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, m=5).step(BatchClosure(model, CE, x, y))
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("same_noise", [True, False])
def test_m_sharpness_same_noise_reuses_each_groups_dropout_masks(monkeypatch, same_noise):
    """Group loop, m=4 on 8 examples: pass 2 of group k sees pass 1's mask of group k."""
    import sharpscope.optim.msam as msam

    monkeypatch.setattr(msam, "_vectorizable", lambda module, dtype: False)  # masks per group
    torch.manual_seed(0)
    model = MaskRecorder()
    x, y = mlp_batches(1)[0]
    opt = SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, m=4, same_noise=same_noise)
    opt.step(BatchClosure(model, CE, x, y))
    assert len(model.masks) == 5  # 2 groups x 2 passes, then the used-parameter check
    first, second = model.masks[:2], model.masks[2:4]
    assert not torch.equal(first[0], first[1])  # each group draws its own mask
    assert [torch.equal(a, b) for a, b in zip(first, second)] == [same_noise] * 2


def test_m_sharpness_needs_a_batch_closure_and_a_stateless_variant():
    model = mlp()
    x, y = mlp_batches(1)[0]
    opt = SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, m=4)
    with pytest.raises(SharpscopeError, match="BatchClosure"):
        opt.step(lambda: CE(model(x), y))
    with pytest.raises(SharpscopeError, match="not by vasso"):
        VaSSO(model, torch.optim.SGD, lr=0.1, m=4)
    with pytest.raises(SharpscopeError, match="global"):
        SAM(model, torch.optim.SGD, lr=0.1, m=4, perturbation="global")


# --------------------------------------------------------------------------- precision


def test_bf16_autocast_step_equals_the_manual_two_pass_step():
    model = mlp()
    ref = copy.deepcopy(model)
    x, y = mlp_batches(1)[0]
    opt = SAM(model, torch.optim.SGD, rho=0.1, lr=0.1)
    opt.step(BatchClosure(model, CE, x, y, autocast_dtype=torch.bfloat16))

    params = list(ref.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CE(ref(x), y)
    g = torch.autograd.grad(loss, params)
    norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))
    with torch.no_grad():
        for p, t in zip(params, g):
            p.add_(t * (0.1 / (norm + 1e-12)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = CE(ref(x), y)
    gt = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, t, q in zip(params, gt, mlp().parameters()):
            p.copy_(q - 0.1 * t)
    for got, want in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def _scaler(scale=2.0**8):
    return torch.amp.GradScaler("cpu", init_scale=scale)


@pytest.mark.parametrize("name", ["sam", "vasso", "bsam", "lets"])
def test_a_grad_scaler_gives_the_unscaled_step_exactly(name):
    from optim_helpers import build

    a, b = mlp(), mlp()
    val = mlp_batches(2, seed=9)
    spec = {"name": name, "lr": 0.1, "rho": 0.05}
    if name == "lets":
        spec["rho_lr"] = 0.5
    opt_a = build(spec, a, val=val)
    opt_b = build(spec, b, val=val)
    scaler = _scaler()
    for x, y in mlp_batches(3):
        opt_a.step(BatchClosure(a, CE, x, y, scaler=scaler))
        opt_b.step(BatchClosure(b, CE, x, y))
    assert params_equal(a, b)
    assert scaler.get_scale() == 2.0**8  # no overflow, no growth yet


@pytest.mark.parametrize("bad_call", [1, 2])
def test_an_overflow_in_either_pass_skips_the_step_and_backs_off(bad_call):
    model = mlp()
    ref = copy.deepcopy(model)
    x, y = mlp_batches(1)[0]
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        loss = CE(out, target)
        return loss * float("inf") if len(calls) == bad_call else loss

    opt = SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    scaler = _scaler()
    opt.step(BatchClosure(model, loss_fn, x, y, scaler=scaler))
    assert params_equal(model, ref)
    assert opt.base.state == {} or all("momentum_buffer" not in s for s in opt.base.state.values())
    assert scaler.get_scale() == 2.0**7


# --------------------------------------------------------------------------- misc


def test_negative_rho_is_one_clear_error():
    with pytest.raises(SharpscopeError, match="rho must be a finite number >= 0"):
        SAM(mlp(), torch.optim.SGD, rho=-0.1, lr=0.1)


def test_a_base_instance_instead_of_a_class_is_refused():
    model = mlp()
    with pytest.raises(SharpscopeError, match="Optimizer class") as info:
        SAM(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert "\n" not in str(info.value) and "an instance of SGD" in str(info.value)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: SAM([], lr=0.1), "params must be the model or an iterable"),
        (lambda m: SAM(torch.zeros(2), lr=0.1), "params must be the model or an iterable"),
        (lambda m: SAM(m, lr=0.1, m="x"), "m must be a positive integer"),
        (lambda m: SAM(m, lr=0.1, max_grad_norm="a"), "max_grad_norm must be > 0 or None"),
        (
            lambda m: SAM(m, lr=-1.0),
            r"^the base optimizer SGD refused its options: Invalid learning rate: -1\.0$",
        ),
    ],
)
def test_bad_constructor_arguments_are_one_line(make, match):
    with pytest.raises(SharpscopeError, match=match) as info:
        make(mlp())
    assert "\n" not in str(info.value)


def test_adam_betas_of_the_wrong_length_are_one_line_when_the_optimizer_is_built():
    """F1 (session 15): three betas failed only at the first step, inside torch's Adam."""
    for betas in ((0.9, 0.99, 0.5), (0.9,), 0.9, (0.9, 1.0)):
        with pytest.raises(SharpscopeError, match=r"betas must be two numbers in \[0, 1\)"):
            SAM(mlp(), torch.optim.Adam, lr=0.1, betas=betas)

    class Lion(torch.optim.Optimizer):  # a base sharpscope does not know, indexing its betas
        def __init__(self, params, lr=1e-4, betas=(0.9, 0.99)):
            if not 0.0 <= betas[1] < 1.0:
                raise ValueError(f"invalid beta2 {betas[1]}")
            super().__init__(params, {"lr": lr, "betas": betas})

    with pytest.raises(
        SharpscopeError,
        match="the base optimizer Lion refused its options: tuple index out of range",
    ) as info:
        SAM(mlp(), Lion, betas=(0.9,))  # torch-style check: IndexError
    assert "\n" not in str(info.value)


def _norm_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))


GROUP_VARIANTS = {
    "sam": lambda groups, model: SAM(groups, torch.optim.SGD, lr=0.1, model=model),
    "asam": lambda groups, model: ASAM(groups, torch.optim.SGD, lr=0.1, model=model),
    "vasso": lambda groups, model: VaSSO(groups, torch.optim.SGD, lr=0.1, model=model),
    "samon": lambda groups, model: SAMON(model, torch.optim.SGD, params=groups, lr=0.1),
    "lets": lambda groups, model: LETS(
        groups, torch.optim.SGD, lr=0.1, model=model, val_batches=mlp_batches(1)
    ),
    "bsam": lambda groups, model: BSAM(groups, num_data=8, model=model),
}


@pytest.mark.parametrize("name", sorted(GROUP_VARIANTS))
def test_a_per_group_rho_is_refused_not_ignored(name):
    """F2 (session 15): davda54/sam reads group["rho"]; sharpscope perturbed every group with
    the optimizer's rho and kept the key silently. Base options stay per group."""
    make = GROUP_VARIANTS[name]
    model = _norm_model()
    first, rest = list(model[0].parameters()), list(model[1:].parameters())
    for key, value in (("rho", 0.0), ("adaptive", True)):
        with pytest.raises(SharpscopeError, match=f"per-group {key} is not supported") as info:
            make([{"params": first, key: value}, {"params": rest}], model)
        assert "\n" not in str(info.value)
    opt = make([{"params": first, "lr": 0.2}, {"params": rest}], model)
    assert [group["lr"] for group in opt.param_groups] == [0.2, 0.5 if name == "bsam" else 0.1]
    extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(SharpscopeError, match="per-group rho is not supported"):
        opt.add_param_group({"params": [extra], "rho": 0.5})
    assert len(opt.param_groups) == len(opt.base.param_groups) == 2


@pytest.mark.parametrize(
    ("make", "key"),
    [
        (lambda g: ASAM(g, torch.optim.SGD, lr=0.1), "eta"),
        (lambda g: VaSSO(g, torch.optim.SGD, lr=0.1), "theta"),
        (lambda g: LETS(g, torch.optim.SGD, lr=0.1, val_batches=mlp_batches(1)), "theta"),
        (lambda g: BSAM(g, num_data=8), "splits"),
    ],
)
def test_a_per_group_variant_option_is_refused(make, key):
    """F2: eta, theta, ... hold for the whole optimizer; in a group they were ignored."""
    with pytest.raises(SharpscopeError, match=f"per-group {key} is not supported"):
        make([{"params": mlp().parameters(), key: 0.5}])


def test_a_closure_without_backward_is_one_clear_error():
    model = mlp()
    opt = SAM(model, lr=0.1)
    x, _ = mlp_batches(1)[0]
    with pytest.raises(SharpscopeError, match="the closure left no gradients"):
        opt.step(lambda: model(x).sum())


def test_a_closure_that_needs_an_argument_is_one_clear_error():
    """F4 (session 15): opt.step(lambda batch: ...) was torch's raw TypeError."""
    model = mlp()
    x, y = mlp_batches(1)[0]
    for opt in (SAM(model, lr=0.1), SAM(model, lr=0.1, rho=0.0), BSAM(model, num_data=8)):
        with pytest.raises(SharpscopeError, match="the closure must take no arguments") as info:
            opt.step(lambda batch: CE(model(batch[0]), batch[1]))
        assert "\n" not in str(info.value)
        step = plain_closure(opt, model, x, y)
        opt.step(lambda *args, step=step: step())  # *args binds: fine


def test_step_without_closure_is_refused():
    with pytest.raises(SharpscopeError, match="closure"):
        SAM(mlp(), lr=0.1).step()


def test_unknown_model_warns_once_about_batchnorm():
    model = bn_net()
    x, y = bn_batches(1)[0]
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="BatchNorm"):
        opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)  # only once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model).step(
            BatchClosure(model, CE, x, y)
        )


NETS = {
    "batchnorm": (bn_net, bn_batches, {}),
    "layernorm": (norm_mlp, mlp_batches, {"norm": "layer"}),
    "groupnorm": (norm_mlp, mlp_batches, {"norm": "group"}),
}


@pytest.mark.parametrize("net", sorted(NETS))
def test_m_sharpness_group_loop_equals_vmap(monkeypatch, net):
    """fp64: the group loop gives vmap's step (on buffer-free norm nets it raised StopIteration)."""
    import sharpscope.optim.msam as msam

    make, batches, options = NETS[net]
    x, y = batches(1, size=12, dtype=torch.float64)[0]
    a, b = make(dtype=torch.float64, **options), make(dtype=torch.float64, **options)
    SAM(a, torch.optim.SGD, rho=0.1, lr=0.1, m=5).step(BatchClosure(a, CE, x, y))
    monkeypatch.setattr(msam, "_vectorizable", lambda module, dtype: False)
    SAM(b, torch.optim.SGD, rho=0.1, lr=0.1, m=5).step(BatchClosure(b, CE, x, y))
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_m_sharpness_with_bf16_autocast_and_batchnorm_runs_group_by_group():
    x, y = bn_batches(1, size=12)[0]
    a, b = bn_net(), bn_net()
    SAM(a, torch.optim.SGD, rho=0.1, lr=0.1, m=4).step(BatchClosure(a, CE, x, y))
    SAM(b, torch.optim.SGD, rho=0.1, lr=0.1, m=4).step(
        BatchClosure(b, CE, x, y, autocast_dtype=torch.bfloat16)
    )
    # bf16 rounding (8 bits of mantissa) only
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-2)
    assert int(b.bn.num_batches_tracked) == 1


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_m_sharpness_with_bf16_autocast_and_a_buffer_free_norm_layer(norm):
    """Regression: bf16 + LayerNorm/GroupNorm without buffers crashed the group loop (StopIteration)."""
    x, y = mlp_batches(1, size=12)[0]
    a, b = norm_mlp(norm=norm), norm_mlp(norm=norm)
    assert not list(b.buffers())
    SAM(a, torch.optim.SGD, rho=0.1, lr=0.1, m=4).step(BatchClosure(a, CE, x, y))
    SAM(b, torch.optim.SGD, rho=0.1, lr=0.1, m=4).step(
        BatchClosure(b, CE, x, y, autocast_dtype=torch.bfloat16)
    )
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr": "fast"}, "lr must be a number, got 'fast'"),
        ({"lr": 0.1, "momentum": True}, "momentum must be a number, got True"),
        ({"lr": 0.1, "weight_decay": [5e-4]}, r"weight_decay must be a number, got \[0.0005\]"),
    ],
)
def test_base_options_that_are_not_numbers_are_named(options, message):
    """A TOML typo (lr = "fast") named as such, not as torch's '<' between str and float."""
    with pytest.raises(SharpscopeError, match=message):
        SAM(mlp().parameters(), base=torch.optim.SGD, rho=0.05, **options)
    opt = SAM(mlp().parameters(), base=torch.optim.SGD, rho=0.05, lr=torch.tensor(0.1))
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1)  # torch allows a tensor lr


@pytest.mark.parametrize("variant", [SAM, ASAM, VaSSO])
def test_a_closure_without_zero_grad_gives_the_same_steps(variant):
    """The davda54/sam habit: the closure only runs forward and backward. Each pass must
    still see its own gradient (they were summed onto the previous pass's, silently)."""
    runs = []
    for zeroes in (True, False):
        model = mlp(dtype=torch.float64)
        opt = variant(model.parameters(), base=torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        for x, y in mlp_batches(3, dtype=torch.float64):

            def closure(x=x, y=y, zeroes=zeroes, opt=opt, model=model):
                if zeroes:
                    opt.zero_grad()
                loss = CE(model(x), y)
                loss.backward()
                return loss

            opt.step(closure)
        runs.append([p.detach().clone() for p in model.parameters()])
    for with_zero, without in zip(*runs):
        assert torch.equal(with_zero, without)


@pytest.mark.parametrize("cls", [SAM, ASAM])
def test_float16_parameters_never_get_a_nan_perturbation(cls):
    """optimizers.md section 0: eps = 0 when the gradient is 0 (1e-12 rounds to 0 in float16),
    and a tiny gradient (||g|| < rho / 65504) still gives a finite eps."""
    w = nn.Parameter(torch.ones(3, dtype=torch.float16))
    opt = cls([w], torch.optim.SGD, lr=0.1, bn_policy="both")
    assert opt.perturbation([w], [torch.zeros(3, dtype=torch.float16)])[0].tolist() == [0, 0, 0]
    tiny = torch.tensor([1e-7, 0.0, 0.0], dtype=torch.float16)
    eps = opt.perturbation([w], [tiny])[0]
    assert torch.isfinite(eps).all() and float(eps[0]) > 0 and eps[1:].tolist() == [0, 0]


def test_a_float16_gradient_beside_float32_ones_has_a_finite_norm():
    """The widening to float32 looks at every tensor, not only the first (a float16 norm
    above 65504 was inf and the perturbation silently 0)."""
    from sharpscope.optim._ops import global_norm

    grads = [torch.ones(2), torch.full((4,), 60000.0, dtype=torch.float16)]
    assert float(global_norm(grads)) == pytest.approx((2 + 4 * 60000.0**2) ** 0.5, rel=1e-3)


def test_m_sharpness_leaves_parameters_without_a_gradient_alone():
    """A layer the loss does not use keeps grad None under m (as in the plain step), so weight
    decay and momentum do not move it: m = batch size equals plain SAM."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.used(x)

    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=generator), torch.randn(8, 2, generator=generator)
    weights = {}
    for m in (None, 4, 8):
        torch.manual_seed(0)
        net = Net()
        opt = SAM(net, torch.optim.SGD, rho=0.05, m=m, lr=0.1, momentum=0.9, weight_decay=5e-4)
        before = net.unused.weight.detach().clone()
        for _ in range(2):
            opt.step(BatchClosure(net, nn.functional.mse_loss, x, y))
        assert torch.equal(net.unused.weight, before) and net.unused.weight.grad is None
        weights[m] = net.used.weight.detach().clone()
    torch.testing.assert_close(weights[8], weights[None], rtol=1e-6, atol=1e-7)


def test_m_sharpness_refuses_a_last_group_of_one_example_under_batchnorm():
    """Batch 7 with m = 3 leaves a group of one: one clear error, not torch's ValueError."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    opt = SAM(net, torch.optim.SGD, rho=0.05, m=3, lr=0.1)
    x, y = torch.randn(7, 3), torch.randint(0, 2, (7,))
    with pytest.raises(SharpscopeError, match="one example alone"):
        opt.step(BatchClosure(net, CE, x, y))
    opt.step(BatchClosure(net, CE, x[:6], y[:6]))  # groups of 3 and 3: fine
    single = SAM(net, torch.optim.SGD, rho=0.05, m=1, lr=0.1)  # every group is one example
    with pytest.raises(SharpscopeError, match="one example alone"):
        single.step(BatchClosure(net, CE, x[:6], y[:6]))


def test_m_sharpness_trains_a_branch_the_first_examples_do_not_take():
    """Which parameters the loss uses is probed on two examples once; a branch only other
    examples take still gets its gradient (it never trained)."""

    class Routed(nn.Module):
        def __init__(self):
            super().__init__()
            self.left, self.right = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.left(x) if bool(x[0, 0] > 0) else self.right(x)

    torch.manual_seed(0)
    net = Routed()
    opt = SAM(net, torch.optim.SGD, rho=0.05, m=2, lr=0.1)
    x = torch.tensor([[1.0, 0.5], [1.0, -0.5], [-1.0, 0.5], [-1.0, -0.5]])
    y = torch.tensor([0, 1, 1, 0])
    before = net.right.weight.detach().clone()
    # vmap cannot follow the branch: the groups run one after another, as the next step's,
    # and it is said once (tvmodels doubt 2, session 31: torchvision's StochasticDepth)
    with pytest.warns(RuntimeWarning, match="vmap cannot follow this model") as said:
        opt.step(BatchClosure(net, CE, x, y))  # the probe sees the first two: the left branch
        opt.step(BatchClosure(net, CE, x.flip(0), y.flip(0)))
    assert len([w for w in said if "vmap cannot follow" in str(w.message)]) == 1
    assert not torch.equal(net.right.weight, before)


def test_a_closure_that_returns_loss_and_logits_is_one_line():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt = SAM(model.parameters(), base=torch.optim.SGD, rho=0.05, lr=0.1)

    def closure():
        opt.zero_grad()
        out = model(x)
        loss = nn.functional.cross_entropy(out, y)
        loss.backward()
        return loss, out

    with pytest.raises(SharpscopeError, match="closure returned a tuple; return the loss alone"):
        opt.step(closure)


def test_a_tensor_listed_twice_in_one_group_is_refused():
    """A tied weight given through both modules would be perturbed twice (torch only warns)."""
    emb, head = nn.Embedding(5, 3), nn.Linear(3, 5, bias=False)
    head.weight = emb.weight
    with pytest.raises(SharpscopeError, match="lists the same tensor .* twice"):
        SAM(list(emb.parameters()) + list(head.parameters()), base=torch.optim.SGD, lr=0.1)


def test_a_number_the_parameters_dtype_cannot_hold_is_one_line():
    """Regression (acceptance report, session 15): rho = 1e39 with float32 weights
    overflowed in the first step (RuntimeError); float64 weights hold it."""
    for options in ({"rho": 1e39}, {"lr": 1e39}, {"lr": 0.1, "weight_decay": -1e39}):
        with pytest.raises(SharpscopeError, match="larger than the parameters' float32"):
            SAM(nn.Linear(2, 1), torch.optim.SGD, **{"lr": 0.1, **options})
    SAM(nn.Linear(2, 1).double(), torch.optim.SGD, rho=1e39, lr=0.1)


def test_a_decorated_closure_that_supplies_its_argument_steps():
    """Review, session 15: a signature check followed functools.wraps to the inner
    function and refused a closure that works; the call itself decides now."""
    import functools

    net = nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))

    def supplies_batch(fn):
        @functools.wraps(fn)
        def wrapper():
            return fn((x, y))

        return wrapper

    @supplies_batch
    def closure(batch):
        loss = nn.functional.cross_entropy(net(batch[0]), batch[1])
        loss.backward()
        return loss

    SAM(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=net).step(closure)


def test_adam_betas_as_a_tensor_or_an_array_are_accepted_as_torch_takes_them():
    """Review, session 15: the new betas check refused them ('must be two numbers')."""
    import numpy as np

    for betas in (torch.tensor([0.9, 0.999]), np.array([0.9, 0.999])):
        opt = SAM(nn.Linear(3, 2).parameters(), torch.optim.Adam, rho=0.05, betas=betas)
        assert [float(b) for b in opt.param_groups[0]["betas"]] == pytest.approx([0.9, 0.999])


@pytest.mark.parametrize(
    "base",
    [None, {}, {"state": {}, "param_groups": "x"}, {"state": [], "param_groups": [{}]}],
    ids=["none", "empty", "groups not a list", "state not a dict"],
)
def test_a_malformed_base_state_is_one_line_and_changes_nothing(base):
    """Review, session 15: AttributeError/TypeError tracebacks, or 'a different base
    optimizer' for an empty part."""
    opt = SAM(nn.Linear(3, 2).parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    state = opt.state_dict()
    before = copy.deepcopy(state)
    with pytest.raises(SharpscopeError, match="its base part is not an optimizer state"):
        opt.load_state_dict({**state, "base": base})
    assert str(opt.state_dict()) == str(before)


def test_another_variants_state_is_refused_not_half_loaded():
    """Review, session 15: VaSSO took a LETS state and dropped its own d silently."""
    from sharpscope.optim import LETS, VaSSO

    net = nn.Linear(3, 2)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    closure = BatchClosure(net, nn.functional.cross_entropy, x, y)
    vasso = VaSSO(net.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=net)
    vasso.step(closure)
    lets = LETS(
        net.parameters(),
        torch.optim.SGD,
        rho=0.05,
        lr=0.1,
        model=net,
        loss_fn=nn.functional.cross_entropy,
        val_batches=[(x, y)],
    )
    lets.step(closure)
    before = str(vasso.state_dict())
    with pytest.raises(SharpscopeError, match="written by the lets optimizer, not by vasso"):
        vasso.load_state_dict(lets.state_dict())
    assert str(vasso.state_dict()) == before

    def unnamed(state):  # as written before states named their optimizer
        return {k: v for k, v in state.items() if k != "optimizer"}

    with pytest.raises(SharpscopeError, match="VaSSO keeps no 'inner', 'v', 'val_count'"):
        vasso.load_state_dict(unnamed(lets.state_dict()))
    assert str(vasso.state_dict()) == before
    with pytest.raises(SharpscopeError, match="LETS keeps no 'd'"):
        lets.load_state_dict(unnamed(vasso.state_dict()))


def test_code_ported_from_davda54_finds_base_optimizer_and_a_pointer_for_two_steps():
    model = torch.nn.Linear(2, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    assert opt.base_optimizer is opt.base
    for name in ("first_step", "second_step"):
        with pytest.raises(
            SharpscopeError, match=r"no first_step/second_step .* opt.step\(closure\)"
        ):
            getattr(opt, name)(zero_grad=True)


def test_batch_closure_arguments_in_another_order_are_one_line():
    """Python API acceptance, session 21: BatchClosure(model, X, Y, loss) failed inside at
    len(loss) with "object of type 'function' has no len()"."""
    model = mlp()
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    with pytest.raises(SharpscopeError) as info:
        BatchClosure(model, x, y, torch.nn.functional.cross_entropy)
    assert str(info.value) == (
        "BatchClosure takes (model, loss_fn, inputs, targets), got "
        f"({type(model).__name__}, Tensor, ...)"
    )
    with pytest.raises(SharpscopeError, match="the order is \\(model, loss_fn, inputs, targets"):
        BatchClosure(model, torch.nn.functional.cross_entropy, 3, y)


@pytest.mark.parametrize("dtype", ["bf16", torch.float64, torch.int8, torch.float8_e4m3fn])
def test_batch_closure_refuses_another_autocast_dtype_in_one_line(dtype):
    """Doubt 5 (session 31): "bf16" failed at the first step with torch's raw TypeError, and
    float64 or int8 were taken, then torch warned and ran without autocast."""
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(SharpscopeError) as info:
        BatchClosure(mlp(), CE, x, y, autocast_dtype=dtype)
    assert str(info.value) == (
        f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {dtype!r}"
    )
    for fine in (None, torch.bfloat16, torch.float16):
        assert BatchClosure(mlp(), CE, x, y, autocast_dtype=fine).autocast_dtype == fine


def test_batch_closure_refuses_a_scaler_that_is_no_grad_scaler_in_one_line():
    """Doubt 5 (session 31): scaler="yes" failed with an AttributeError."""
    x, y = torch.randn(4, 5), torch.randint(0, 3, (4,))
    with pytest.raises(SharpscopeError) as info:
        BatchClosure(mlp(), CE, x, y, scaler="yes")
    assert str(info.value) == (
        "scaler must be a torch.amp.GradScaler or None, got a str (no scale, unscale_, step, "
        "update, get_scale, is_enabled)"
    )
    scaler = torch.amp.GradScaler("cpu")
    assert BatchClosure(mlp(), CE, x, y, scaler=scaler).scaler is scaler
    # the optimizer's own scaler= (for plain closures) too: it failed at the first step
    with pytest.raises(SharpscopeError, match="scaler must be a torch.amp.GradScaler or None"):
        SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, scaler="yes")
    assert SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, scaler=scaler).scaler is scaler
