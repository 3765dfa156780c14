"""Second mutation audit of sharpscope.optim: factory defaults, closures, state loading,
VaSSO, ASAM/SAM-ON forms and m-SAM paths (each test kills a mutant the suite missed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.optim import (
    ASAM,
    SAM,
    SAMON,
    BatchClosure,
    VaSSO,
    batchnorm_buffers,
    build_optimizer,
    resolve_optimizer_spec,
)
from sharpscope.optim.closure import unwrap_model

from optim_helpers import CE, bn_batches, bn_net, mlp, mlp_batches, run, through_file

A = torch.tensor([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
W0 = [1.0, -2.0, 0.5]


class Quadratic(nn.Module):
    """L(w) = 1/2 w^T A w; the forward is the loss."""

    def __init__(self, w0=W0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w0, dtype=torch.float64))

    def forward(self, _x=None):
        return 0.5 * self.w @ A @ self.w


def quad_closure(opt, model, set_to_none=True):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = model()
        loss.backward()
        return loss

    return closure


# --------------------------------------------------------------------------- factory


def test_resolved_defaults_are_the_spec_defaults():
    """optimizers.md defaults per optimizer (F3, F6-F11, F22)."""
    adamw = resolve_optimizer_spec({"name": "adamw"})
    assert (adamw["lr"], adamw["betas"], adamw["eps"], adamw["weight_decay"]) == (
        1e-3,
        (0.9, 0.999),
        1e-8,
        1e-2,
    )
    adam = resolve_optimizer_spec({"name": "adam"})
    assert (adam["lr"], adam["weight_decay"]) == (1e-3, 0.0)
    sam = resolve_optimizer_spec("sam")
    assert sam["rho"] == 0.05 and sam["base"]["name"] == "sgd"
    asam = resolve_optimizer_spec("asam")
    assert (asam["rho"], asam["eta"], asam["adaptive"]) == (0.5, 0.01, "elementwise")
    vasso = resolve_optimizer_spec("vasso")
    assert (vasso["rho"], vasso["theta"], vasso["perturbation"]) == (0.05, 0.9, "global")
    samon = resolve_optimizer_spec("samon")
    assert (samon["rho"], samon["eta"], samon["adaptive"], samon["normalize_bias"]) == (
        0.5,
        0.01,
        "none",
        False,
    )
    lets = resolve_optimizer_spec("lets")
    assert (lets["rho"], lets["rho_lr"], lets["rho_min"], lets["rho_max"], lets["hypergrad"]) == (
        0.05,
        1e-4,
        0.0,
        None,
        "diag",
    )
    bsam = resolve_optimizer_spec("bsam")
    assert {k: bsam[k] for k in ("lr", "betas", "rho", "prior_precision", "damping")} == {
        "lr": 0.5,
        "betas": (0.9, 0.999),
        "rho": 0.01,
        "prior_precision": 40.0,
        "damping": 0.1,
    }
    assert (bsam["s_init"], bsam["splits"]) == (1.0, 1)


def test_defaults_reach_the_built_samon_lets_and_bsam():
    model = bn_net()
    samon = build_optimizer("samon", model, num_data=1)
    assert (samon.rho, samon.eta, samon.adaptive) == (0.5, 0.01, "none")
    lets = build_optimizer("lets", model, num_data=1, val_batches=bn_batches(1))
    assert (lets.rho_lr, lets.hypergrad, lets.rho_max) == (1e-4, "diag", None)
    adamw = build_optimizer("adamw", model, num_data=1)
    assert isinstance(adamw.base, torch.optim.AdamW)
    assert adamw.param_groups[0]["weight_decay"] == 1e-2


def test_names_are_case_insensitive():
    """F17/F18: a config saying "SAM" / "AdamW" is the same optimizer."""
    spec = resolve_optimizer_spec({"name": "SAM", "base": "AdamW"})
    assert spec["name"] == "sam" and spec["base"]["name"] == "adamw"
    opt = build_optimizer({"name": "Vasso", "base": {"name": "ADAM"}}, mlp(), num_data=1)
    assert isinstance(opt, VaSSO) and isinstance(opt.base, torch.optim.Adam)


def test_betas_given_as_a_list_resolve_to_a_tuple():
    """F12: JSON/YAML configs give lists; the canonical spec stores tuples (idempotent)."""
    spec = resolve_optimizer_spec({"name": "sam", "base": {"name": "adam", "betas": [0.8, 0.9]}})
    assert spec["base"]["betas"] == (0.8, 0.9)
    assert resolve_optimizer_spec({"name": "bsam", "betas": [0.8, 0.9]})["betas"] == (0.8, 0.9)
    assert resolve_optimizer_spec(spec) == spec


def test_plain_sgd_spec_clips_with_max_grad_norm():
    """F13: SinglePass from a spec must clip; one step w - lr * g * c/||g||."""
    model = Quadratic()
    opt = build_optimizer(
        {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "max_grad_norm": 0.5},
        model,
        num_data=1,
    )
    assert opt.max_grad_norm == 0.5
    w0 = model.w.detach().clone()
    opt.step(quad_closure(opt, model))
    g = A @ w0
    assert g.norm() > 0.5
    want = w0 - 0.1 * g * 0.5 / (g.norm() + 1e-6)  # torch's clip_grad_norm_ guard
    torch.testing.assert_close(model.w.detach(), want, rtol=1e-12, atol=1e-14)


def test_bsam_spec_gets_the_training_set_size():
    """F14: N = num_data * data_aug_factor reaches bSAM (sigma = 1/sqrt(N s0))."""
    opt = build_optimizer({"name": "bsam", "data_aug_factor": 2.0}, mlp(), num_data=50)
    assert opt.param_groups[0]["num_data"] == 100


def test_samon_spec_passes_sam_epochs_and_steps_per_epoch():
    """F15: sam_epochs=(1, 2) with one step per epoch: passes 1, 2, 1."""
    model = bn_net()
    opt = build_optimizer(
        {"name": "samon", "sam_epochs": [1, 2]}, model, num_data=10, steps_per_epoch=1
    )
    passes = []
    for batch in bn_batches(3):
        before = opt.gradient_passes
        run(opt, model, [batch])
        passes.append(opt.gradient_passes - before)
    assert passes == [1, 2, 1]


def test_asam_spec_normalize_bias_selects_the_rule():
    """F16: normalize_bias=False from a spec is ASAM.from_model's official weight-only rule."""
    x, y = bn_batches(1, dtype=torch.float64)[0]
    base = {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0}
    results = {}
    for nb in (False, True):
        a, b = bn_net(dtype=torch.float64), bn_net(dtype=torch.float64)
        opt = build_optimizer(
            {"name": "asam", "rho": 0.5, "normalize_bias": nb, "base": base}, a, num_data=1
        )
        ref = ASAM.from_model(b, torch.optim.SGD, rho=0.5, lr=0.1, normalize_bias=nb)
        run(opt, a, [(x, y)])
        run(ref, b, [(x, y)])
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
        results[nb] = [p.detach().clone() for p in a.parameters()]
    assert not all(torch.equal(p, q) for p, q in zip(results[False], results[True]))


