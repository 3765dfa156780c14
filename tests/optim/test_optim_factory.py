"""build_optimizer: names, keys, defaults, errors, metrics."""

from __future__ import annotations

import pytest
import torch

import sharpscope as ss
from sharpscope.errors import SharpscopeError
from sharpscope.optim import (
    ASAM,
    BSAM,
    LETS,
    OPTIMIZER_NAMES,
    SAM,
    SAMON,
    SinglePass,
    VaSSO,
    build_optimizer,
    optimizer_metrics,
    optimizer_options,
    resolve_optimizer_spec,
)

from optim_helpers import BASE_SGD, bn_batches, bn_net, mlp, run

CLASSES = {
    "sgd": SinglePass,
    "adam": SinglePass,
    "adamw": SinglePass,
    "sam": SAM,
    "asam": ASAM,
    "vasso": VaSSO,
    "lets": LETS,
    "samon": SAMON,
    "bsam": BSAM,
}


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_every_name_builds_with_its_defaults_and_steps(name):
    model = bn_net()
    opt = build_optimizer({"name": name}, model, num_data=50, val_batches=bn_batches(2, seed=4))
    assert type(opt) is CLASSES[name]
    run(opt, model, bn_batches(2))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    spec = resolve_optimizer_spec(name)
    assert set(spec) - {"name", "base"} <= set(optimizer_options(name))


def test_defaults_reach_the_constructed_optimizer():
    model = bn_net()
    opt = build_optimizer({"name": "asam", "lr": 0.2, "eta": 0.05}, model, num_data=1)
    assert (opt.rho, opt.eta, opt.adaptive) == (0.5, 0.05, "elementwise")
    assert opt.base.param_groups[0]["lr"] == 0.2
    assert opt.base.param_groups[0]["momentum"] == 0.9
    assert isinstance(opt.base, torch.optim.SGD)
    opt = build_optimizer(
        {"name": "vasso", "base": {"name": "adamw", "lr": 0.01}}, model, num_data=1
    )
    assert isinstance(opt.base, torch.optim.AdamW) and opt.theta == 0.9
    assert opt.perturbation_mode == "global"


def test_resolved_spec_is_nested_and_complete():
    spec = resolve_optimizer_spec({"name": "sam", "rho": 0.1, "lr": 0.05, "base": "sgd"})
    assert spec["base"] == {
        "name": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay": 5e-4,
        "dampening": 0.0,
    }
    assert spec["rho"] == 0.1 and spec["m"] is None and spec["bn_policy"] == "first"
    assert resolve_optimizer_spec(spec) == spec  # idempotent: safe to store and rebuild


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"name": "gsam"}, "unknown optimizer 'gsam'; valid names: sgd, adam"),
        ({"name": "sam", "rhoo": 0.1}, r"unknown option\(s\) \['rhoo'\] for sam; valid: .*rho"),
        (
            {"name": "sgd", "rho": 0.1},
            r"^rho does not apply to sgd \(only to asam, bsam, lets, sam, samon, vasso\); "
            "valid options of sgd: dampening, lr, max_grad_norm, momentum, nesterov, "
            "weight_decay$",
        ),
        ({"name": "vasso", "m": 16}, r"^m does not apply to vasso \(only to asam, sam, samon\)"),
        ({"name": "vasso", "m": 4, "rhoo": 0.1}, r"unknown option\(s\) \['m', 'rhoo'\] for vasso"),
        ({"name": "sam", "base": {"name": "lion"}}, "unknown base optimizer 'lion'"),
        (
            {"name": "sam", "base": {"name": "adam", "momentum": 0.9}},
            r"^momentum does not apply to base adam \(only to sgd\)",
        ),
        ({"name": "sam", "lr": 0.1, "base": {"lr": 0.2}}, "given twice"),
        ({"name": "lets", "theta": 0.5}, "do not apply to LETS with inner='sam'"),
        ({"name": "bsam", "base": "sgd"}, "takes no 'base'"),
        ({"name": "sam", "rho": -1}, "rho must be"),
        # yes/no options were bool(value): "no" and "false" turned them on (session 26)
        ({"name": "samon", "exclude_norm": "no"}, r"^exclude_norm must be true or false, got 'no'"),
        ({"name": "sam", "same_noise": "false"}, "^same_noise must be true or false"),
        ({"name": "sgd", "nesterov": 1}, r"^nesterov must be true or false, got 1 \(int\)"),
        ({"name": "sam", "base": {"name": "adam", "amsgrad": "x"}}, "^amsgrad must be true or"),
        ({"name": "lets", "per_group": 0}, "^per_group must be true or false"),
        # NaN from a config file or --opt trained to a "divergence" (session 26)
        ({"name": "sam", "lr": float("nan")}, r"^lr must be a finite number >= 0, got nan$"),
        ({"name": "adamw", "weight_decay": float("nan")}, "^weight_decay must be a finite"),
        ({"name": "bsam", "lr": -1.0}, r"^lr must be a finite number >= 0, got -1.0$"),
        # inf diverged (blaming the learning rate) or, for rho_lr, trained SGD (session 27)
        ({"name": "asam", "eta": float("inf")}, r"^eta must be a finite number >= 0, got inf$"),
        ({"name": "bsam", "s_init": float("inf")}, r"^s_init must be a finite number > 0"),
        ({"name": "bsam", "prior_precision": float("inf")}, "^prior_precision must be a finite"),
        ({"name": "bsam", "damping": float("inf")}, "^damping must be a finite number >= 0"),
        ({"name": "sgd", "lr": "0.1"}, r"^lr must be a number, got '0.1' \(str\)$"),
        ({"name": "vasso", "theta": 0}, "theta must be in"),
        ({"name": "samon"}, "has none"),
        ({"name": "lets"}, "LETS needs validation data"),
        ("nope", "unknown optimizer"),
    ],
)
def test_bad_specs_give_one_clear_error(spec, match):
    with pytest.raises(SharpscopeError, match=match):
        build_optimizer(spec, mlp(), num_data=10)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "adam", "betas": [0.9]},  # torch: IndexError
        {"name": "sam", "base": "adam", "betas": [0.9, 0.99, 0.5]},  # torch: at the first step
        {"name": "adamw", "betas": 0.9},
        {"name": "vasso", "base": {"name": "adamw", "betas": [0.9, 1.0]}},
        {"name": "bsam", "betas": ["fast", 0.9]},
    ],
)
def test_adam_betas_of_the_wrong_length_are_one_line_when_the_spec_is_resolved(spec):
    """F1 (session 15): bad betas crashed in torch's constructor or first step."""
    with pytest.raises(
        SharpscopeError, match=r"^betas must be two numbers in \[0, 1\), got "
    ) as info:
        resolve_optimizer_spec(spec)
    assert "\n" not in str(info.value)
    with pytest.raises(SharpscopeError, match="betas must be two numbers"):
        build_optimizer(spec, mlp(), num_data=10)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "sgd", "momentum": 2.0},
        {"name": "sam", "momentum": 1},
        {"name": "vasso", "base": {"name": "sgd", "momentum": 1.5}},
    ],
)
def test_momentum_of_one_or_more_is_one_line(spec):
    """torch's SGD takes any momentum >= 0; with 1 or more the steps grow without bound."""
    with pytest.raises(SharpscopeError, match=r"^momentum must be in \[0, 1\)"):
        resolve_optimizer_spec(spec)
    with pytest.raises(SharpscopeError, match=r"^momentum must be in \[0, 1\)"):
        build_optimizer(spec, mlp(), num_data=10)


