"""Exact-answer tests for mutants of sharpscope/trainer.py that the suite missed (session-24
mutation testing, notes_out/s24/mut_train.md). Each passes on the current code and fails on
its mutant. Small runs: MNIST-1D, 256 examples, an MLP of width 16, batch 64 (4 steps/epoch)."""

from __future__ import annotations

import json

import pytest
import torch

from sharpscope.data import load_data
from sharpscope.evaluation import evaluate
from sharpscope.trainer import TrainingDiverged, lr_factor, schedule_extends, train

from cases import step_loss_factory, train_config

N, BATCH = 256, 64


def _config(out, **changes):
    small = {
        "dataset": {"name": "mnist1d", "samples": N},
        "model": {"name": "mlp", "width": 16, "depth": 1},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "epochs": 1,
    }
    return train_config(out, **{**small, **changes})


def _rows(out):
    return [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]


RECORDING_LOSS = (
    "import json\n"
    "import torch.nn.functional as F\n"
    "def make():\n"
    "    def loss(out, y):\n"
    "        value = F.cross_entropy(out, y)\n"
    "        if out.requires_grad:  # a training step (checks and evaluation run without grad)\n"
    "            with open(LOG, 'a') as f:\n"
    "                f.write(json.dumps([float(value.detach()), y.tolist()]) + '\\n')\n"
    "        return value\n"
    "    return loss\n"
)


def _recording_loss(tmp_path):
    """A loss factory file that logs (loss, targets) of every training step; and the log."""
    path = tmp_path / "recording_loss.py"
    log = tmp_path / "steps.jsonl"
    path.write_text(f"LOG = {str(log)!r}\n" + RECORDING_LOSS)
    return path, log


def _seen(log):
    return [tuple(json.loads(line)) for line in log.read_text().splitlines()]


# T10, T11, T12 -- the row's running loss, gen_gap and loss_gap
def test_a_rows_running_loss_and_gaps_are_what_they_say(tmp_path):
    loss_file, log = _recording_loss(tmp_path)
    train(_config(tmp_path / "run", loss=f"{loss_file}:make"))
    seen = _seen(log)
    row = _rows(tmp_path / "run")[-1]
    assert len(seen) == N // BATCH
    assert row["train_loss_running"] == pytest.approx(
        sum(v for v, _ in seen) / len(seen), rel=1e-12
    )
    assert row["train_acc"] != row["test_acc"]  # so that a sign error shows
    assert row["gen_gap"] == pytest.approx(row["train_acc"] - row["test_acc"], abs=1e-15)
    assert row["loss_gap"] == pytest.approx(row["test_loss"] - row["train_loss"], abs=1e-15)


# T16, T33 -- epoch e's data order is randperm of the generator seeded ((seed*1000003+e)*7+1)
def test_each_epoch_draws_its_own_documented_data_order(tmp_path):
    loss_file, log = _recording_loss(tmp_path)
    seed = 3
    train(_config(tmp_path / "run", epochs=2, seed=seed, loss=f"{loss_file}:make"))
    seen = _seen(log)
    targets = load_data({"name": "mnist1d", "samples": N}, "train").targets
    steps = N // BATCH
    for epoch in range(2):
        gen = torch.Generator().manual_seed((((seed * 1_000_003) + epoch) * 7 + 1) % 2**63)
        order = torch.randperm(N, generator=gen)
        expected = targets[order[: steps * BATCH]].tolist()
        got = [t for _, ys in seen[epoch * steps : (epoch + 1) * steps] for t in ys]
        assert got == expected, epoch


# T20 -- save_every=2 keeps the snapshots of epochs 2 and 4, of those epochs' weights
def test_save_every_two_keeps_epochs_two_and_four(tmp_path):
    from sharpscope.io import load_checkpoint

    out = tmp_path / "run"
    train(_config(out, epochs=4, save_every=2, schedule={"name": "constant"}))
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_002.pt", "epoch_004.pt"]
    assert load_checkpoint(out / "epoch_002.pt").epoch == 2


# T21 -- a resume does not add a snapshot of an epoch that save_every does not keep
def test_a_resume_writes_no_snapshot_off_the_save_schedule(tmp_path):
    out = tmp_path / "run"
    train(_config(out, epochs=3, save_every=2))
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_002.pt"]
    train(_config(out, epochs=3, save_every=2), resume=True)  # at epoch 3 of 3: nothing to do
    assert sorted(p.name for p in out.glob("epoch_*.pt")) == ["epoch_002.pt"]


