"""LETS: the hypergradient against closed forms on a quadratic train/validation problem."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.optim import ASAM, LETS, SAM, BatchClosure, optimizer_metrics

from optim_helpers import CE, bn_batches, bn_net, params_equal, run, through_file

DT = torch.float64
A_TR = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, 0.2], [0.0, 0.2, 0.5]], dtype=DT)
A_VAL = torch.tensor([[1.0, 0.0, 0.4], [0.0, 3.0, 0.0], [0.4, 0.0, 1.5]], dtype=DT)
W0 = torch.tensor([1.0, -1.0, 2.0], dtype=DT)
CENTER_TR = torch.tensor([0.5, 0.2, -0.3], dtype=DT)
CENTER_VAL = torch.tensor([-0.4, 0.6, 0.1], dtype=DT)
RHO, ETA, BETA = 0.3, 0.1, 0.2


class Shift(nn.Module):
    """Output w - c per example; with quad_loss, L_B(w) = mean 1/2 (w - c)^T A_y (w - c)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(W0.clone())

    def forward(self, c):
        return self.w - c


def quad_loss(out, y):
    mats = torch.stack([A_TR, A_VAL])[y]
    return 0.5 * torch.einsum("ni,nij,nj->n", out, mats, out).mean()


TRAIN = (CENTER_TR[None], torch.tensor([0]))
VAL = [(CENTER_VAL[None], torch.tensor([1]))]


def losses(w):
    l_tr = 0.5 * (w - CENTER_TR) @ A_TR @ (w - CENTER_TR)
    l_val = 0.5 * (w - CENTER_VAL) @ A_VAL @ (w - CENTER_VAL)
    return l_tr, l_val, A_TR @ (w - CENTER_TR), A_VAL @ (w - CENTER_VAL)


def first_step(rho):
    """w2(rho) after one LETS/SAM step with plain SGD from W0, and what it used."""
    g1 = A_TR @ (W0 - CENTER_TR)
    u1 = g1 / (g1.norm() + 1e-12)
    g_tilde = A_TR @ (W0 + rho * u1 - CENTER_TR)
    return W0 - ETA * g_tilde, u1, g_tilde


def F(rho):
    l_tr, l_val, _, _ = losses(first_step(rho)[0])
    return 0.5 * (l_val - l_tr) ** 2


def lets_on_shift(hypergrad, **kwargs):
    """LETS with plain SGD on the Shift model; kwargs override rho, rho_lr, lr, val_batches."""
    model = Shift()
    options = dict(rho=RHO, rho_lr=BETA, lr=ETA, val_batches=VAL, bn_policy="both")
    opt = LETS(model, torch.optim.SGD, hypergrad=hypergrad, **{**options, **kwargs})
    return model, opt


def two_lets_steps(hypergrad, **kwargs):
    model, opt = lets_on_shift(hypergrad, **kwargs)
    for _ in range(2):
        opt.step(BatchClosure(model, quad_loss, *TRAIN))
    return model, opt


def closed_form_h(v1):
    w2, _, _ = first_step(RHO)
    l_tr, l_val, g_tr, g_val = losses(w2)
    return -(l_val - l_tr) * (g_val - g_tr) @ v1


def test_hvp_hypergradient_is_the_exact_derivative_of_F():
    _, opt = two_lets_steps("hvp")
    _, u1, _ = first_step(RHO)
    h = closed_form_h(ETA * A_TR @ u1)
    assert float(opt.last_h) == pytest.approx(h.item(), rel=1e-12)
    delta = 1e-5
    numeric = (F(RHO + delta) - F(RHO - delta)) / (2 * delta)
    assert float(opt.last_h) == pytest.approx(numeric.item(), rel=1e-6)
    assert opt.rho == pytest.approx(RHO - BETA * h.item(), rel=1e-12)


def test_diag_and_identity_hypergradients_equal_their_closed_forms():
    _, u1, g_tilde = first_step(RHO)
    _, opt = two_lets_steps("diag")
    assert float(opt.last_h) == pytest.approx(
        closed_form_h(ETA * g_tilde**2 * u1).item(), rel=1e-12
    )
    _, opt = two_lets_steps("identity")
    assert float(opt.last_h) == pytest.approx(closed_form_h(ETA * u1).item(), rel=1e-12)


