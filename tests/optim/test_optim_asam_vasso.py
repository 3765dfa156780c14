"""ASAM's perturbation and VaSSO's EMA against hand-computed answers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.optim import ASAM, SAM, BatchClosure, VaSSO

from optim_helpers import CE, bn_batches, bn_net, mlp, mlp_batches, params_equal, run


def _tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 2), (3,), (4,)]
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    return params, grads


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize("eta", [0.0, 0.01])
def test_asam_perturbation_is_rho_T2_g_over_norm_T_g(eta):
    params, grads = _tensors(0)
    opt = ASAM([nn.Parameter(p) for p in params], torch.optim.SGD, rho=0.7, eta=eta, lr=0.1)
    eps = opt.perturbation(list(opt.param_groups[0]["params"]), grads)
    T = torch.diag(_flat(params).abs() + eta)  # T = diag(|w| + eta)
    g = _flat(grads)
    want = 0.7 * T @ T @ g / (torch.linalg.norm(T @ g) + 1e-12)  # spec: 1e-12 guard
    torch.testing.assert_close(_flat(eps), want, rtol=1e-13, atol=1e-15)


def test_asam_from_model_scales_only_weights():
    model = nn.Sequential(
        nn.Linear(3, 2, dtype=torch.float64), nn.BatchNorm1d(2, dtype=torch.float64)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    opt = ASAM.from_model(model, torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    eps = opt.perturbation(params, grads)
    names = [n for n, _ in model.named_parameters()]
    t = torch.cat(
        [
            (p.detach().abs() + 0.01 if n.endswith("weight") else torch.ones_like(p)).reshape(-1)
            for n, p in zip(names, params)
        ]
    )
    g = _flat(grads)
    want = 0.5 * t * t * g / (torch.linalg.norm(t * g) + 1e-12)
    torch.testing.assert_close(_flat(eps), want, rtol=1e-13, atol=1e-15)
    every = ASAM.from_model(model, torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1, normalize_bias=True)
    plain = ASAM(model.parameters(), torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1)
    for a, b in zip(every.perturbation(params, grads), plain.perturbation(params, grads)):
        assert torch.equal(a, b)


def test_asam_layerwise_and_linf_forms():
    params, grads = _tensors(1)
    ps = [nn.Parameter(p) for p in params]
    layer = ASAM(ps, torch.optim.SGD, rho=0.4, eta=0.1, adaptive="layerwise", lr=0.1)
    t = torch.cat(
        [torch.full((p.numel(),), p.norm().item() + 0.1, dtype=torch.float64) for p in params]
    )
    g = _flat(grads)
    want = 0.4 * t * t * g / (torch.linalg.norm(t * g) + 1e-12)
    torch.testing.assert_close(_flat(layer.perturbation(ps, grads)), want, rtol=1e-13, atol=1e-15)
    linf = ASAM(ps, torch.optim.SGD, rho=0.4, eta=0.1, adaptive="linf", lr=0.1)
    want = 0.4 * (_flat(params).abs() + 0.1) * g.sign()
    torch.testing.assert_close(_flat(linf.perturbation(ps, grads)), want, rtol=1e-13, atol=1e-15)


def test_asam_linf_from_model_moves_biases_by_rho_sign_g():
    """l-inf form, weight-only rule: eps_W = rho (|W| + eta) sign(g), eps_b = rho sign(g)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, dtype=torch.float64)
    opt = ASAM.from_model(model, torch.optim.SGD, rho=0.4, eta=0.1, adaptive="linf", lr=0.1)
    params = list(model.parameters())
    grads = [torch.randn_like(p) for p in params]
    eps = opt.perturbation(params, grads)
    torch.testing.assert_close(eps[0], 0.4 * (params[0].detach().abs() + 0.1) * grads[0].sign())
    torch.testing.assert_close(eps[1], 0.4 * grads[1].sign())