# --------------------------------------------------------------------------- closure


def test_chunk_sizes_are_the_sizes_of_the_chunks():
    """C1: bSAM weights chunks by chunk_sizes; they must be the tensor_split sizes."""
    x, y = mlp_batches(1, size=10)[0]
    closure = BatchClosure(mlp(), CE, x, y)
    for m in (1, 3, 4, 7, 10):
        sizes = closure.chunk_sizes(m)
        assert sizes == [len(closure.chunk(j, m)[1]) for j in range(m)]
        assert sum(sizes) == 10
    assert closure.chunk_sizes(4) == [3, 3, 2, 2]


def test_bad_chunks_are_clear_errors():
    """C2/C3: an index of num_chunks or more chunks than examples is refused."""
    x, y = mlp_batches(1, size=4)[0]
    closure = BatchClosure(mlp(), CE, x, y)
    with pytest.raises(SharpscopeError, match="outside 0..1"):
        closure.chunk(2, 2)
    with pytest.raises(SharpscopeError, match="cannot split a batch of 4 examples into 5"):
        closure.chunk(0, 5)
    with pytest.raises(SharpscopeError, match="differ in length"):
        BatchClosure(mlp(), CE, x, y[:3])


def test_closure_returns_a_detached_loss_and_one_chunk_by_default():
    """C4/C8: the loss is detached; closure(0) without num_chunks is the whole batch."""
    model = mlp(dtype=torch.float64)
    x, y = mlp_batches(1, size=6, dtype=torch.float64)[0]
    closure = BatchClosure(model, CE, x, y)
    loss = closure()
    assert not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(closure(0), CE(model(x), y).detach(), rtol=0, atol=0)