def test_fd_hypergradient_approximates_the_hvp_one():
    _, hvp = two_lets_steps("hvp")
    _, fd = two_lets_steps("fd", fd_step=1e-4)
    assert float(fd.last_h) == pytest.approx(float(hvp.last_h), rel=1e-7)


@pytest.mark.parametrize("hypergrad", ["hvp", "diag"])
def test_rho_moves_in_the_direction_that_reduces_the_gap(hypergrad):
    _, opt = two_lets_steps(hypergrad)
    new_rho = opt.rho
    assert new_rho != RHO
    # F as a function of the radius of step 1: the update went downhill
    assert F(new_rho) < F(RHO)
    assert (new_rho - RHO) * (F(RHO + 1e-6) - F(RHO - 1e-6)) < 0
    metrics = optimizer_metrics(opt)
    assert metrics["hypergrad"] == hypergrad and metrics["rho"] == pytest.approx(new_rho)
    l_tr, l_val, _, _ = losses(first_step(RHO)[0])
    assert metrics["lets_F"] == pytest.approx((0.5 * (l_val - l_tr) ** 2).item(), rel=1e-12)


def test_adam_coefficient_enters_v():
    model = Shift()
    opt = LETS(
        model,
        torch.optim.Adam,
        rho=RHO,
        rho_lr=BETA,
        hypergrad="hvp",
        lr=ETA,
        val_batches=VAL,
        bn_policy="both",
    )
    opt.step(BatchClosure(model, quad_loss, *TRAIN))
    _, u1, g_tilde = first_step(RHO)
    # Adam's first step: coefficient lr (1 - b1) / ((1 - b1)(sqrt(v_hat) + eps)), v_hat = g~^2
    want = ETA / (g_tilde.abs() + 1e-8) * (A_TR @ u1)
    torch.testing.assert_close(opt.state[model.w]["v"], want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    ("sgd_options", "coefficient"),
    [({"momentum": 0.9}, ETA), ({"momentum": 0.9, "nesterov": True}, ETA * 1.9)],
    ids=["momentum", "nesterov"],
)
def test_sgd_momentum_coefficient_enters_v(sgd_options, coefficient):
    """First SGD step: v = P A u1 with P = lr under momentum and lr (1 + mu) under Nesterov."""
    model, opt = lets_on_shift("hvp", rho_lr=0.0, **sgd_options)
    opt.step(BatchClosure(model, quad_loss, *TRAIN))
    _, u1, _ = first_step(RHO)
    torch.testing.assert_close(
        opt.state[model.w]["v"], coefficient * (A_TR @ u1), rtol=1e-12, atol=1e-15
    )


def test_sgd_dampening_enters_v_after_the_first_step():
    """Second SGD step with dampening 0.5: the current gradient's coefficient is lr (1 - 0.5)."""
    model, opt = lets_on_shift("hvp", rho_lr=0.0, momentum=0.9, dampening=0.5)
    opt.step(BatchClosure(model, quad_loss, *TRAIN))
    g = A_TR @ (model.w.detach() - CENTER_TR)
    u2 = g / (g.norm() + 1e-12)
    opt.step(BatchClosure(model, quad_loss, *TRAIN))
    want = ETA * 0.5 * (A_TR @ u2)
    torch.testing.assert_close(opt.state[model.w]["v"], want, rtol=1e-12, atol=1e-15)


def quartic_loss(out, y):
    """1/4 sum (w - c)^4: gradient z^3 and Hessian diag(3 z^2) with z = w - c."""
    return 0.25 * (out**4).sum(-1).mean()


def test_hvp_is_taken_at_the_perturbed_point():
    """Quartic loss (Hessian not constant): v1 = lr H(w0 + rho u1) u1 = lr 3 (z + rho u1)^2 u1."""
    model, opt = lets_on_shift("hvp", rho_lr=0.0)
    opt.step(BatchClosure(model, quartic_loss, *TRAIN))
    z = W0 - CENTER_TR
    u1 = z**3 / ((z**3).norm() + 1e-12)
    want = ETA * 3 * (z + RHO * u1) ** 2 * u1
    torch.testing.assert_close(opt.state[model.w]["v"], want, rtol=1e-12, atol=1e-15)


def test_rho_is_clamped_to_rho_max():
    """h < 0 here, so rho would grow to 0.3 - 0.2 h = 0.64; rho_max = 0.35 caps it exactly."""
    _, opt = two_lets_steps("hvp", rho_max=0.35)
    assert float(opt.last_h) < 0
    assert opt.rho == 0.35


