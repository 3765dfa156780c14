"""State-dict hooks registered on a sharpscope optimizer run, as on any torch optimizer
(``state_dict`` and ``load_state_dict`` are sharpscope's own, and ran none of them)."""

from __future__ import annotations

import pytest
import torch

from sharpscope.errors import SharpscopeError

from optim_helpers import ALL_SPECS, bn_batches, bn_net, build, run


@pytest.mark.parametrize("name", ["sam", "lets-learning", "bsam", "sgd"])
def test_state_dict_hooks_run_in_torchs_order_and_may_replace_the_state(name):
    model = bn_net()
    opt = build(ALL_SPECS[name], model, val=bn_batches(2, seed=7))
    run(opt, model, bn_batches(1))
    fired = []
    opt.register_state_dict_pre_hook(lambda o: fired.append(("pre", o is opt)))

    def post(o, state):
        fired.append(("post", o is opt))
        return {**state, "note": "added by a hook"}

    opt.register_state_dict_post_hook(post)

    def load_pre(o, state):
        fired.append(("load pre", "note" in state))
        return {k: v for k, v in state.items() if k != "note"}  # may replace the state

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_post_hook(lambda o: fired.append(("load post", o is opt)))
    state = opt.state_dict()
    assert state["note"] == "added by a hook"
    opt.load_state_dict(state)
    assert fired == [("pre", True), ("post", True), ("load pre", True), ("load post", True)]
    assert "note" in state  # the hook got a copy to replace, not the caller's dict


def test_a_load_post_hook_does_not_run_when_the_state_is_refused():
    model = bn_net()
    opt = build(ALL_SPECS["sam"], model)
    fired = []
    opt.register_load_state_dict_post_hook(lambda o: fired.append("load post"))
    with pytest.raises(SharpscopeError, match="missing"):
        opt.load_state_dict({"base": opt.base.state_dict()})
    with pytest.raises(SharpscopeError, match="not a SAM state dict: a NoneType, not a dict"):
        opt.load_state_dict(None)  # was a TypeError from set(None)
    assert fired == []
    torch.optim.lr_scheduler.StepLR(opt, 1)  # the optimizer is still usable