def test_unwrap_model_unwraps_data_parallel():
    """C6: a DataParallel wrapper's module is found (BN layers, names)."""
    net = mlp()
    assert unwrap_model(nn.DataParallel(net)) is net
    assert unwrap_model(net) is net


# --------------------------------------------------------------------------- state loading


def _vasso(model):
    return VaSSO(model, torch.optim.SGD, rho=0.3, theta=0.5, lr=0.1)


def test_loading_a_fresh_state_drops_the_stale_vasso_d():
    """S6: loading a state with no d must forget the d the optimizer had."""
    a = Quadratic()
    opt_a = _vasso(a)
    fresh = through_file(opt_a.state_dict())
    opt_a.step(quad_closure(opt_a, a))  # builds d
    opt_a.load_state_dict(fresh)
    b = Quadratic(a.w.tolist())
    opt_b = _vasso(b)
    opt_a.step(quad_closure(opt_a, a))
    opt_b.step(quad_closure(opt_b, b))
    assert torch.equal(a.w, b.w)


def test_one_checkpoint_loaded_twice_resumes_identically_both_times():
    """S7: load_state_dict copies the tensors; stepping must not change the checkpoint."""
    model = Quadratic()
    opt = _vasso(model)
    opt.step(quad_closure(opt, model))
    ckpt = through_file(opt.state_dict())
    w1 = model.w.detach().clone()
    ends = []
    for _ in range(2):
        net = Quadratic(w1.tolist())
        resumed = _vasso(net)
        resumed.load_state_dict(ckpt)
        for _ in range(2):
            resumed.step(quad_closure(resumed, net))
        ends.append(net.w.detach().clone())
    assert torch.equal(ends[0], ends[1])


def test_bad_state_dicts_are_clear_errors():
    """S8/S9: a dict without the four keys, or state for a parameter that does not exist."""
    model = Quadratic()
    opt = _vasso(model)
    opt.step(quad_closure(opt, model))
    state = opt.state_dict()
    with pytest.raises(SharpscopeError, match=r"missing \['rho', 'rng', 'variant'\]"):
        opt.load_state_dict({"base": state["base"]})
    bad = dict(state, variant={"d": {5: torch.zeros(3, dtype=torch.float64)}})
    with pytest.raises(SharpscopeError, match="refers to parameter 5 but there are 1"):
        opt.load_state_dict(bad)


def test_vasso_rank_state_round_trip():
    """V7: under torchrun each rank's d comes back through load_rank_state."""
    a, b = Quadratic(), Quadratic()
    opt_a, opt_b = _vasso(a), _vasso(b)
    for _ in range(2):
        opt_a.step(quad_closure(opt_a, a))
    opt_b.load_rank_state(through_file(opt_a.rank_state()))
    assert torch.equal(opt_b.state[b.w]["d"], opt_a.state[a.w]["d"])


