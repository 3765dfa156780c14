"""A step called inside the caller's ``torch.autocast`` region (precision B2, session 31)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sharpscope.optim.factory import build_optimizer


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))


@pytest.mark.parametrize("name", ["sam", "asam", "vasso", "samon", "bsam"])
def test_a_step_inside_the_callers_autocast_is_the_step_with_autocast_in_the_closure(name):
    """The autocast region kept one bf16 copy of each weight, cast at pass 1, so pass 2
    ran at the unperturbed weights: pass 2's gradient equalled pass 1's, and SAM, ASAM,
    VaSSO, LETS and bSAM trained as their base optimizer, silently. With autocast around
    the step the steps are now those with autocast inside the closure, bit for bit (LETS'
    validation pass runs in the outer region too: below)."""
    torch.manual_seed(1)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    spec = {"name": name, "rho": 0.5, "base": {"name": "sgd", "lr": 0.1}}
    if name == "bsam":
        spec = {"name": "bsam", "rho": 0.5, "lr": 0.1}
    weights = []
    for outer in (False, True):
        model = _model()
        opt = build_optimizer(spec, model, num_data=32, val_batches=(x[:8], y[:8]))

        def closure(model=model, outer=outer):
            # backward in the region too, as under the outer one: autocast casts its
            # products as well (which PyTorch advises against, but not for this test)
            region = contextlib.nullcontext() if outer else torch.autocast("cpu", torch.bfloat16)
            with region:
                loss = F.cross_entropy(model(x), y)
                loss.backward()
            return loss

        for _ in range(3):
            torch.manual_seed(2)  # bSAM's noise
            if outer:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step(closure)
            else:
                opt.step(closure)
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=0, atol=0)


def test_lets_second_pass_inside_the_callers_autocast_sees_the_perturbed_weights():
    from sharpscope.optim import LETS

    torch.manual_seed(1)
    x, y = torch.randn(32, 10), torch.randint(0, 3, (32,))
    model = _model()
    opt = LETS(
        model.parameters(),
        torch.optim.SGD,
        lr=0.1,
        rho=0.5,
        model=model,
        loss_fn=F.cross_entropy,
        val_batches=(x[:8], y[:8]),
    )
    grads = []

    def closure():
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        return loss

    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(closure)
    assert len(grads) == 2 and (grads[1] - grads[0]).abs().max() > 1e-3  # they were equal
