"""bSAM against the update rule of optimizers.md section 5, by hand and by formula."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.optim import BSAM, BatchClosure

from optim_helpers import CE, mlp, mlp_batches, params_equal

DT = torch.float64


def _linear_closure(opt, w, c):
    def closure():
        opt.zero_grad()
        loss = c @ w  # gradient c wherever it is evaluated, noise or not
        loss.backward()
        return loss

    return closure


def test_variance_update_equals_the_formula_on_a_hand_computed_example():
    w = nn.Parameter(torch.tensor([1.0, -1.0], dtype=DT))
    c = torch.tensor([0.5, -2.0], dtype=DT)
    # N = 10, delta = 20 -> delta~ = 2; gamma = 0.1; s0 = 4; alpha = 0.5
    opt = BSAM(
        [w],
        num_data=10,
        lr=0.5,
        betas=(0.9, 0.99),
        rho=0.3,
        prior_precision=20.0,
        damping=0.1,
        s_init=4.0,
        bn_policy="both",
    )
    opt.step(_linear_closure(opt, w, c))
    state = opt.base.state[w]
    # h = sqrt(4) |c| = [1, 4];  s1 = 0.99 * 4 + 0.01 (h + 2 + 0.1)
    torch.testing.assert_close(
        state["s"], torch.tensor([3.991, 4.021], dtype=DT), rtol=1e-14, atol=0
    )
    # gbar1 = 0.1 (c + 2 m0) = [0.25, -0.4];  m1 = m0 - 0.5 gbar1 / 4
    torch.testing.assert_close(
        state["exp_avg"], torch.tensor([0.25, -0.4], dtype=DT), rtol=1e-14, atol=0
    )
    torch.testing.assert_close(
        w.detach(), torch.tensor([0.96875, -0.95], dtype=DT), rtol=1e-14, atol=0
    )
    # posterior std is 1 / sqrt(N s)
    torch.testing.assert_close(
        opt.posterior_std()[0], 1 / torch.sqrt(10 * state["s"]), rtol=1e-14, atol=0
    )


def test_two_noisy_steps_on_a_quadratic_equal_the_spec_formula():
    A = torch.tensor([[2.0, 0.4, 0.0], [0.4, 1.0, -0.3], [0.0, -0.3, 0.7]], dtype=DT)
    m = torch.tensor([1.0, -0.5, 0.25], dtype=DT)
    w = nn.Parameter(m.clone())
    N, alpha, b1, b2, rho, delta, gamma = 50.0, 0.2, 0.9, 0.999, 0.05, 40.0, 0.1
    opt = BSAM(
        [w],
        num_data=50,
        lr=alpha,
        betas=(b1, b2),
        rho=rho,
        prior_precision=delta,
        damping=gamma,
        s_init=1.0,
        seed=7,
        bn_policy="both",
    )
    gen = torch.Generator().manual_seed(7)

    def closure():
        opt.zero_grad()
        loss = 0.5 * w @ A @ w
        loss.backward()
        return loss

    s, gbar = torch.ones(3, dtype=DT), torch.zeros(3, dtype=DT)
    for _ in range(2):
        opt.step(closure)
        xi = torch.randn(3, generator=gen, dtype=DT)
        theta = m + xi / torch.sqrt(N * s)
        g = A @ theta
        eps = rho * g / s
        ge = A @ (m + eps)
        h = torch.sqrt(s) * g.abs()
        gbar = b1 * gbar + (1 - b1) * (ge + delta / N * m)
        m = m - alpha * gbar / s
        s = b2 * s + (1 - b2) * (h + delta / N + gamma)
    torch.testing.assert_close(w.detach(), m, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(opt.base.state[w]["s"], s, rtol=1e-13, atol=1e-15)


def test_splits_average_the_chunks_with_fresh_noise_each():
    model = mlp(dtype=DT)
    x, y = mlp_batches(1, size=8, dtype=DT)[0]
    ref = copy.deepcopy(model)
    opt = BSAM(model, num_data=100, lr=0.1, rho=0.05, splits=2, seed=3)
    opt.step(BatchClosure(model, CE, x, y))

    gen = torch.Generator().manual_seed(3)
    params = list(ref.parameters())
    mean = [p.detach().clone() for p in params]
    sigma = [torch.full_like(p, 1 / math.sqrt(100.0)) for p in params]  # s0 = 1
    ges, hs = [], []
    for xs, ys in ((x[:4], y[:4]), (x[4:], y[4:])):
        xi = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=DT)
        xi = [t.view_as(p) for t, p in zip(xi.split([p.numel() for p in params]), params)]
        with torch.no_grad():
            for p, mu, n, sd in zip(params, mean, xi, sigma):
                p.copy_(mu + n * sd)
        g = torch.autograd.grad(CE(ref(xs), ys), params)
        hs.append([gi.abs() for gi in g])  # sqrt(s0) = 1
        with torch.no_grad():
            for p, mu, gi in zip(params, mean, g):
                p.copy_(mu + 0.05 * gi)  # eps = rho g / s0
        ges.append(torch.autograd.grad(CE(ref(xs), ys), params))
    delta = 40.0 / 100
    for p, mu, ga, gb, ha, hb, st in zip(
        model.parameters(),
        mean,
        ges[0],
        ges[1],
        hs[0],
        hs[1],
        (opt.base.state[q] for q in model.parameters()),
    ):
        gbar = 0.1 * ((ga + gb) / 2 + delta * mu)
        torch.testing.assert_close(p.detach(), mu - 0.1 * gbar, rtol=1e-12, atol=1e-14)
        s = 0.999 + 0.001 * ((ha + hb) / 2 + delta + 0.1)
        torch.testing.assert_close(st["s"], s, rtol=1e-12, atol=1e-14)


def test_predict_is_the_monte_carlo_model_average():
    model = mlp(dtype=DT)
    x, y = mlp_batches(1, size=6, dtype=DT)[0]
    opt = BSAM(model, num_data=20, lr=0.1, rho=0.05, s_init=0.5)
    opt.step(BatchClosure(model, CE, x, y))
    model.train()
    before = copy.deepcopy(model)
    rng = torch.get_rng_state()
    probs = opt.predict(model, x, num_samples=5, generator=torch.Generator().manual_seed(11))
    assert params_equal(model, before) and model.training
    assert torch.equal(torch.get_rng_state(), rng)

    gen = torch.Generator().manual_seed(11)
    sigma = opt.posterior_std()
    params = list(before.parameters())
    mean = [p.detach().clone() for p in params]
    want = torch.zeros_like(probs)
    for _ in range(5):
        xi = torch.randn(sum(p.numel() for p in params), generator=gen, dtype=DT)
        xi = [t.view_as(p) for t, p in zip(xi.split([p.numel() for p in params]), params)]
        with torch.no_grad():
            for p, mu, n, sd in zip(params, mean, xi, sigma):
                p.copy_(mu + n * sd)
            want += torch.softmax(before(x), -1) / 5
    torch.testing.assert_close(probs, want.float(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(probs.sum(-1), torch.ones(6), rtol=1e-6, atol=1e-6)
    log_probs = opt.predict(
        model, x, num_samples=5, generator=torch.Generator().manual_seed(11), log=True
    )
    torch.testing.assert_close(log_probs.exp(), probs)
    batched = opt.predict(
        model, x, num_samples=5, generator=torch.Generator().manual_seed(11), batch_size=4
    )
    torch.testing.assert_close(batched, probs)


def test_sample_swaps_in_a_draw_and_restores_the_mean_exactly():
    model = mlp()
    opt = BSAM(model, num_data=10)
    before = copy.deepcopy(model)
    with opt.sample(torch.Generator().manual_seed(0)):
        assert not params_equal(model, before)
    assert params_equal(model, before)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_data": 0}, "num_data"),
        ({"num_data": 10, "splits": 0}, "splits"),
        ({"num_data": 10, "betas": (0.9, 1.0)}, "betas"),
        ({"num_data": 10, "rho": -1.0}, "rho"),
        ({"num_data": 10, "base": torch.optim.SGD}, "standalone"),
        ({}, "bSAM needs num_data > 0"),
        ({"num_data": "a"}, "num_data must be a number"),
        ({"num_data": 10, "lr": "x"}, "lr must be a number"),
        ({"num_data": 10, "betas": 0.9}, "betas must be two numbers"),
    ],
)
def test_bad_bsam_input_gives_one_clear_error(kwargs, match):
    with pytest.raises(SharpscopeError, match=match):
        BSAM(mlp(), **kwargs)


@pytest.mark.parametrize("splits", [1, 2])
def test_a_closure_without_backward_is_one_clear_error(splits):
    """F3 (session 15): bSAM zero-filled every missing gradient and stepped on the prior
    alone; now the same line as the other two-pass variants. Weights are left as they were."""
    model = mlp()
    x, y = mlp_batches(1)[0]
    opt = BSAM(model, num_data=8, splits=splits)
    before = copy.deepcopy(model)

    def closure(*chunk):
        opt.zero_grad()
        return CE(model(x), y)  # no backward()

    with pytest.raises(SharpscopeError, match="bsam: the closure left no gradients"):
        opt.step(closure)
    assert params_equal(model, before)


def test_a_parameter_the_loss_does_not_use_still_moves_under_the_prior():
    """F3: zero-filling stays for parameters that are merely unused (the reference's rule)."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(5, 3), nn.Linear(5, 3)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    net = Net()
    x, y = mlp_batches(1)[0]
    opt = BSAM(net, num_data=8)
    before = net.unused.weight.detach().clone()
    opt.step(BatchClosure(net, CE, x, y))
    assert not torch.equal(net.unused.weight, before)


def test_a_type_error_inside_a_chunked_closure_is_the_users_own():
    """F4 (session 15): a TypeError raised in the model under splits was reported as "needs a
    closure that accepts (chunk_index, num_chunks)", although the closure was a BatchClosure."""

    class Buggy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            return self.lin(x) + len(5)  # the user's bug

    net = Buggy()
    x, y = mlp_batches(1)[0]
    opt = BSAM(net, num_data=8, splits=2)
    with pytest.raises(TypeError, match="has no len") as info:
        opt.step(BatchClosure(net, CE, x, y))
    assert not isinstance(info.value, SharpscopeError)

    def plain(chunk_index, num_chunks):
        opt.zero_grad()
        loss = CE(net(x), y)
        loss.backward()
        return loss

    with pytest.raises(TypeError, match="has no len") as info:
        opt.step(plain)
    assert not isinstance(info.value, SharpscopeError)
    model = mlp()
    opt = BSAM(model, num_data=8, splits=2)

    def no_chunks():
        opt.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(SharpscopeError, match=r"accepts \(chunk_index, num_chunks\)"):
        opt.step(no_chunks)  # a closure that really cannot take the chunk