@pytest.mark.parametrize("set_to_none", [True, False])
def test_vasso_ema_is_exact_with_a_closure_that_zeroes_in_place(set_to_none):
    """V8: d must not alias .grad (zero_grad(set_to_none=False) zeroes it in place)."""
    rho, theta, lr = 0.3, 0.5, 0.1
    model = Quadratic()
    opt = VaSSO(model, torch.optim.SGD, rho=rho, theta=theta, lr=lr)
    w = torch.tensor(W0, dtype=torch.float64)
    d = None
    for _ in range(3):
        opt.step(quad_closure(opt, model, set_to_none))
        g = A @ w
        d = g if d is None else (1 - theta) * d + theta * g
        w = w - lr * A @ (w + rho * d / d.norm())
    torch.testing.assert_close(model.w.detach(), w, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- ASAM / SAM-ON


def test_asam_eta_default_and_validation():
    """A13/A11: ASAM's class default eta is 0.01 (official); a negative eta is refused."""
    w = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    g = torch.tensor([1.0, 2.0, -3.0], dtype=torch.float64)
    opt = ASAM([nn.Parameter(w.clone())], torch.optim.SGD, rho=1.0, lr=0.1)
    assert opt.eta == 0.01
    eps = opt.perturbation([w], [g])[0]
    t = w.abs() + 0.01
    torch.testing.assert_close(eps, t * t * g / ((t * g).norm() + 1e-12), rtol=1e-14, atol=0)
    for make in (
        lambda: ASAM(mlp(), torch.optim.SGD, eta=-0.1, lr=0.1),
        lambda: SAMON(bn_net(), torch.optim.SGD, adaptive="elementwise", eta=-0.1, lr=0.1),
    ):
        with pytest.raises(SharpscopeError, match="eta must be a finite number >= 0"):
            make()


def _samon_eps(adaptive, **kwargs):
    model = bn_net(dtype=torch.float64)
    x, y = bn_batches(1, dtype=torch.float64)[0]
    opt = SAMON(model, torch.optim.SGD, rho=0.4, adaptive=adaptive, eta=0.1, lr=0.1, **kwargs)
    CE(model(x), y).backward()
    params = opt._all_params()
    eps = opt.perturbation(params, [p.grad for p in params])
    return model, dict(zip([id(p) for p in params], eps))


def test_samon_linf_and_layerwise_leave_the_bias_unscaled():
    """O9: without normalize_bias, the bias has T = 1 in every adaptive form."""
    model, eps = _samon_eps("linf")
    gw, gb = model.bn.weight.grad, model.bn.bias.grad
    t_w = model.bn.weight.detach().abs() + 0.1
    torch.testing.assert_close(eps[id(model.bn.weight)], 0.4 * t_w * gw.sign(), rtol=0, atol=0)
    torch.testing.assert_close(eps[id(model.bn.bias)], 0.4 * gb.sign(), rtol=0, atol=0)
    model, eps = _samon_eps("layerwise")
    gw, gb = model.bn.weight.grad, model.bn.bias.grad
    tw = model.bn.weight.detach().norm() + 0.1
    norm = torch.cat([tw * gw, gb]).norm() + 1e-12
    torch.testing.assert_close(
        eps[id(model.bn.weight)], 0.4 * tw * tw * gw / norm, rtol=1e-13, atol=0
    )
    torch.testing.assert_close(eps[id(model.bn.bias)], 0.4 * gb / norm, rtol=1e-13, atol=0)


def test_samon_sam_epochs_must_be_ordered():
    """O10: (start, end) with start > end is refused."""
    with pytest.raises(SharpscopeError, match="0 <= start <= end"):
        SAMON(bn_net(), torch.optim.SGD, lr=0.1, sam_epochs=(2, 1), steps_per_epoch=1)


# --------------------------------------------------------------------------- m-SAM


def test_m_sharpness_bn_policy_both_equals_the_plain_step_for_one_group():
    """MS8/MS9: with m >= B (one group) and bn_policy='both', m-SAM's BN statistics are
    the two-pass step's: pass 2 continues from pass 1 (num_batches_tracked + 2)."""
    x, y = bn_batches(1, size=12, dtype=torch.float64)[0]
    a, b = bn_net(dtype=torch.float64), bn_net(dtype=torch.float64)
    SAM(a, torch.optim.SGD, rho=0.1, lr=0.1, bn_policy="both").step(BatchClosure(a, CE, x, y))
    SAM(b, torch.optim.SGD, rho=0.1, lr=0.1, bn_policy="both", m=12).step(BatchClosure(b, CE, x, y))
    assert int(a.bn.num_batches_tracked) == 2
    for p, q in zip(batchnorm_buffers(a), batchnorm_buffers(b)):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_m_sharpness_linf_asam_vmap_equals_the_group_loop(monkeypatch):
    """P3: sign() of the vmapped (batched) gradients in the l-infinity form."""
    import sharpscope.optim.msam as msam

    x, y = mlp_batches(1, size=12, dtype=torch.float64)[0]
    a, b = mlp(dtype=torch.float64), mlp(dtype=torch.float64)

    def make(net):
        return ASAM.from_model(net, torch.optim.SGD, rho=0.05, adaptive="linf", lr=0.1, m=5)

    make(a).step(BatchClosure(a, CE, x, y))
    monkeypatch.setattr(msam, "_vectorizable", lambda module, dtype: False)
    make(b).step(BatchClosure(b, CE, x, y))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------- second batch


def test_constructor_defaults_are_the_spec_defaults():
    """R33-R36: the classes' own defaults (used without the factory)."""
    assert SAM(mlp(), torch.optim.SGD, lr=0.1).rho == 0.05
    vasso = VaSSO(mlp(), torch.optim.SGD, lr=0.1)
    assert (vasso.rho, vasso.theta) == (0.05, 0.9)
    asam = ASAM(mlp(), torch.optim.SGD, lr=0.1)
    assert (asam.rho, asam.eta, asam.adaptive) == (0.5, 0.01, "elementwise")
    samon = SAMON(bn_net(), torch.optim.SGD, lr=0.1)
    assert (samon.rho, samon.eta, samon.adaptive) == (0.5, 0.01, "none")


def test_lets_spec_passes_the_inner_options():
    """R8: {"inner": "asam", "eta": ..., "adaptive": ...} reaches the inner ASAM."""
    opt = build_optimizer(
        {"name": "lets", "inner": "asam", "eta": 0.2, "adaptive": "layerwise"},
        bn_net(),
        num_data=1,
        val_batches=bn_batches(1),
    )
    assert isinstance(opt.inner, ASAM)
    assert (opt.inner.eta, opt.inner.adaptive) == (0.2, "layerwise")


def test_asam_from_a_spec_with_a_plain_closure_freezes_batchnorm():
    """R30: from_model passes the model on, so a plain closure needs no model= and pass 2
    leaves the running statistics alone (bn_policy='first')."""
    import warnings

    model = bn_net()
    opt = build_optimizer({"name": "asam", "lr": 0.1}, model, num_data=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(opt, model, bn_batches(1), plain=True)
    assert int(model.bn.num_batches_tracked) == 1


def test_bsam_rank_state_round_trip_restores_the_noise_stream():
    """R1: each rank's generator comes back through load_rank_state. As under torchrun,
    this rank loads another rank's state_dict (its generator differs), then its own part."""
    a, b = mlp(), mlp()
    batches = mlp_batches(3)
    opt_a = build_optimizer({"name": "bsam", "lr": 0.1}, a, num_data=10)
    other = build_optimizer({"name": "bsam", "lr": 0.1, "seed": 7}, mlp(), num_data=10)
    opt_b = build_optimizer({"name": "bsam", "lr": 0.1, "seed": 7}, b, num_data=10)
    run(opt_a, a, batches[:1])
    state = through_file(opt_a.state_dict())
    state["rng"] = other.state_dict()["rng"]  # rank 0's generator
    opt_b.load_state_dict(state)
    opt_b.load_rank_state(through_file(opt_a.rank_state()))
    with torch.no_grad():
        for p, q in zip(a.parameters(), b.parameters()):
            q.copy_(p)
    run(opt_a, a, batches[1:])
    run(opt_b, b, batches[1:])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_lets_rank_state_round_trip_restores_v_and_the_inner_d():
    """R2/R3: LETS' v and its inner VaSSO's d come back through load_rank_state."""
    spec = {"name": "lets", "inner": "vasso", "rho_lr": 0.5, "base": {"name": "sgd", "lr": 0.1}}
    a, b = bn_net(), bn_net()
    opt_a = build_optimizer(spec, a, num_data=1, val_batches=bn_batches(2, seed=4))
    opt_b = build_optimizer(spec, b, num_data=1, val_batches=bn_batches(2, seed=4))
    run(opt_a, a, bn_batches(2))
    opt_b.load_rank_state(through_file(opt_a.rank_state()))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(opt_b.state[q]["v"], opt_a.state[p]["v"])
        assert torch.equal(opt_b.inner.state[q]["d"], opt_a.inner.state[p]["d"])


# --------------------------------------------------------------------------- third batch


def test_base_dict_without_a_name_is_sgd():
    """Q4: {"base": {"lr": 0.2}} means the default base, SGD."""
    spec = resolve_optimizer_spec({"name": "sam", "base": {"lr": 0.2}})
    assert spec["base"]["name"] == "sgd" and spec["base"]["lr"] == 0.2
    assert spec["base"]["momentum"] == 0.9


def test_step_metrics_are_logged_only_for_lets():
    """Q8: per-step logging has LETS' learned values; a fixed rho is not repeated."""
    from sharpscope.optim.factory import step_metrics

    model = bn_net()
    assert step_metrics(build_optimizer("sam", model, num_data=1)) == {}
    assert step_metrics(build_optimizer("sgd", model, num_data=1)) == {}
    lets = build_optimizer("lets", model, num_data=1, val_batches=bn_batches(1))
    run(lets, model, bn_batches(1))
    assert step_metrics(lets) == lets.metrics() != {}


def test_lets_state_dict_rho_is_a_snapshot():
    """Q7: a state_dict kept in memory (best checkpoint) does not follow later rho updates."""
    model = bn_net()
    opt = build_optimizer(
        {"name": "lets", "rho_lr": 0.5}, model, num_data=1, val_batches=bn_batches(2, seed=4)
    )
    run(opt, model, bn_batches(2))
    state = opt.state_dict()
    saved = state["rho"].clone()
    run(opt, model, bn_batches(2, seed=3))
    assert opt.state_dict()["rho"] != saved  # rho moved
    assert torch.equal(state["rho"], saved)


def test_m_sharpness_leaves_frozen_parameters_alone():
    """Q1: a parameter with requires_grad=False is neither perturbed nor stepped."""
    model = mlp(dtype=torch.float64)
    model.fc1.weight.requires_grad_(False)
    frozen = model.fc1.weight.detach().clone()
    x, y = mlp_batches(1, size=12, dtype=torch.float64)[0]
    opt = SAM(model, torch.optim.SGD, rho=0.1, lr=0.1, m=4)
    opt.step(BatchClosure(model, CE, x, y))
    assert torch.equal(model.fc1.weight, frozen)
    assert model.fc1.weight.grad is None


def test_m_sharpness_with_rho_zero_is_the_base_step_in_one_pass():
    """Q3: rho = 0 skips the m-SAM passes too (one pass, exactly plain SGD)."""
    x, y = bn_batches(1, size=12)[0]
    a, b = bn_net(), bn_net()
    opt = SAM(a, torch.optim.SGD, rho=0.0, lr=0.1, m=4)
    opt.step(BatchClosure(a, CE, x, y))
    ref = torch.optim.SGD(b.parameters(), lr=0.1)
    ref.zero_grad()
    CE(b(x), y).backward()
    ref.step()
    assert opt.gradient_passes == 1
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": None}, "unknown optimizer None"),
        (["sam"], "an optimizer spec is a dict with a 'name'"),
        (5, "an optimizer spec is a dict with a 'name'"),
        ({"rho": 0.1}, "an optimizer spec is a dict with a 'name'"),
        ({"name": "sam", "base": 3}, "'base' must be a name or a dict"),
    ],
)
def test_malformed_specs_are_one_clear_error(spec, match):
    """U9-U11: malformed configs give a SharpscopeError, not a TypeError/AttributeError."""
    with pytest.raises(SharpscopeError, match=match):
        resolve_optimizer_spec(spec)