def test_rho_is_clamped_to_rho_min():
    """h = +7e-3 at this validation centre, so rho_lr = 100 would give 0.3 - 0.7 < 0 = rho_min."""
    val = [(torch.tensor([[0.6, -0.5, 1.5]], dtype=DT), torch.tensor([1]))]
    _, opt = two_lets_steps("hvp", rho_lr=100.0, val_batches=val)
    assert float(opt.last_h) > 0
    assert opt.rho == 0.0


def test_per_group_rho_updates_each_group_with_its_own_hypergradient():
    class TwoPart(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(W0[:2].clone())
            self.b = nn.Parameter(W0[2:].clone())

        def forward(self, c):
            return torch.cat([self.a, self.b]) - c

    model = TwoPart()
    opt = LETS(
        [{"params": [model.a]}, {"params": [model.b]}],
        torch.optim.SGD,
        rho=RHO,
        rho_lr=BETA,
        hypergrad="diag",
        per_group=True,
        lr=ETA,
        val_batches=VAL,
        model=model,
        bn_policy="both",
    )
    for _ in range(2):
        opt.step(BatchClosure(model, quad_loss, *TRAIN))
    w2, u1, g_tilde = first_step(RHO)
    l_tr, l_val, g_tr, g_val = losses(w2)
    v = ETA * g_tilde**2 * u1
    prods = (g_val - g_tr) * v
    h = torch.stack([-(l_val - l_tr) * prods[:2].sum(), -(l_val - l_tr) * prods[2:].sum()])
    torch.testing.assert_close(
        torch.tensor(opt.rho_values(), dtype=DT), RHO - BETA * h, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("same_noise", [True, False])
@pytest.mark.parametrize("inner", ["sam", "asam"])
def test_rho_lr_zero_equals_the_inner_variant_exactly(inner, same_noise):
    """Bit for bit with dropout; same_noise=False catches a validation pass that reseeds the RNG."""
    a, b = bn_net(dropout=0.2), bn_net(dropout=0.2)
    batches = bn_batches(3)
    common = dict(rho=0.2, lr=0.1, momentum=0.9, same_noise=same_noise)
    lets = LETS(
        a,
        torch.optim.SGD,
        inner=inner,
        rho_lr=0.0,
        val_batches=bn_batches(2, seed=5),
        **common,
    )
    ref = (SAM if inner == "sam" else ASAM)(b, torch.optim.SGD, **common)
    torch.manual_seed(0)
    run(lets, a, batches)
    torch.manual_seed(0)
    run(ref, b, batches)
    assert params_equal(a, b)
    assert lets.rho == pytest.approx(0.2)


def test_resume_with_an_endless_validation_iterator():
    batches = bn_batches(4)
    val = bn_batches(3, seed=5)

    def endless():
        while True:
            yield from val

    a = bn_net()
    opt = LETS(a, torch.optim.SGD, rho_lr=1.0, lr=0.1, val_batches=endless())
    run(opt, a, batches[:2])
    saved = through_file(opt.state_dict())
    weights = through_file(a.state_dict())
    run(opt, a, batches[2:])
    b = bn_net(seed=3)
    b.load_state_dict(weights)
    opt2 = LETS(b, torch.optim.SGD, rho_lr=1.0, lr=0.1, val_batches=endless())
    opt2.load_state_dict(saved)
    run(opt2, b, batches[2:])
    assert params_equal(a, b)
    assert opt2.rho_values() == opt.rho_values()


def test_a_shuffling_validation_loader_is_refused_a_fixed_one_resumes_exactly():
    """A DataLoader(shuffle=True) drew its order from the global generator when LETS first
    listed it, so a resumed run validated on other batches (rho 0.050016 vs 0.050009)."""
    from torch.utils.data import DataLoader, TensorDataset

    x, y = (
        torch.cat([b[0] for b in bn_batches(3, seed=5)]),
        torch.cat([b[1] for b in bn_batches(3, seed=5)]),
    )
    shuffled = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
    model = bn_net()
    opt = LETS(model, torch.optim.SGD, rho_lr=1.0, lr=0.1, val_batches=shuffled)
    with pytest.raises(SharpscopeError, match="LETS' validation data .* shuffle=False"):
        run(opt, model, bn_batches(1))
    fixed = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    opt = LETS(model, torch.optim.SGD, rho_lr=1.0, lr=0.1, val_batches=fixed)
    run(opt, model, bn_batches(1))  # a fixed loader is read twice and taken


def test_bad_lets_input_gives_one_clear_error():
    model = bn_net()
    with pytest.raises(SharpscopeError, match="LETS needs validation data"):
        LETS(model, torch.optim.SGD, lr=0.1)
    with pytest.raises(SharpscopeError, match="hypergrad must be one of"):
        LETS(model, lr=0.1, val_batches=VAL, hypergrad="exact")
    with pytest.raises(SharpscopeError, match="inner must be one of"):
        LETS(model, lr=0.1, val_batches=VAL, inner="gsam")
    with pytest.raises(SharpscopeError, match="per_group"):
        LETS(model, lr=0.1, val_batches=VAL, per_group=True, hypergrad="hvp")
    with pytest.raises(SharpscopeError, match="theta"):
        LETS(model, lr=0.1, val_batches=VAL, inner="sam", inner_options={"theta": 0.5})
    with pytest.raises(SharpscopeError, match=r"initial rho 1.0 lies outside \[rho_min, rho_max\]"):
        LETS(model, lr=0.1, val_batches=VAL, rho=1.0, rho_max=0.1)
    x, y = bn_batches(1)[0]
    opt = LETS(model, lr=0.1, val_batches=bn_batches(1), hypergrad="hvp", loss_fn=CE)

    def closure():
        opt.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(SharpscopeError, match="BatchClosure"):
        opt.step(closure)


def test_per_group_rho_for_a_group_added_later_starts_at_the_initial_rho():
    torch.manual_seed(0)
    first, second = nn.Linear(3, 3), nn.Linear(3, 2)
    model = nn.Sequential(first, second)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    loss = nn.functional.mse_loss
    opt = LETS(
        first.parameters(),
        torch.optim.SGD,
        lr=0.1,
        rho=0.07,
        model=model,
        per_group=True,
        val_batches=(x, y),
        loss_fn=loss,
    )
    opt.add_param_group({"params": second.parameters(), "lr": 0.01})
    assert opt.rho_values() == pytest.approx([0.07, 0.07])
    for _ in range(2):
        opt.step(BatchClosure(model, loss, x, y))
    assert len(opt.rho_values()) == 2


def test_an_added_group_is_checkpointed_by_the_inner_variant():
    """F6 (session 15): LETS.add_param_group did not tell the inner VaSSO, whose d for the new
    parameters was left out of state_dict, so a resume differed by 1e-4."""
    x, y = torch.randn(8, 3, dtype=DT), torch.randn(8, 1, dtype=DT)
    val = [(torch.randn(4, 3, dtype=DT), torch.randn(4, 1, dtype=DT))]

    def build():
        torch.manual_seed(0)
        model, extra = nn.Linear(3, 1, dtype=DT), nn.Parameter(torch.ones(3, dtype=DT))
        opt = LETS(
            model.parameters(),
            torch.optim.SGD,
            inner="vasso",
            inner_options={"theta": 0.3},
            rho=0.1,
            rho_lr=0.0,
            lr=0.1,
            val_batches=val,
            model=model,
            loss_fn=nn.functional.mse_loss,
        )
        opt.add_param_group({"params": [extra]})

        def closure():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x * extra), y)
            loss.backward()
            return loss

        return model, extra, opt, closure

    model, extra, opt, closure = build()
    for _ in range(2):
        opt.step(closure)
    saved = through_file([model.state_dict(), extra.detach().clone(), opt.state_dict()])
    assert sorted(saved[2]["variant"]["inner"]["d"]) == [0, 1, 2]
    for _ in range(2):
        opt.step(closure)
    model2, extra2, opt2, closure2 = build()
    model2.load_state_dict(saved[0])
    with torch.no_grad():
        extra2.copy_(saved[1])
    opt2.load_state_dict(saved[2])
    for _ in range(2):
        opt2.step(closure2)
    assert params_equal(model, model2) and torch.equal(extra, extra2)


