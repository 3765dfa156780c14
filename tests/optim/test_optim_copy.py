"""The optimizer object itself survives ``copy.deepcopy`` and ``torch.save``/``torch.load``:
the copy steps exactly as the original does (an in-memory "best so far", population-based
training and model soups deep-copy ``{model, optimizer}``; multiprocessing pickles both).
"""

from __future__ import annotations

import copy
import io

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.optim import LETS

from optim_helpers import ALL_SPECS, CE, bn_batches, bn_net, build, run, state_equal

#: the six optimizers, and forms whose state keeps parameter identities (ASAM's weight-only
#: rule, SAM-ON's elementwise form without bias scaling)
COPY_SPECS = {
    **ALL_SPECS,
    "asam-weight-only": {**ALL_SPECS["asam"], "normalize_bias": False},
    "samon-elementwise": {**ALL_SPECS["samon"], "adaptive": "elementwise"},
    "lets-asam": {**ALL_SPECS["lets-learning"], "inner": "asam", "normalize_bias": False},
}


def _saved_and_loaded(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("name", sorted(COPY_SPECS))
def test_a_copy_of_the_optimizer_steps_as_the_original(name, how):
    batches = bn_batches(5)
    model = bn_net(dropout=0.3)
    opt = build(COPY_SPECS[name], model, val=bn_batches(3, seed=7))
    torch.manual_seed(5)
    run(opt, model, batches[:3])
    both = {"model": model, "opt": opt}
    twin = copy.deepcopy(both) if how == "deepcopy" else _saved_and_loaded(both)
    model2, opt2 = twin["model"], twin["opt"]
    assert opt2.param_groups is opt2.base.param_groups
    assert all(p is q for p, q in zip(opt2._all_params(), model2.parameters()))
    rng = torch.get_rng_state()
    run(opt, model, batches[3:])
    torch.set_rng_state(rng)
    run(opt2, model2, batches[3:])
    assert state_equal(model, model2)
    assert opt2.rho == opt.rho
    assert opt2.state_dict()["variant"].keys() == opt.state_dict()["variant"].keys()


def test_a_copy_of_the_optimizer_alone_moves_copied_parameters_only():
    model = bn_net()
    opt = build(ALL_SPECS["vasso"], model)
    run(opt, model, bn_batches(2))
    twin = copy.deepcopy(opt)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = bn_batches(1, seed=3)[0]

    def closure():
        twin.zero_grad()
        loss = CE(twin.model(x), y)
        loss.backward()
        return loss

    twin.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not all(torch.equal(p, q) for p, q in zip(twin.model.parameters(), before))


def test_lets_with_an_iterator_of_validation_batches_refuses_a_copy_in_one_line():
    model = bn_net()
    opt = LETS(model, val_batches=iter(bn_batches(3, seed=7)), loss_fn=CE, lr=0.1)
    with pytest.raises(SharpscopeError, match="iterator, which cannot be copied"):
        copy.deepcopy(opt)