def test_asam_weight_only_rule_reads_the_last_name_component():
    """A bias inside a module named weightnet is a bias (T = 1): eps = rho t^2 g / ||t g||."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.weightnet = nn.Linear(2, 2, dtype=torch.float64)

    model = Net()
    opt = ASAM.from_model(model, torch.optim.SGD, rho=0.5, eta=0.0, lr=0.1)
    params = list(model.parameters())
    grads = [torch.ones_like(p) for p in params]
    t = torch.cat([params[0].detach().abs().reshape(-1), torch.ones(2, dtype=torch.float64)])
    g = torch.ones(6, dtype=torch.float64)
    want = 0.5 * t * t * g / (torch.linalg.norm(t * g) + 1e-12)
    torch.testing.assert_close(_flat(opt.perturbation(params, grads)), want, rtol=1e-13, atol=1e-15)


def test_asam_step_on_a_quadratic_equals_the_closed_form():
    A = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    w0 = torch.tensor([1.0, -3.0], dtype=torch.float64)
    w = nn.Parameter(w0.clone())
    opt = ASAM([w], torch.optim.SGD, rho=0.5, eta=0.01, lr=0.1, bn_policy="both")

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    opt.step(closure)
    T = torch.diag(w0.abs() + 0.01)
    g = A @ w0
    eps = 0.5 * T @ T @ g / (torch.linalg.norm(T @ g) + 1e-12)
    torch.testing.assert_close(w.detach(), w0 - 0.1 * A @ (w0 + eps), rtol=1e-14, atol=1e-14)


def test_vasso_with_theta_one_equals_sam_bit_for_bit():
    a, b = bn_net(), bn_net()
    batches = bn_batches(4)
    run(VaSSO(a, torch.optim.SGD, rho=0.1, theta=1.0, lr=0.1, momentum=0.9), a, batches)
    run(SAM(b, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9), b, batches)
    assert params_equal(a, b)


def test_vasso_ema_matches_the_closed_form_on_a_fixed_gradient_sequence():
    # L_t(w) = c_t . w has gradient c_t wherever it is evaluated
    gen = torch.Generator().manual_seed(3)
    cs = [torch.randn(4, generator=gen, dtype=torch.float64) for _ in range(4)]
    w = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    theta, rho, lr = 0.3, 0.2, 0.1
    opt = VaSSO([w], torch.optim.SGD, rho=rho, theta=theta, lr=lr, bn_policy="both")
    d = None
    for c in cs:

        def closure(c=c):
            opt.zero_grad()
            loss = c @ w
            loss.backward()
            return loss

        opt.step(closure)
        d = c.clone() if d is None else (1 - theta) * d + theta * c
        torch.testing.assert_close(opt.state[w]["d"], d, rtol=1e-14, atol=1e-15)
    # the descent only sees c_t (linear loss), so w is the plain SGD sum
    torch.testing.assert_close(w.detach(), -lr * sum(cs), rtol=1e-14, atol=1e-15)
    # the ascent step is rho d_t / ||d_t|| (one more EMA update)
    eps = opt.perturbation([w], [cs[0]])
    d = (1 - theta) * d + theta * cs[0]
    torch.testing.assert_close(eps[0], rho * d / (d.norm() + 1e-12), rtol=1e-14, atol=1e-15)


def test_vasso_d_of_a_parameter_first_seen_later_starts_at_its_gradient():
    """b has no gradient in step 1; its d after step 2 is its first gradient c_b, not theta c_b."""
    a = nn.Parameter(torch.tensor([1.0, 2.0], dtype=torch.float64))
    b = nn.Parameter(torch.tensor([3.0], dtype=torch.float64))
    opt = VaSSO([a, b], torch.optim.SGD, rho=0.1, theta=0.3, lr=0.1, bn_policy="both")
    c_a = torch.tensor([0.5, -1.0], dtype=torch.float64)
    c_b = torch.tensor([2.0], dtype=torch.float64)

    def closure(with_b):
        opt.zero_grad()
        loss = c_a @ a + (c_b @ b if with_b else 0.0)
        loss.backward()
        return loss

    opt.step(lambda: closure(False))
    assert b.grad is None
    opt.step(lambda: closure(True))
    torch.testing.assert_close(opt.state[b]["d"], c_b, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(opt.state[a]["d"], c_a, rtol=1e-14, atol=1e-15)  # EMA of c_a, c_a


@pytest.mark.parametrize("theta", [0.0, -0.1, 1.5, "x"])
def test_vasso_theta_outside_0_1_is_one_clear_error(theta):
    with pytest.raises(SharpscopeError, match=r"theta must be"):
        VaSSO(mlp(), torch.optim.SGD, theta=theta, lr=0.1)


def test_vasso_default_perturbation_is_global():
    assert VaSSO(mlp(), lr=0.1).perturbation_mode == "global"
    assert SAM(mlp(), lr=0.1).perturbation_mode == "local"


def test_vasso_d_is_checkpointed():
    model = mlp()
    opt = VaSSO(model, torch.optim.SGD, lr=0.1)
    x, y = mlp_batches(1)[0]
    opt.step(BatchClosure(model, CE, x, y))
    state = opt.state_dict()
    assert sorted(state["variant"]["d"]) == [0, 1, 2, 3]


def test_asam_from_model_sorts_a_group_added_later_by_the_official_rule():
    """A head added for fine-tuning: its bias stays unscaled (T = 1), its weight scaled, as
    for the parameters given at construction (it was all scaled)."""
    from sharpscope.optim import ASAM

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    opt = ASAM.from_model(model, torch.optim.SGD, rho=0.5, lr=0.1)
    model.add_module("head", nn.Linear(4, 2))
    opt.add_param_group({"params": list(model.head.parameters())})
    assert id(model.head.bias) in opt._unscaled and id(model[0].bias) in opt._unscaled
    assert id(model.head.weight) not in opt._unscaled