def test_a_group_added_later_that_the_inner_asam_already_holds():
    """F6: ASAM.from_model holds every parameter of the model; adding a group of them to LETS
    must not add them to the inner variant twice (torch's ValueError)."""
    torch.manual_seed(0)
    first, second = nn.Linear(3, 3), nn.Linear(3, 2)
    model = nn.Sequential(first, second)
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    opt = LETS(
        first.parameters(), torch.optim.SGD, inner="asam", lr=0.1, model=model, val_batches=(x, y)
    )
    opt.add_param_group({"params": second.parameters()})
    opt.step(BatchClosure(model, nn.functional.mse_loss, x, y))
    assert len(opt.inner._all_params()) == 4


def _lets_with_one_bad_pass(hypergrad, bad_call, scaler):
    """Four LETS steps on an MLP; in step 2 the ``bad_call``-th loss evaluation is inf (an
    fp16 overflow, simulated): call 1 is pass 1, 2 the validation pass, 3 pass 2, 4 the fd
    pass. Returns the optimizer and, after each step, the weights, rho and the tensors with v."""
    from optim_helpers import mlp, mlp_batches

    model = mlp()
    opt = LETS(
        model,
        torch.optim.SGD,
        lr=0.1,
        momentum=0.9,
        rho=0.05,
        rho_lr=0.5,
        hypergrad=hypergrad,
        val_batches=mlp_batches(2, seed=9),
    )
    calls = {"step": 0, "count": 0}

    def loss_fn(out, target):
        calls["count"] += 1
        loss = CE(out, target)
        bad = calls["step"] == 2 and calls["count"] == bad_call
        return loss * float("inf") if bad else loss

    after = []
    for step, (x, y) in enumerate(mlp_batches(4)):
        calls.update(step=step, count=0)
        opt.step(BatchClosure(model, loss_fn, x, y, scaler=scaler))
        weights = [p.detach().clone() for p in model.parameters()]
        after.append((weights, opt.rho, [p for p in model.parameters() if "v" in opt.state[p]]))
    return opt, after


