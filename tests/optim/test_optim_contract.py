"""Contract every registered optimizer satisfies (STYLE.md): rho = 0 is the base
optimizer exactly, a state-dict round trip resumes bit-identically, a scheduler moves
the base LR, and pass 2 leaves BatchNorm running statistics alone with bn_policy="first".
"""

from __future__ import annotations

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.optim import BatchClosure, batchnorm_buffers

from optim_helpers import (
    ALL_SPECS,
    BASE_SGD,
    CE,
    TWO_PASS,
    bn_batches,
    bn_net,
    build,
    clone,
    params_equal,
    run,
    state_equal,
    through_file,
)


def _val():
    return bn_batches(3, seed=7)


@pytest.mark.parametrize("name", sorted(TWO_PASS))
@pytest.mark.parametrize("base", ["sgd", "adamw"])
def test_rho_zero_equals_base_exactly(name, base):
    base_spec = BASE_SGD if base == "sgd" else {"name": "adamw", "lr": 0.01, "weight_decay": 0.1}
    model = bn_net()
    ref = clone(model)
    batches = bn_batches(4)
    opt = build({**TWO_PASS[name], "rho": 0.0, "base": base_spec}, model, val=_val())
    sgd = build(base_spec, ref)
    run(opt, model, batches)
    run(sgd, ref, batches)
    assert state_equal(model, ref)


@pytest.mark.parametrize("name", sorted(set(TWO_PASS) - {"lets"}))  # LETS never skips pass 2
def test_rho_zero_takes_one_pass_even_with_bn_policy_both(name):
    """rho = 0 skips pass 2: one gradient pass, BatchNorm statistics updated once, not twice."""
    model = bn_net()
    x, y = bn_batches(1)[0]
    opt = build({**TWO_PASS[name], "rho": 0.0, "bn_policy": "both"}, model)
    opt.step(BatchClosure(model, CE, x, y))
    assert opt.gradient_passes == 1
    assert int(model.bn.num_batches_tracked) == 1


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_state_dict_round_trip_resumes_bit_identically(name):
    spec = ALL_SPECS[name]
    batches = bn_batches(6)
    model = bn_net(dropout=0.3)
    opt = build(spec, model, val=_val())
    torch.manual_seed(5)
    run(opt, model, batches[:3])
    saved_model = through_file(model.state_dict())
    saved_opt = through_file(opt.state_dict())
    rng = torch.get_rng_state()
    run(opt, model, batches[3:])

    resumed = bn_net(seed=99, dropout=0.3)
    resumed.load_state_dict(saved_model)
    opt2 = build(spec, resumed, val=_val())
    opt2.load_state_dict(saved_opt)
    torch.set_rng_state(rng)
    run(opt2, resumed, batches[3:])
    assert state_equal(model, resumed)
    assert opt2.param_groups is opt2.base.param_groups
    if name.startswith("lets"):
        assert opt2.rho_values() == opt.rho_values()


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_scheduler_moves_the_base_lr(name):
    model = bn_net()
    opt = build(ALL_SPECS[name], model, val=_val())
    lr0 = opt.base.param_groups[0]["lr"]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    run(opt, model, bn_batches(1))
    scheduler.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5)
    # still shared after a reload
    opt.load_state_dict(through_file(opt.state_dict()))
    scheduler.step()
    assert opt.base.param_groups[0]["lr"] == pytest.approx(lr0 * 0.25)
    assert opt.param_groups is opt.base.param_groups


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_second_pass_leaves_batchnorm_statistics_alone(name):
    model = bn_net()
    x, y = bn_batches(1)[0]
    opt = build(
        {**ALL_SPECS[name], "bn_policy": "first"} if name != "sgd" else BASE_SGD, model, val=_val()
    )
    expected = clone(model)
    if name == "bsam":
        # pass 1 of chunk j (splits=2) runs at theta_j = m + xi_j * sigma, xi_j drawn in order
        # from the optimizer's generator; pass 2 must not add to the statistics
        gen = torch.Generator()
        gen.set_state(opt.generator.get_state())
        params = list(expected.parameters())
        sigma = opt.posterior_std()
        with torch.no_grad():
            for chunk in (x[:6], x[6:]):
                for p, m in zip(params, model.parameters()):
                    p.copy_(m)
                torch._foreach_addcmul_(params, opt._noise(params, gen), sigma)
                expected(chunk)
    else:
        with torch.no_grad():
            expected(x)  # pass 1 at w updates the running statistics once
    opt.step(BatchClosure(model, CE, x, y))
    for got, want in zip(batchnorm_buffers(model), batchnorm_buffers(expected)):
        assert torch.equal(got, want)