def test_sparse_gradients_are_one_clear_error():
    """U3: an Embedding(sparse=True) is refused with a hint, not a foreach crash."""
    model = nn.Sequential(nn.Embedding(5, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2))
    x, y = torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1])
    opt = SAM(model, torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(SharpscopeError, match="sparse=False"):
        opt.step(BatchClosure(model, CE, x, y))


def test_samon_exclude_norm_on_a_norm_only_model_is_one_clear_error():
    """U5: nothing to perturb is refused at construction."""
    with pytest.raises(SharpscopeError, match="exclude_norm=True found no parameter"):
        SAMON(nn.LayerNorm(4), torch.optim.SGD, lr=0.1, exclude_norm=True)


def test_samon_fast_first_pass_is_refused_under_ddp(tmp_path):
    """U6: fast_first_pass toggles requires_grad, which DDP does not allow."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        ddp = nn.parallel.DistributedDataParallel(bn_net())
        with pytest.raises(SharpscopeError, match="leave fast_first_pass off under DDP"):
            SAMON(ddp, torch.optim.SGD, lr=0.1, fast_first_pass=True)
        SAMON(ddp, torch.optim.SGD, lr=0.1)  # without it DDP is fine
    finally:
        dist.destroy_process_group()


def test_vasso_keeps_the_ema_of_old_parameters_when_a_new_one_appears():
    """W1: a parameter first seen at step 2 starts at its gradient; the others keep
    d = (1 - theta) d_1 + theta g_2 (not reset to g_2)."""
    model = Quadratic()
    extra = nn.Parameter(torch.tensor([0.5, -1.0], dtype=torch.float64))
    c = torch.tensor([2.0, 3.0], dtype=torch.float64)
    opt = VaSSO([model.w, extra], torch.optim.SGD, rho=0.3, theta=0.25, lr=0.1, model=model)
    g1 = A @ model.w.detach()
    opt.step(quad_closure(opt, model))
    assert extra.grad is None and "d" not in opt.state[extra]
    g2 = A @ model.w.detach()

    def closure():
        opt.zero_grad()
        loss = model() + c @ extra
        loss.backward()
        return loss

    opt.step(closure)
    torch.testing.assert_close(opt.state[model.w]["d"], 0.75 * g1 + 0.25 * g2, rtol=1e-14, atol=0)
    assert torch.equal(opt.state[extra]["d"], c)


def test_lets_rho_of_another_shape_is_refused_on_load():
    """W12: a per-group checkpoint does not load into a global-rho LETS."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    val = mlp_batches(1)
    from sharpscope.optim import LETS

    def groups():
        return [{"params": m.parameters()} for m in (model[0], model[2])]

    kwargs = {"lr": 0.1, "val_batches": val, "model": model}
    per_group = LETS(groups(), torch.optim.SGD, per_group=True, **kwargs)
    single = LETS(groups(), torch.optim.SGD, **kwargs)
    with pytest.raises(SharpscopeError, match="per_group must match"):
        single.load_state_dict(per_group.state_dict())


def test_option_tables_are_copies():
    """X3/X4: editing a returned options dict (e.g. to fill CLI flags) leaves the defaults."""
    from sharpscope.optim import base_options, optimizer_options

    base_options("sgd")["lr"] = 5.0
    optimizer_options("bsam")["lr"] = 5.0
    assert base_options("sgd")["lr"] == 0.1
    assert resolve_optimizer_spec("sam")["base"]["lr"] == 0.1
    assert resolve_optimizer_spec("bsam")["lr"] == 0.5


def test_optimizer_options_name_the_chosen_base():
    """X2: the flat option list says which base its base options belong to."""
    from sharpscope.optim import optimizer_options

    opts = optimizer_options("vasso", base="adamw")
    assert opts["base"] == "adamw" and opts["weight_decay"] == 1e-2


def test_asam_refuses_the_none_form():
    """X6: ASAM without scaling is SAM; ASAM accepts only its adaptive forms."""
    with pytest.raises(SharpscopeError, match="adaptive must be one of elementwise"):
        ASAM(mlp(), torch.optim.SGD, lr=0.1, adaptive="none")


def test_a_user_model_with_a_child_called_module_is_not_unwrapped():
    """X8: only DDP-like wrappers (with no_sync) or DataParallel are unwrapped."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.bn = nn.BatchNorm1d(2)

    net = Wrapper()
    assert unwrap_model(net) is net
    assert batchnorm_buffers(net) == [
        net.bn.running_mean,
        net.bn.running_var,
        net.bn.num_batches_tracked,
    ]


def test_a_state_of_another_model_is_one_clear_error():
    """torch's raw ValueError (another number of parameters) became a SharpscopeError."""
    from sharpscope.optim.factory import build_optimizer

    small, large = (
        torch.nn.Linear(3, 2),
        torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)),
    )
    saved = build_optimizer({"name": "sam", "lr": 0.1}, small, num_data=8).state_dict()
    target = build_optimizer({"name": "sam", "lr": 0.1}, large, num_data=8)
    with pytest.raises(SharpscopeError, match="cannot load this SAM state: .*same spec and model"):
        target.load_state_dict(saved)