# T13 -- train_clean_acc / train_clean_loss are measured against the clean labels
def test_clean_train_accuracy_uses_the_clean_labels(tmp_path):
    spec = {"name": "mnist1d", "samples": N, "label_noise": 0.5}
    summary = train(_config(tmp_path / "run", dataset=spec))
    split = load_data(spec, "train")
    clean = evaluate(
        summary.model, split.inputs, split.clean_targets, torch.nn.functional.cross_entropy
    )
    row = _rows(tmp_path / "run")[-1]
    assert row["train_clean_acc"] == clean["acc"] and row["train_clean_loss"] == clean["loss"]
    assert row["train_clean_acc"] != row["train_acc"]


# T14 -- bSAM's model average at evaluation draws its noise from a generator seeded seed + 17
def test_bsams_model_average_is_seeded_by_the_run_seed(tmp_path, monkeypatch):
    from sharpscope.optim.bsam import BSAM

    seeds = []
    original = BSAM.predict

    def spy(self, model, x, *args, generator=None, **kwargs):
        seeds.append(generator.initial_seed())
        return original(self, model, x, *args, generator=generator, **kwargs)

    monkeypatch.setattr(BSAM, "predict", spy)
    train(_config(tmp_path / "run", seed=5, optimizer={"name": "bsam", "lr": 0.1}, bsam_samples=2))
    assert seeds and set(seeds) == {5 + 17}


# T26 -- step decay without milestones decays at fractions of the total: it cannot be extended
def test_a_step_schedule_with_default_milestones_does_not_extend():
    assert schedule_extends({"name": "step", "milestones": [3]}) is True
    assert schedule_extends({"name": "step"}) is False


# T04 -- warm-up lasts round(warmup_epochs * steps_per_epoch) steps
def test_a_fractional_warmup_is_rounded_to_steps():
    schedule = {"name": "constant", "warmup_epochs": 0.27}  # 2.7 steps -> 3
    assert [lr_factor(schedule, k, 10, 5) for k in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 1])


# T19 -- an infinite loss stops the run at the step where it appears
def test_an_infinite_loss_is_a_divergence_at_its_own_step(tmp_path):
    loss = step_loss_factory(tmp_path, "value * float('inf') if calls == 2 else value")
    with pytest.raises(TrainingDiverged, match="loss is inf at epoch 1, step 2"):
        train(_config(tmp_path / "run", loss=loss))


# T44 -- LETS without a val_fraction holds out 10% of the training split (optimizers.md)
def test_lets_holds_out_ten_percent_by_default(tmp_path):
    from sharpscope.io import load_checkpoint

    lets = {"name": "lets", "rho": 0.05, "base": {"name": "sgd", "lr": 0.05}}
    train(_config(tmp_path / "run", optimizer=lets))
    assert load_checkpoint(tmp_path / "run" / "last.pt").raw["data"]["val_fraction"] == 0.1


# T50 -- weights that turn non-finite on an epoch's last step (its loss still finite) stop the
# run before last.pt is overwritten: the last good checkpoint is kept
def test_non_finite_weights_after_an_epochs_last_step_keep_the_last_good_checkpoint(tmp_path):
    from sharpscope.io import load_checkpoint

    loss_file = tmp_path / "nan_grad_loss.py"
    loss_file.write_text(
        "import torch, torch.nn.functional as F\n"
        "calls = [0]\n"
        "def make():\n"
        "    def loss(out, y):\n"
        "        value = F.cross_entropy(out, y)\n"
        "        if out.requires_grad:\n"
        "            calls[0] += 1\n"
        "            if calls[0] == 8:  # the last of epoch 2's 4 steps: sqrt'(0) makes NaN grads\n"
        "                value = value + torch.sqrt((out * 0).sum())\n"
        "        return value\n"
        "    return loss\n"
    )
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="non-finite evaluation metrics at epoch 2"):
        train(_config(out, epochs=2, loss=f"{loss_file}:make"))
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt.epoch == 1
    assert all(torch.isfinite(v).all() for v in ckpt.model.state_dict().values())