def test_bn_policy_both_updates_in_both_passes():
    model = bn_net()
    x, y = bn_batches(1)[0]
    opt = build({"name": "sam", "rho": 0.05, "bn_policy": "both", "base": BASE_SGD}, model)
    before = int(model.bn.num_batches_tracked)
    opt.step(BatchClosure(model, CE, x, y))
    assert int(model.bn.num_batches_tracked) == before + 2


def test_every_optimizer_works_with_a_plain_closure():
    batches = bn_batches(2)
    for name, spec in ALL_SPECS.items():
        if name.startswith("lets"):
            continue  # a plain closure hides the loss: see test_lets_with_a_plain_closure
        if name == "bsam":
            spec = {**spec, "splits": 1}  # chunks need closure(j, M)
        a, b = bn_net(), bn_net()
        opt_a = build(spec, a, val=_val())
        opt_b = build(spec, b, val=_val())
        torch.manual_seed(0)
        run(opt_a, a, batches, plain=True)
        torch.manual_seed(0)
        run(opt_b, b, batches)
        assert params_equal(a, b), name


def test_lets_with_a_plain_closure():
    from sharpscope.optim import LETS

    batches = bn_batches(3)
    a, b = bn_net(), bn_net()
    opt_a = LETS(a, torch.optim.SGD, rho_lr=0.5, lr=0.1, val_batches=_val(), loss_fn=CE)
    opt_b = LETS(b, torch.optim.SGD, rho_lr=0.5, lr=0.1, val_batches=_val())
    run(opt_a, a, batches, plain=True)
    run(opt_b, b, batches)
    assert params_equal(a, b)
    assert opt_a.rho_values() == opt_b.rho_values() != [0.05]


def test_rho_refuses_a_bool():
    """float(True) is 1.0: a bool given as rho is refused like any other non-number."""
    from sharpscope.errors import SharpscopeError
    from sharpscope.optim import SAM

    with pytest.raises(SharpscopeError, match="rho must be a number"):
        SAM([torch.nn.Parameter(torch.ones(2))], torch.optim.SGD, rho=True, lr=0.1)


@pytest.mark.parametrize("name", sorted(set(ALL_SPECS) - {"sgd"}))
def test_rho_set_between_steps_is_checked_and_used(name):
    # session 29 (optimlib): `opt.rho = -0.1` was accepted silently and gave an anti-SAM
    # step, while the constructor and load_state_dict refuse it
    model, batches = bn_net(), bn_batches(2)
    opt = build(ALL_SPECS[name], model, val=_val())
    before = opt.rho
    for bad in (-0.1, float("inf"), float("nan"), "a", True):
        with pytest.raises(SharpscopeError, match="rho must be a") as info:
            opt.rho = bad
        assert "\n" not in str(info.value)
    assert opt.rho == before
    # a radius set by attribute (a schedule) is the radius of the next step
    reference_model = clone(model)
    reference = build({**ALL_SPECS[name], "rho": 0.02}, reference_model, val=_val())
    opt.rho = 0.02
    torch.manual_seed(3)
    run(opt, model, batches)
    torch.manual_seed(3)
    run(reference, reference_model, batches)
    assert params_equal(model, reference_model)