def _stepped(opt, model):
    torch.manual_seed(0)
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    opt.step(BatchClosure(model, nn.functional.mse_loss, x, y))
    return opt


def _sgd(model, momentum=0.9):
    return SAM(model, torch.optim.SGD, lr=0.1, momentum=momentum)


def _adam(model):
    return SAM(model, torch.optim.Adam, lr=0.1)


def _bsam(model):
    from sharpscope.optim import BSAM

    return BSAM(model, num_data=4)


#: target, source, entries replacing the source's state (None: the source takes no step), match
STATE_MISMATCHES = {
    # torch's KeyError 'step' (Adam reads the step count of each parameter's state)
    "sgd-into-adam": (_adam, _sgd, {}, r"than Adam \(no 'step'\)"),
    # no parameter state: torch loads it, the groups lack Adam's options
    "fresh-sgd-into-adam": (_adam, lambda m: SAM(m, lr=0.1), None, r"than Adam \(no 'betas'"),
    # loaded silently, then SGD's step failed on group["momentum"]
    "adam-into-sgd": (lambda m: _sgd(m, 0.0), _adam, {}, r"than SGD \(no 'dampening', 'momentum'"),
    # the message was clear, but the base had been replaced by SGD's groups already
    "sam-into-bsam": (_bsam, _sgd, {}, "no bSAM generator state"),
    # VaSSO's d was dropped before the bad index was found
    "bad-vasso-d": (
        lambda m: VaSSO(m, torch.optim.SGD, lr=0.1, theta=0.5),
        _sgd,
        {"variant": {"d": {0: torch.zeros(1, 2), 5: torch.zeros(1)}}},
        "refers to parameter 5 but there are 2",
    ),
}