def test_an_overflow_in_the_fd_pass_skips_the_step_and_backs_off():
    """B3 (session 31): the fd pass's scaled backward is one of the step's (optimizers.md §0);
    its inf went unseen, v turned NaN and so did rho for good (eps masked to 0: plain SGD)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    _, after = _lets_with_one_bad_pass("fd", 4, scaler)
    assert scaler.get_scale() == 2.0**7
    assert all(torch.equal(a, b) for a, b in zip(after[1][0], after[2][0]))  # w restored
    assert after[1][2] and after[2][2] == []  # no v from the skipped step
    assert after[3][1] == after[2][1] != after[1][1]  # so step 3 leaves rho where step 2 put it
    assert all(0 < rho < 1 for _, rho, _ in after)


@pytest.mark.parametrize("fp16", [True, False])
def test_an_inf_in_the_validation_pass_keeps_rho_and_drops_the_hypergradient(fp16):
    """B3 (session 31): an inf validation loss (that pass is not scaled) made rho NaN for good.
    Now that step's h is dropped and rho kept; pass 1 and pass 2 were finite, so the step is
    taken and the scaler does not back off."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if fp16 else None
    opt, after = _lets_with_one_bad_pass("diag", 2, scaler)
    assert after[1][1] != 0.05 and after[2][1] == after[1][1]  # rho moved, then kept
    assert not all(torch.equal(a, b) for a, b in zip(after[1][0], after[2][0]))  # step taken
    assert after[3][1] != after[2][1] and all(0 < rho < 1 for _, rho, _ in after)
    assert all(torch.isfinite(p).all() for p in after[3][0])
    if fp16:
        assert scaler.get_scale() == 2.0**8


def test_lets_f_is_none_until_a_step_measures_it():
    """B4 (session 31): F started as NaN and stayed so while the GradScaler skipped every
    step; train read that NaN as a divergence (and NaN is no JSON value)."""
    import json

    from optim_helpers import mlp, mlp_batches

    model = mlp()
    opt = LETS(model, torch.optim.SGD, lr=0.1, val_batches=mlp_batches(2, seed=9))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x, y = mlp_batches(1)[0]
    overflow = BatchClosure(model, lambda out, t: CE(out, t) * float("inf"), x, y, scaler=scaler)
    opt.step(overflow)
    assert scaler.get_scale() == 2.0**7  # skipped in pass 1, as the scaler's warm-up does
    metrics = optimizer_metrics(opt)
    assert metrics["lets_F"] is None
    json.dumps(metrics, allow_nan=False)
    opt.step(BatchClosure(model, CE, x, y, scaler=scaler))
    assert optimizer_metrics(opt)["lets_F"] > 0
