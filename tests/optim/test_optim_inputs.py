"""Bad inputs to the optimizers used in a researcher's own loop are one line, found where
they are given (session 29's library audit: tracebacks at the first or second step)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.optim import LETS, SAM

from optim_helpers import ALL_SPECS, CE, bn_batches, bn_net, build, mlp, mlp_batches


def _one_line(info) -> str:
    message = str(info.value)
    assert "\n" not in message
    return message


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("name", ["sam", "asam", "vasso", "samon", "lets-learning", "bsam"])
def test_a_closure_returning_per_example_losses_is_one_line(name):
    """SAM, ASAM, VaSSO, SAM-ON and bSAM returned the vector as "the loss"; LETS failed
    at its second step inside the rho update."""
    model = bn_net()
    spec = {k: v for k, v in ALL_SPECS[name].items() if k != "splits"}  # a plain closure
    opt = build(spec, model, val=bn_batches(2, seed=7))
    x, y = bn_batches(1)[0]

    def closure():
        opt.zero_grad()
        losses = CE(model(x), y, reduction="none")
        losses.mean().backward()
        return losses

    with pytest.raises(SharpscopeError) as info:
        opt.step(closure)
    assert _one_line(info).startswith("the closure returned a tensor of shape (12,); return")


def test_a_loss_of_one_element_is_a_loss():
    model = mlp()
    opt = SAM(model, lr=0.1)
    x, y = mlp_batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = CE(model(x), y).reshape(1)
        loss.backward()
        return loss

    assert opt.step(closure).shape == (1,)


def test_lets_names_a_validation_loss_fn_that_returns_per_example_losses():
    model = mlp()
    x, y = mlp_batches(1)[0]
    opt = LETS(
        model, lr=0.1, val_batches=[(x, y)], loss_fn=lambda out, t: CE(out, t, reduction="none")
    )

    def closure():
        opt.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(SharpscopeError) as info:
        opt.step(closure)
    assert _one_line(info).startswith("LETS' validation loss_fn returned a tensor of shape (8,)")


# --------------------------------------------------------------------------- arguments


def _lets(**kwargs):
    model = mlp()
    return LETS(model, lr=0.1, val_batches=mlp_batches(1)[0], loss_fn=CE, **kwargs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: _lets(rho_max="a"), "rho_max must be a number, got 'a'"),
        (lambda: _lets(rho_max=float("nan")), "rho_max must be >= rho_min (0.0), got nan"),
        (lambda: _lets(val_batch_size=0), "val_batch_size must be a positive integer or None"),
        (lambda: _lets(val_batch_size=2.5), "val_batch_size must be a positive integer or None"),
        (lambda: SAM(mlp(), base=torch.optim.LBFGS, lr=0.1), "base LBFGS needs a closure in"),
        (lambda: SAM(mlp(), base=SAM, lr=0.1), "not the sharpness-aware SAM"),
        (
            lambda: SAM(mlp().parameters(), lr=0.1, model="x"),
            "model must be the network (an nn.Module), got str",
        ),
        (lambda: SAM(mlp(), lr=float("nan")), "lr must be a finite number >= 0, got nan"),
        (
            lambda: SAM(mlp(), lr=0.1, weight_decay=float("nan")),
            "weight_decay must be a finite number >= 0, got nan",
        ),
        (
            lambda: SAM([{"params": mlp().parameters(), "lr": float("nan")}], lr=0.1),
            "lr must be a finite number >= 0, got nan",
        ),
    ],
    ids=[
        "lets-rho_max-str",
        "lets-rho_max-nan",
        "lets-val_batch_size-0",
        "lets-val_batch_size-2.5",
        "lbfgs-base",
        "sam-as-base",
        "model-str",
        "lr-nan",
        "weight_decay-nan",
        "group-lr-nan",
    ],
)
def test_a_bad_argument_is_refused_at_construction_in_one_line(make, message):
    with pytest.raises(SharpscopeError) as info:
        make()
    assert message in _one_line(info)


def test_the_arguments_next_to_the_refused_ones_are_still_taken():
    assert _lets(rho_max=float("inf"), val_batch_size=4.0)._val._batch_size == 4
    for base in (torch.optim.SGD, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad):
        SAM(mlp(), base=base, lr=0.1)
    SAM(mlp(), lr=torch.tensor(0.1))  # a tensor lr, as torch takes it


# --------------------------------------------------------------------------- LETS data dtype


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_lets_reads_floating_validation_data_in_the_models_dtype(dtype):
    """float32 validation batches against a float64/bfloat16 model failed inside the
    validation pass (the analyses and the trainer cast inputs to the model's dtype)."""
    model = mlp(dtype=dtype)
    (x, y), (xv, yv) = mlp_batches(2)  # float32
    opt = LETS(model, lr=0.1, rho_lr=0.5, val_batches=[(xv, yv)], loss_fn=CE)

    def closure():
        opt.zero_grad()
        loss = CE(model(x.to(dtype)), y)
        loss.backward()
        return loss

    for _ in range(2):
        opt.step(closure)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    reference = LETS(
        mlp(dtype=dtype), lr=0.1, rho_lr=0.5, val_batches=[(xv.to(dtype), yv)], loss_fn=CE
    )
    model_ref = reference.model
    xd = x.to(dtype)

    def closure_ref():
        reference.zero_grad()
        loss = CE(model_ref(xd), y)
        loss.backward()
        return loss

    for _ in range(2):
        reference.step(closure_ref)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model_ref.parameters()))
    assert reference.rho == opt.rho


def test_lets_leaves_integer_validation_inputs_alone():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    x = torch.randint(0, 10, (6, 3))
    y = torch.randint(0, 3, (6,))
    opt = LETS(model, lr=0.1, val_batches=[(x, y)], loss_fn=CE)

    def closure():
        opt.zero_grad()
        loss = CE(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