def _same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b


@pytest.mark.parametrize("case", sorted(STATE_MISMATCHES))
def test_a_state_of_another_base_is_one_line_and_leaves_the_optimizer_as_it_was(case):
    """F5 (session 15): every part of a state is checked before any is loaded, and the
    base's KeyError or missing options are one line."""
    make_target, make_source, override, match = STATE_MISMATCHES[case]
    model = nn.Linear(2, 1)
    source = make_source(model)
    if override is not None:
        _stepped(source, model)
    state = {**source.state_dict(), **(override or {})}
    # unnamed, as states were written before they named their optimizer: else a SAM state
    # into bSAM or VaSSO stops at that name (test_optim_state_owner.py) before these checks
    del state["optimizer"]
    opt = _stepped(make_target(model), model)
    groups, before = opt.param_groups, through_file(opt.state_dict())
    with pytest.raises(SharpscopeError, match=match) as info:
        opt.load_state_dict(state)
    assert "\n" not in str(info.value)
    assert opt.param_groups is groups and opt.base.param_groups is groups
    assert _same(through_file(opt.state_dict()), before)
    _stepped(opt, model)  # still usable


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda s: s["state"][0].update(momentum_buffer=torch.zeros(3)),
            r"its momentum_buffer has shape \(3,\), its parameter \(2, 2\)",
        ),
        (
            lambda s: s["param_groups"][0].update(lr="0.1"),
            r"lr must be a number, got '0.1' \(str\)",
        ),
    ],
    ids=["state shape", "string lr"],
)
def test_a_base_state_that_would_fail_at_the_next_step_is_refused_and_undone(edit, message):
    """A hand-edited state loaded and failed at the next step, as a traceback; it is now
    refused in load_state_dict, with the optimizer left as it was (session 26)."""
    import copy

    model = nn.Linear(2, 2)
    opt = _stepped(_sgd(model), model)
    saved = copy.deepcopy(opt.state_dict())
    edit(saved["base"])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(SharpscopeError, match=rf"^cannot load this SAM state: {message}; load it"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["base"]["param_groups"] == before["base"]["param_groups"]
    assert torch.equal(
        after["base"]["state"][0]["momentum_buffer"], before["base"]["state"][0]["momentum_buffer"]
    )
