"""A state dict names the optimizer that wrote it, and another optimizer refuses it.

Before, nothing in the state named its optimizer: a ``sgd`` state (``rho: 0.0``) loaded
into SAM, ASAM, VaSSO, SAM-ON and LETS and set their rho to 0 silently, and a SAM state
gave ASAM SAM's rho. The deliberate switch (SGD first, SAM for the last epochs) loads the
base part alone with ``load_base_state_dict``. States written before the name was kept
still load (checkpoints of earlier versions resume).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.optim import SAM

from cases import interrupt_after_first_epoch, train_config
from optim_helpers import (
    ALL_SPECS,
    BASE_SGD,
    TWO_PASS,
    bn_batches,
    bn_net,
    build,
    run,
    state_equal,
    through_file,
)


def _sgd_state(model):
    sgd = build(BASE_SGD, model)
    run(sgd, model, bn_batches(2))
    return sgd.state_dict()


@pytest.mark.parametrize("name", sorted(TWO_PASS))
def test_a_sgd_state_is_refused_and_names_the_way_to_switch(name):
    model = bn_net()
    state = _sgd_state(model)
    assert state["optimizer"] == "sgd"
    opt = build({**TWO_PASS[name], "rho": 0.05}, model, val=bn_batches(2, seed=7))
    before = str(opt.state_dict())
    with pytest.raises(SharpscopeError) as info:
        opt.load_state_dict(state)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"this state was written by the sgd optimizer, not by {name}")
    assert message.endswith("opt.load_base_state_dict(state)")
    assert opt.rho == 0.05
    assert str(opt.state_dict()) == before


def test_a_sam_state_does_not_give_asam_its_rho():
    model = bn_net()
    sam = build({**TWO_PASS["sam"], "rho": 0.05}, model)
    asam = build({**TWO_PASS["asam"], "rho": 0.5}, model)
    with pytest.raises(SharpscopeError, match="written by the sam optimizer, not by asam"):
        asam.load_state_dict(sam.state_dict())
    assert asam.rho == 0.5
    with pytest.raises(SharpscopeError, match="written by the adam optimizer, not by sgd"):
        build(BASE_SGD, model).load_state_dict(build({"name": "adam"}, model).state_dict())


@pytest.mark.parametrize("source", ["sharpscope", "torch"])
def test_load_base_state_dict_switches_from_sgd_to_sam(source):
    model = bn_net()
    sgd_state = _sgd_state(model)
    if source == "torch":  # a plain torch.optim.SGD's own state loads as well
        sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
        sgd.load_state_dict(sgd_state["base"])
        sgd_state = sgd.state_dict()
    sam = SAM(model, base=torch.optim.SGD, rho=0.05, lr=0.5, momentum=0.9, weight_decay=1e-3)
    sam.load_base_state_dict(sgd_state)
    base = sgd_state["base"] if source == "sharpscope" else sgd_state
    assert str(sam.base.state_dict()) == str(base)
    assert sam.rho == 0.05
    assert sam.param_groups is sam.base.param_groups  # opt.base.load_state_dict breaks this
    scheduler = torch.optim.lr_scheduler.StepLR(sam, step_size=1, gamma=0.5)
    run(sam, model, bn_batches(1))
    scheduler.step()
    assert sam.base.param_groups[0]["lr"] == pytest.approx(0.05)
    assert sam.gradient_passes == 2  # SAM's two passes, not SGD's one
    with pytest.raises(SharpscopeError, match="it is not an optimizer state"):
        sam.load_base_state_dict({"base": None, "state": 3})
    adam = build({"name": "adam"}, model)
    with pytest.raises(SharpscopeError, match="different base optimizer than SGD"):
        sam.load_base_state_dict(adam.state_dict())


@pytest.mark.parametrize("name", sorted(ALL_SPECS))
def test_a_state_written_before_the_name_was_kept_still_resumes_exactly(name):
    spec = ALL_SPECS[name]
    batches = bn_batches(5)
    model = bn_net(dropout=0.3)
    opt = build(spec, model, val=bn_batches(3, seed=7))
    torch.manual_seed(5)
    run(opt, model, batches[:3])
    saved_model = through_file(model.state_dict())
    saved_opt = through_file(opt.state_dict())
    del saved_opt["optimizer"]  # the layout of earlier versions
    rng = torch.get_rng_state()
    run(opt, model, batches[3:])
    resumed = bn_net(seed=99, dropout=0.3)
    resumed.load_state_dict(saved_model)
    opt2 = build(spec, resumed, val=bn_batches(3, seed=7))
    opt2.load_state_dict(saved_opt)
    torch.set_rng_state(rng)
    run(opt2, resumed, batches[3:])
    assert state_equal(model, resumed)


def test_a_trainer_checkpoint_of_an_earlier_version_resumes_bit_identically(tmp_path, monkeypatch):
    """last.pt written before the optimizer state named its optimizer (no "optimizer" key)."""
    from sharpscope.trainer import train

    def config(out):
        return train_config(
            out,
            epochs=3,
            dataset={"name": "mnist1d", "samples": 256},
            optimizer={"name": "vasso", "rho": 0.05, "theta": 0.5, "base": {"name": "sgd"}},
        )

    full = train(config(tmp_path / "full"))
    interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "cut"))
    monkeypatch.undo()
    last = tmp_path / "cut" / "last.pt"
    payload = torch.load(last, weights_only=True)
    assert payload["optimizer_state"].pop("optimizer") == "vasso"
    torch.save(payload, last)
    resumed = train(config(tmp_path / "cut"), resume=True)
    for (key, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), key
    rows = [
        [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in lines]
        for lines in (
            (tmp_path / run_name / "metrics.jsonl").read_text().splitlines()
            for run_name in ("full", "cut")
        )
    ]
    assert rows[0] == rows[1]


def test_the_state_of_an_optimizer_copy_keeps_its_name():
    model = bn_net()
    opt = build(TWO_PASS["vasso"], model)
    assert copy.deepcopy(opt).state_dict()["optimizer"] == "vasso"