def test_the_classes_refuse_momentum_of_one_or_more_too():
    with pytest.raises(SharpscopeError, match=r"^momentum must be in \[0, 1\) .*got 1.0$"):
        SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=1.0)
    SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=0.99)
    with pytest.raises(SharpscopeError, match=r"^momentum must be in \[0, 1\)"):  # a group's own
        SAM([{"params": mlp().parameters(), "momentum": 1.0}], torch.optim.SGD, lr=0.1)
    with pytest.raises(SharpscopeError, match=r"^momentum must be in \[0, 1\)"):
        SAM(mlp().parameters(), torch.optim.SGD, lr=0.1, momentum=torch.tensor(1.0))


def test_options_list_every_flag():
    sam = optimizer_options("sam")
    assert {
        "rho",
        "m",
        "bn_policy",
        "same_noise",
        "perturbation",
        "max_grad_norm",
        "base",
        "lr",
        "momentum",
        "nesterov",
        "weight_decay",
    } <= set(sam)
    assert "betas" in optimizer_options("sam", base="adam")
    assert {"hypergrad", "rho_lr", "inner", "theta", "eta"} <= set(optimizer_options("lets"))
    assert {"prior_precision", "damping", "s_init", "splits", "betas"} <= set(
        optimizer_options("bsam")
    )
    with pytest.raises(SharpscopeError, match="unknown optimizer"):
        optimizer_options("gsam")


def test_metrics_per_optimizer():
    model = bn_net()
    assert optimizer_metrics(build_optimizer(BASE_SGD, model, num_data=1)) == {}
    assert optimizer_metrics(build_optimizer({"name": "sam"}, model, num_data=1)) == {"rho": 0.05}
    lets = build_optimizer(
        {"name": "lets", "per_group": True}, model, num_data=1, val_batches=bn_batches(1)
    )
    run(lets, model, bn_batches(1))
    metrics = optimizer_metrics(lets)
    assert set(metrics) == {"rho", "rho_0", "lets_F", "lets_h", "hypergrad"}
    assert all(isinstance(v, float) for k, v in metrics.items() if k != "hypergrad")


def test_sgd_spec_is_exactly_torch_sgd():
    a, b = bn_net(), bn_net()
    opt = build_optimizer(
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True}, a, num_data=1
    )
    ref = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    for x, y in bn_batches(3):
        opt.step(lambda x=x, y=y: _closure(opt, a, x, y))
        ref.step(lambda x=x, y=y: _closure(ref, b, x, y))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def _closure(opt, model, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (
            lambda m: ss.optim.SAM(m.parameters(), torch.optim.SGD, lr=0.1, same_noise="no"),
            "same_noise",
        ),
        (
            lambda m: ss.optim.SAMON(m, torch.optim.SGD, lr=0.1, exclude_norm="false"),
            "exclude_norm",
        ),
        (
            lambda m: ss.optim.SAMON(m, torch.optim.SGD, lr=0.1, normalize_bias="yes"),
            "normalize_bias",
        ),
        (
            lambda m: ss.optim.SAMON(m, torch.optim.SGD, lr=0.1, fast_first_pass="no"),
            "fast_first_pass",
        ),
        (
            lambda m: ss.optim.ASAM.from_model(m, torch.optim.SGD, lr=0.1, normalize_bias="false"),
            "normalize_bias",
        ),
    ],
)
def test_python_yes_no_options_refuse_strings(make, name):
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    )
    with pytest.raises(
        SharpscopeError, match=rf"^{name} must be true or false, got '\w+' \(str\)$"
    ):
        make(model)
