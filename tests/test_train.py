"""The trainer: files written, exact resume, divergence handling, torchrun DDP."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.io import load_checkpoint, load_training_state
from sharpscope.trainer import TrainConfig, TrainingDiverged, lr_factor, train

from cases import (
    DIFFERENT_DATA,
    SLOW_AGENT,
    error_lines,
    full_and_resumed_runs,
    full_and_resumed_under_torchrun,
    loss_that_kills_rank_1,
    rendezvous_file,
    spawned_group,
    step_loss_factory,
    torchrun,
    train_config,
    write_cifar,
)

_config = train_config


def test_a_second_train_into_a_folder_in_use_is_refused_and_the_lock_ends_with_the_run(tmp_path):
    """Two `train` into one --out both ran: the second overwrote last.pt and mixed its rows
    into the first's metrics.jsonl. The run holds a lock on the folder now."""
    from sharpscope.locking import exclusive_lock, is_locked

    out = tmp_path / "run"
    out.mkdir()
    with exclusive_lock(out, "held by the first run"):  # a `train` working in the folder
        assert is_locked(out)
        with pytest.raises(SharpscopeError) as info:
            train(_config(out, epochs=1))
        assert str(info.value) == (
            f"another `sharpscope train` is writing into {out}; wait for it to finish or "
            "train into another --out"
        )
    assert list(out.iterdir()) == [] and not is_locked(out)
    train(_config(out, epochs=1))  # free again, and freed after the run
    assert (out / "last.pt").exists() and not is_locked(out)
    # a folder made for a run that stops on bad input is not left behind, empty
    fresh = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(SharpscopeError):
        train(_config(fresh, batch_size=10**6))
    assert not (tmp_path / "new").exists()  # nor the parents made for it
    kept = tmp_path / "mine"
    (kept / "notes").mkdir(parents=True)
    with pytest.raises(SharpscopeError):
        train(_config(kept / "sub" / "run", batch_size=10**6))
    assert sorted(p.name for p in kept.iterdir()) == ["notes"]  # the user's own, kept


def test_under_torchrun_a_folder_in_use_stops_every_rank_at_once(tmp_path):
    """Acceptance report, session 21: only rank 0 took the lock, so on a refusal rank 1 waited
    for it in the process group's start-up until torchrun killed it (SIGKILL, 30 s later).
    Rank 0 now shares the outcome, and every rank stops with the same line."""
    from sharpscope.locking import exclusive_lock

    out = tmp_path / "run"
    out.mkdir()
    args = ["train", "--dataset", "digits", "--samples", "128", "--model", "mlp"]
    args += ["--epochs", "1", "--no-progress", "--device", "cpu", "--out", str(out)]
    with exclusive_lock(out, "held by the first run"):
        refused = torchrun(*args)
    lines = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode != 0 and lines, refused.stderr[-2000:]
    assert set(lines) == {
        f"error: another `sharpscope train` is writing into {out}; wait for it to finish or "
        "train into another --out"
    }
    assert "SIGKILL" not in refused.stderr and "forcefully exiting" not in refused.stderr
    assert list(out.iterdir()) == []  # the holder's folder, left alone


def test_under_torchrun_losing_rank_0_the_survivor_names_the_epoch_kept(tmp_path):
    """Session 27: only rank 0 said what last.pt holds, so when rank 0 itself died (an
    out-of-memory kill) rank 1 printed a bare "another process stopped". Every survivor now
    names the epoch. torchrun's agent checks every 30 s, so that rank 1 meets the lost peer
    itself before the agent would stop it with SIGTERM."""
    # rank 0 dies after 10 loss calls: in epoch 2 or 3, after last.pt was written
    (tmp_path / "dying.py").write_text(loss_that_kills_rank_1(after_calls=10, rank=0))
    out = tmp_path / "run"
    args = ["train", "--dataset", "digits", "--samples", "128", "--model", "mlp"]
    args += ["--epochs", "4", "--batch-size", "32", "--no-progress", "--device", "cpu"]
    args += ["--loss", "dying.py:loss", "--trust-factories", "--out", str(out)]
    launched = torchrun(*args, cwd=tmp_path, launcher=SLOW_AGENT)
    assert launched.returncode != 0
    errors = error_lines(launched)
    assert len(errors) == 1, launched.stderr[-3000:]
    epoch = load_training_state(out / "last.pt")["epoch"]
    assert 1 <= epoch < 4
    assert errors[0].startswith("error: another process of this torchrun job stopped"), errors
    assert errors[0].endswith(
        f"; {out / 'last.pt'} holds epoch {epoch}: run the same command with --resume to continue"
    )


def test_under_torchrun_training_data_that_differ_between_processes_are_refused(tmp_path):
    """Session 27: each rank trained on its share of its own data set when a factory gave
    the processes different data. Every rank stops with the same line. Session 31 (dist
    B1): data that differ only within examples (a flip drawn from numpy's unseeded
    generator, here by rank) kept every example's sum and passed the check's sums."""
    (tmp_path / "fac.py").write_text(
        "import os\nimport torch\n\n\n"
        "def by_rank():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(64, 40, generator=g), torch.randint(0, 10, (64,), generator=g)\n"
        "    return (x.flip(-1) if os.environ.get('RANK') == '1' else x), y\n"
    )
    out = tmp_path / "run"
    refused = torchrun(
        "train", "--data", f"{tmp_path / 'fac.py'}:by_rank", "--trust-factories", "--model",
        "mlp", "--epochs", "1", "--batch-size", "16", "--no-progress", "--device", "cpu",
        "--out", str(out),
    )  # fmt: skip
    assert refused.returncode != 0
    assert set(error_lines(refused)) == {DIFFERENT_DATA}, refused.stderr[-2000:]
    assert not (out / "last.pt").exists()


def test_a_one_set_factory_without_a_seed_is_its_own_test_set(tmp_path):
    """Session 27: the factory was called once per split, so the "test" metrics of an
    unseeded one-set factory came from other data than the train metrics they are said
    to equal (gen_gap 0)."""
    (tmp_path / "single.py").write_text(
        "import torch\n\n\n"
        "def noisy():\n"
        "    return torch.randn(64, 40), torch.randint(0, 10, (64,))\n"
    )
    config = _config(
        tmp_path / "run", dataset={"factory": f"{tmp_path / 'single.py'}:noisy"}, epochs=1,
        batch_size=16,
    )  # fmt: skip
    with pytest.warns(UserWarning, match="gives one data set"):
        train(config)
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    (row,) = [r for r in rows if r["kind"] == "eval"]
    assert row["test_loss"] == row["train_loss"] and row["test_acc"] == row["train_acc"]


def test_train_writes_checkpoints_and_metrics(tmp_path):
    summary = train(_config(tmp_path, save_every=1))
    assert {p.name for p in tmp_path.iterdir()} >= {
        "last.pt",
        "epoch_001.pt",
        "epoch_002.pt",
        "metrics.jsonl",
    }
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in (
        "train_loss",
        "train_acc",
        "test_loss",
        "test_acc",
        "test_nll",
        "test_ece",
        "lr",
        "step",
    ):
        assert key in rows[-1]
    assert rows[-1]["step"] == 2 * (512 // 64)
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt.epoch == 2 and ckpt.metrics["test_acc"] == pytest.approx(rows[-1]["test_acc"])
    assert ckpt.optimizer_spec["name"] == "sgd" and ckpt.raw["data"]["name"] == "mnist1d"
    # the checkpoint's weights are the returned model's
    for a, b in zip(ckpt.model.state_dict().values(), summary.model.state_dict().values()):
        assert torch.equal(a, b)
    # learning happened on this easy problem (a sanity check beside the exact tests)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] * 1.01


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {
            "dataset": {"name": "digits", "samples": 256},
            "model": {"name": "cnn", "width": 4},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True},
            "augment": True,
            "schedule": {"name": "cosine", "warmup_epochs": 1},
        },
        {
            "model": {"name": "cnn1d", "width": 8, "norm": "batch"},
            "optimizer": {"name": "sam", "rho": 0.05, "base": {"name": "sgd", "lr": 0.05}},
            "deterministic": True,
        },
        {
            "dataset": {"name": "mnist1d", "samples": 256},
            "model": {"name": "vit", "dim": 8, "depth": 1, "heads": 1, "patch": 8, "dropout": 0.3},
            "optimizer": {"name": "sam", "rho": 0.05, "base": {"name": "sgd", "lr": 0.05}},
        },
    ],
    ids=["mlp-sgd", "bn-cnn-augment-warmup", "cnn1d-sam-deterministic", "vit-dropout-sam"],
)
def test_resume_is_bit_identical(tmp_path, monkeypatch, changes):
    """Cut in epoch 2 and resumed = one run through; dropout also needs the global RNG back."""
    full, resumed = full_and_resumed_runs(
        lambda out: _config(out, epochs=3, **changes), tmp_path, monkeypatch
    )
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    rows_full = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    rows_cut = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rows_full]
    assert strip == [{k: v for k, v in json.loads(r).items() if k != "seconds"} for r in rows_cut]


def test_the_checkpoint_holds_the_grad_scaler_state(tmp_path):
    """An fp16 run (CUDA only) must resume its loss scale: the payload keeps scaler.state_dict()."""
    from types import SimpleNamespace

    from sharpscope.trainer import _checkpoint_payload

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**5)
    split = SimpleNamespace(input_shape=(2,), num_classes=2, source_summary=None)
    payload = _checkpoint_payload(
        _config(tmp_path), model, opt, scheduler, scaler, split, 1, 1, {}, torch.device("cpu")
    )
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(payload["scaler_state"])
    assert restored.get_scale() == 2.0**5


def test_resume_without_checkpoint_is_one_line(tmp_path):
    with pytest.raises(SharpscopeError, match="--resume needs"):
        train(_config(tmp_path / "empty"), resume=True)


def test_resume_refuses_other_settings_and_unresumable_checkpoints(tmp_path):
    train(_config(tmp_path / "run", epochs=2))
    last = tmp_path / "run" / "last.pt"
    refused = [
        (
            {"optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
            r"optimizer.lr 0.1 \(checkpoint: 0.05\)",
        ),
        ({"optimizer": {"name": "adam"}}, r'optimizer "adam" \(checkpoint: "sgd"\)'),
        ({"batch_size": 32, "seed": 1}, r"batch_size 32 .*; seed 1 \(checkpoint: 0\)"),
        ({"epochs": 4}, r"epochs 4 \(checkpoint: 2; its cosine schedule depends on the total\)"),
        # every difference in one refusal, the schedule's epochs among them
        ({"epochs": 4, "seed": 1}, r"seed 1 \(checkpoint: 0\); epochs 4 \(checkpoint: 2;"),
        (
            {"epochs": 1, "schedule": {"name": "constant"}},
            r'schedule "constant" \(checkpoint: "cosine"\)',
        ),
    ]
    before = last.read_bytes()
    for changes, message in refused:
        with pytest.raises(SharpscopeError, match=message):
            train(_config(tmp_path / "run", **changes), resume=True)
    assert last.read_bytes() == before  # nothing was trained or written
    # a resume that only changes what does not matter (the device, the progress bar) is fine
    summary = train(_config(tmp_path / "run", device="auto"), resume=True)
    assert summary.start_epoch == summary.epochs == 2
    # a constant schedule may be extended
    train(_config(tmp_path / "flat", epochs=1, schedule={"name": "constant"}))
    longer = train(_config(tmp_path / "flat", epochs=2, schedule={"name": "constant"}), resume=True)
    assert longer.start_epoch == 1 and longer.history[-1]["epoch"] == 2
    with pytest.raises(SharpscopeError, match="already at epoch 2"):
        train(_config(tmp_path / "flat", epochs=1, schedule={"name": "constant"}), resume=True)

    state = torch.load(last, weights_only=True)
    cases = {
        "bare": (state["state_dict"], "not a sharpscope training checkpoint"),
        "norng": ({k: v for k, v in state.items() if k != "rng_state"}, "has no rng_state"),
        "newer": ({**state, "version": 99}, "checkpoint version 99"),
    }
    for name, (payload, message) in cases.items():
        (tmp_path / name).mkdir()
        torch.save(payload, tmp_path / name / "last.pt")
        with pytest.raises(SharpscopeError, match=message):
            train(_config(tmp_path / name), resume=True)


def test_a_resume_that_restates_defaults_is_not_refused_and_a_changed_norm_is_named(tmp_path):
    """Session 28 (resume.md B5): only the optimizer was compared with its defaults filled
    in, so `--warmup-epochs 0`, `--val-fraction 0`, `--data-opt noise_seed=0` or `seed=0`
    restated on a resume were "other settings" (0 against null). And an explicit None was
    the same as a missing key: `--model-opt norm=none` on a cnn1d (batch norm by default)
    passed, then failed at the weight load with "weights do not fit"."""
    out = tmp_path / "run"
    model = {"name": "cnn1d", "width": 4, "depth": 2}
    train(_config(out, epochs=1, model=model, schedule={"name": "constant"}))
    restated = [
        {"schedule": {"name": "constant", "warmup_epochs": 0, "gamma": 0.1}},
        {
            "dataset": {
                "name": "mnist1d",
                "samples": 512,
                "label_noise": 0.0,
                "noise_seed": 0,
                "val_fraction": 0,
                "seed": 0,
            }
        },
        {"model": {**model, "norm": "batch"}},
        {"augment": False},  # not CIFAR: off by default
    ]
    for changes in restated:
        summary = train(
            _config(
                out, **{"epochs": 1, "model": model, "schedule": {"name": "constant"}, **changes}
            ),
            resume=True,
        )
        assert summary.start_epoch == summary.epochs == 1, changes
    refused = [
        ({"model": {**model, "norm": None}}, 'model.norm "none" (checkpoint: "batch")'),
        ({"schedule": {"name": "constant", "warmup_epochs": 1}}, "schedule.warmup_epochs 1 (checkpoint: 0)"),
        ({"dataset": {"name": "mnist1d", "samples": 512, "noise_seed": 1}}, "dataset.noise_seed 1 (checkpoint: 0)"),
    ]  # fmt: skip
    for changes, named in refused:
        with pytest.raises(SharpscopeError) as info:
            train(
                _config(
                    out,
                    **{"epochs": 1, "model": model, "schedule": {"name": "constant"}, **changes},
                ),
                resume=True,
            )
        assert str(info.value) == (
            f"cannot resume {out / 'last.pt'} with other settings: {named}; drop those options "
            "to continue the run as it was, or train into another output folder (--out)"
        )


def test_a_key_left_out_is_not_a_key_given_as_none():
    """B5: a model factory's option given as None is passed to it, unlike one left out."""
    from sharpscope.trainer import differing_settings

    old, new = {"factory": "m:f"}, {"factory": "m:f", "width": None}
    assert differing_settings("model", old, new) == ["model.width null (checkpoint: the default)"]
    assert differing_settings("model", new, old) == ["model.width the default (checkpoint: null)"]
    assert differing_settings("model", new, dict(new)) == []


def test_a_bsam_resume_with_another_sample_count_warns_that_the_model_average_changes(tmp_path):
    """Session 28 (resume.md B6): `--bsam-samples` changed on a resume was taken silently,
    and metrics.jsonl held rows averaged over 4 samples and rows over 8, none saying which.
    Evaluation settings may change on a resume (they do not touch training, as the weights
    showed bit for bit); this one changes recorded numbers, so it warns in one line."""
    import warnings

    def config(**changes):
        values = {"optimizer": {"name": "bsam"}, "schedule": {"name": "constant"}}
        return _config(tmp_path / "run", **{**values, "bsam_samples": 2, **changes})

    train(config(epochs=1))
    with pytest.warns(UserWarning) as caught:
        train(config(epochs=2, bsam_samples=3), resume=True)
    lines = [str(w.message) for w in caught if "model-average" in str(w.message)]
    assert lines == [
        f"{tmp_path / 'run' / 'last.pt'} is resumed with bsam_samples 3 (checkpoint: 2): the "
        "model-average metrics (test_*_bma) from epoch 2 on are drawn from other weight "
        "samples than the rows before, so metrics.jsonl mixes the two"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same count: no warning
        train(config(epochs=3, bsam_samples=3), resume=True)
    # another optimizer takes no model average: nothing to say
    train(_config(tmp_path / "sgd", epochs=1, schedule={"name": "constant"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(
            _config(tmp_path / "sgd", epochs=2, schedule={"name": "constant"}, bsam_samples=5),
            resume=True,
        )


def test_a_new_run_does_not_overwrite_an_earlier_one(tmp_path):
    train(_config(tmp_path, epochs=1))
    before = (tmp_path / "last.pt").read_bytes()
    with pytest.raises(SharpscopeError, match="already holds a training run"):
        train(_config(tmp_path, epochs=1, optimizer={"name": "adam"}))
    assert (tmp_path / "last.pt").read_bytes() == before
    # without last.pt, its epoch checkpoints still mark the folder as taken (they were
    # overwritten, or left beside another model's), and --resume names the newest
    (tmp_path / "last.pt").rename(tmp_path / "epoch_001.pt")
    rows = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(SharpscopeError) as info:
        train(_config(tmp_path, epochs=1, optimizer={"name": "adam"}))
    assert str(info.value).startswith(
        f"{tmp_path} holds checkpoints of an earlier run (epoch_001.pt); train into another output"
    )
    assert (tmp_path / "metrics.jsonl").read_bytes() == rows
    with pytest.raises(SharpscopeError, match=r"none found \(epoch_001.pt is there: copy it"):
        train(_config(tmp_path, epochs=2), resume=True)
    for name in ("epoch_999.pt", "epoch_1000.pt"):  # the newest by number, not by name
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(SharpscopeError, match=r"none found \(epoch_1000.pt is there"):
        train(_config(tmp_path, epochs=2), resume=True)
    with pytest.raises(SharpscopeError) as info:  # a new run names it too, not "the last one"
        train(_config(tmp_path, epochs=1))
    assert str(info.value).endswith("(to resume, copy epoch_1000.pt to last.pt and add --resume)")
    for name in ("epoch_999.pt", "epoch_1000.pt"):
        (tmp_path / name).unlink()
    # a run stopped before its first checkpoint is started again by the same command
    (tmp_path / "epoch_001.pt").unlink()
    train(_config(tmp_path, epochs=1))


def test_metrics_have_step_rows_only_for_a_learned_rho(tmp_path):
    sam = {"name": "sam", "rho": 0.05, "base": {"name": "sgd", "lr": 0.05}}
    summary = train(_config(tmp_path / "sam", epochs=1, optimizer=sam))
    rows = [json.loads(r) for r in (tmp_path / "sam" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in rows] == ["eval"] and rows[0]["rho"] == 0.05
    lets = {"name": "lets", "rho": 0.05, "base": {"name": "sgd", "lr": 0.05}}
    summary = train(_config(tmp_path / "lets", epochs=1, optimizer=lets))
    rows = [json.loads(r) for r in (tmp_path / "lets" / "metrics.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in rows]
    assert kinds == ["step"] * (len(rows) - 1) + ["eval"] and len(rows) > 2
    assert all("rho" in r and "lets_h" in r for r in rows[:-1])
    assert [r["kind"] for r in summary.history] == ["eval"]


def test_augment_changes_training_but_never_the_evaluation(tmp_path):
    """augment=True changes the trained weights, and the test metrics stay a plain evaluate of
    the test inputs (augment ignored in training, or applied to the test inputs, passed)."""
    from sharpscope.data import load_data
    from sharpscope.evaluation import evaluate

    digits = {"name": "digits", "samples": 128}
    images = dict(dataset=digits, model={"name": "cnn", "width": 4}, epochs=1)
    plain = train(_config(tmp_path / "plain", augment=False, **images))
    augmented = train(_config(tmp_path / "augmented", augment=True, **images))
    pairs = zip(plain.model.state_dict().values(), augmented.model.state_dict().values())
    assert not all(torch.equal(a, b) for a, b in pairs)
    test = load_data(digits, "test")
    model = augmented.model.eval()
    clean = evaluate(model, test.inputs, test.targets, torch.nn.functional.cross_entropy)
    assert augmented.metrics["test_acc"] == pytest.approx(clean["acc"])
    assert augmented.metrics["test_loss"] == pytest.approx(clean["loss"], rel=1e-5)


def test_cifar_is_augmented_by_default(tmp_path):
    """augment unset trains CIFAR exactly as augment=True ('None means on for CIFAR'), and
    unlike augment=False."""
    write_cifar(tmp_path / "data", "cifar10")  # 30 training images
    cifar = {"name": "cifar10", "data_root": str(tmp_path / "data")}
    images = dict(dataset=cifar, model={"name": "cnn", "width": 4}, epochs=1, batch_size=10)
    default, on, off = (
        train(_config(tmp_path / name, **images, **changes)).model.state_dict()
        for name, changes in (
            ("default", {}),
            ("on", {"augment": True}),
            ("off", {"augment": False}),
        )
    )
    assert all(torch.equal(default[k], on[k]) for k in default)
    assert not all(torch.equal(default[k], off[k]) for k in default)


def test_a_data_factory_warns_that_it_is_also_the_test_set(tmp_path):
    module = tmp_path / "mydata.py"
    module.write_text(
        "import torch\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(128, 40, generator=g), torch.randint(0, 10, (128,), generator=g)\n"
    )
    with pytest.warns(UserWarning, match="it is also the test set"):
        summary = train(_config(tmp_path / "run", epochs=1, dataset={"factory": f"{module}:data"}))
    assert summary.metrics["test_loss"] == summary.metrics["train_loss"]


def test_a_data_factory_with_a_test_set_of_its_own_is_evaluated_on_it(tmp_path):
    module = tmp_path / "mydata.py"
    module.write_text(
        "import torch\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    pair = lambda n: (torch.randn(n, 40, generator=g), torch.randint(0, 10, (n,), generator=g))\n"
        '    return {"train": pair(128), "test": pair(64)}\n'
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = train(_config(tmp_path / "run", epochs=1, dataset={"factory": f"{module}:data"}))
    assert summary.metrics["test_loss"] != summary.metrics["train_loss"]


def test_resume_drops_a_cut_off_last_metrics_line(tmp_path):
    config = _config(tmp_path, epochs=2, save_every=1)
    train(config)
    (tmp_path / "epoch_001.pt").replace(tmp_path / "last.pt")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text(metrics.read_text()[:-25])  # killed while appending the last row
    summary = train(_config(tmp_path, epochs=2, save_every=1), resume=True)
    assert [r["epoch"] for r in summary.history] == [1, 2]
    assert len(metrics.read_text().splitlines()) == 2


def test_divergence_stops_and_keeps_last_good_checkpoint(tmp_path):
    loss = step_loss_factory(tmp_path, "value * float('nan') if calls > 10 else value")
    with pytest.raises(TrainingDiverged, match="loss is nan at epoch 2.*last good checkpoint"):
        train(_config(tmp_path / "run", epochs=3, loss=loss))
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt.epoch == 1
    assert all(
        torch.isfinite(v).all() for v in ckpt.model.state_dict().values() if v.is_floating_point()
    )


def test_lr_schedules():
    assert lr_factor({"name": "constant"}, 50, 10, 10) == 1.0
    step = {"name": "step", "milestones": [2, 4], "gamma": 0.1}
    assert [lr_factor(step, s, 10, 6) for s in (0, 19, 20, 45)] == pytest.approx([1, 1, 0.1, 0.01])
    cosine = {"name": "cosine"}
    assert lr_factor(cosine, 0, 10, 2) == 1.0 and lr_factor(cosine, 10, 10, 2) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "epochs, factors",
    [(1, [1.0]), (2, [1.0, 0.1]), (3, [1.0, 0.1, 0.01]), (4, [1.0, 1.0, 0.1, 0.01])],
)
def test_default_step_milestones_never_decay_before_the_first_epoch_ends(epochs, factors):
    """Acceptance report, session 15: int(epochs * 0.5) was 0 for one epoch, so a 1-epoch
    run trained at 1% of its lr, and 2 epochs decayed twice at once."""
    step = {"name": "step"}
    assert [lr_factor(step, e * 10, 10, epochs) for e in range(epochs)] == pytest.approx(factors)


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({"name": "step", "gama": 0.5}, "unknown schedule key 'gama'"),
        ({"name": "cosine", "warmup": 1}, "unknown schedule key 'warmup'"),
        ({"name": "step", "milestones": 3}, "milestones must be a list of epochs"),
        ({"name": "step", "milestones": ["3"]}, "milestones must be a list of epochs"),
        ({"name": "step", "gamma": -1.0}, "gamma must be a number > 0"),
        ({"name": "step", "gamma": "x"}, "gamma must be a number > 0"),
    ],
)
def test_a_schedule_table_is_checked_key_by_key(schedule, message):
    """Acceptance report, session 15: typos were ignored, gamma = -1 trained at lr -0.1,
    bad milestones ended in tracebacks."""
    with pytest.raises(SharpscopeError, match=message):
        TrainConfig(schedule=schedule).validate()


def test_under_torchrun_a_divergence_and_sync_bn_on_the_cpu_are_one_line_on_every_rank(tmp_path):
    """Acceptance report, session 15: the rank whose half batch stayed finite went on into
    the next all-reduce and died with a gloo traceback; sync_bn on the CPU was torch's
    traceback on every rank."""
    args = ["train", "--dataset", "digits", "--samples", "256", "--model", "mlp"]
    args += ["--model-opt", "width=16", "--batch-size", "32", "--epochs", "2", "--no-progress"]
    args += ["--device", "cpu", "--schedule", "constant"]
    diverged = torchrun(*args, "--lr", "1e6", "--out", str(tmp_path / "div"))
    # torchrun's own report of the failed children follows (a traceback of its launcher);
    # none comes from the training processes
    assert diverged.returncode != 0 and "Connection closed" not in diverged.stderr
    assert "sharpscope/" not in diverged.stderr and "[rank" not in diverged.stderr
    lines = [line for line in diverged.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 2 and lines[0] == lines[1]  # each rank, the same step
    assert lines[0].startswith("error: training diverged")
    config = tmp_path / "sync.toml"
    config.write_text(
        'sync_bn = true\ndataset = {name = "digits", samples = 128}\n'
        'model = {name = "mlp", width = 8, norm = "batch"}\nbatch_size = 32\nepochs = 1\n'
    )
    synced = torchrun(
        "train",
        "--config",
        str(config),
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(tmp_path / "sync"),
    )
    assert synced.returncode != 0 and "sharpscope/" not in synced.stderr
    assert synced.stderr.count("error: sync_bn needs CUDA devices") == 2


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"schedule": "cosine"}, "schedule must be a table"),
        (
            {"schedule": {"name": "cosine", "warmup_epochs": -1}},
            "warmup_epochs must be a finite number >= 0",
        ),
        (  # session 27: inf passed and ended in an OverflowError traceback
            {"schedule": {"name": "cosine", "warmup_epochs": float("inf")}},
            "warmup_epochs must be a finite number >= 0",
        ),
        ({"save_every": "x"}, "save_every must be an integer >= 0"),
        ({"eval_batch_size": 0}, "eval_batch_size must be a positive integer"),
        ({"seed": "x"}, "seed must be an integer from 0 to 2\\^62"),
        ({"seed": 2**64}, "seed must be an integer from 0 to 2\\^62"),
        ({"seed": -1}, "seed must be an integer from 0 to 2\\^62"),
        ({"out": 5}, "out must be a path"),
        ({"augment": "yes"}, "augment must be true, false or unset"),
        ({"epochs": 0}, "epochs must be a positive integer"),
        ({"schedule": {"name": "linear"}}, "unknown schedule 'linear'"),
        ({"precision": "fp8"}, "unknown precision 'fp8'"),
        ({"device": "mps"}, "unknown device 'mps'; choose one of: auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_config_values(tmp_path, changes, message):
    with pytest.raises(SharpscopeError, match=message):
        _config(tmp_path, **changes)


def test_unknown_config_key(tmp_path):
    with pytest.raises(SharpscopeError, match="unknown training config key 'epoch'"):
        TrainConfig.from_dict({"epoch": 3})


def test_torchrun_two_processes_match_one_process(tmp_path):
    """DDP with gloo: 2 ranks x 32 examples = one process with batch 64 (no BatchNorm)."""
    args = [
        "train",
        "--dataset",
        "mnist1d",
        "--samples",
        "512",
        "--model",
        "mlp",
        "--model-opt",
        "width=32",
        "--model-opt",
        "depth=1",
        "--optimizer",
        "sgd",
        "--lr",
        "0.05",
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run(
        [sys.executable, "-m", "sharpscope", *args, "--out", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "sharpscope",
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert (multi.stdout + multi.stderr).count("wrote ") == 1  # rank 0 alone reports
    one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text().splitlines()[-1])
    two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("train_loss", "train_acc", "test_loss", "test_acc"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    a = load_checkpoint(tmp_path / "one" / "last.pt").model.state_dict()
    b = load_checkpoint(tmp_path / "two" / "last.pt").model.state_dict()
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-6), key


def test_the_top_level_train_is_the_function_after_its_module_is_imported():
    import types

    import sharpscope as ss
    import sharpscope.trainer  # noqa: F401  (binds the submodule's name on the package)

    assert ss.TrainConfig is TrainConfig
    assert not isinstance(ss.train, types.ModuleType) and ss.train is train


def test_a_bsam_run_resumed_with_more_processes_gives_each_its_own_noise(tmp_path):
    """Session 27: resumed from one process under two, both ranks loaded rank 0's noise
    generator and drew the same noise for the rest of the run (one shared draw instead of
    independent per-rank chunks). A new rank now derives a stream of its own."""
    args = ["train", "--dataset", "mnist1d", "--samples", "256", "--model", "mlp"]
    args += ["--epochs", "2", "--batch-size", "32", "--optimizer", "bsam", "--no-progress"]
    args += ["--device", "cpu", "--save-every", "1", "--out", str(tmp_path / "one")]
    one = subprocess.run(
        [sys.executable, "-m", "sharpscope", *args], capture_output=True, text=True, timeout=300
    )
    assert one.returncode == 0, one.stderr[-2000:]
    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "one" / "epoch_001.pt", tmp_path / "cut" / "last.pt")
    shutil.copy(tmp_path / "one" / "metrics.jsonl", tmp_path / "cut" / "metrics.jsonl")
    resumed = torchrun("train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "with bSAM noise of its own" in resumed.stderr
    ranks = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)["rank_states"]
    assert not torch.equal(ranks[0]["rng"], ranks[1]["rng"])


@pytest.mark.parametrize("optimizer", ["bsam", "lets"])
def test_torchrun_resume_is_bit_identical_with_per_rank_optimizer_state(tmp_path, optimizer):
    """bSAM's noise (seed + rank) and LETS' v differ per rank: each rank resumes its own."""
    args = ["train", "--dataset", "mnist1d", "--samples", "256", "--model", "mlp"]
    args += ["--model-opt", "width=16", "--model-opt", "depth=1", "--optimizer", optimizer]
    args += ["--epochs", "2", "--batch-size", "64", "--device", "cpu", "--no-progress"]
    a, b, resumed = full_and_resumed_under_torchrun(tmp_path, args)
    assert "warning" not in resumed.stderr
    assert len(a["rank_states"]) == 2
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert torch.equal(
        torch.as_tensor(a["optimizer_state"]["rho"]), torch.as_tensor(b["optimizer_state"]["rho"])
    )
    steps = [json.loads(r) for r in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(r) for r in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    drop = ("seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in steps] == [
        {k: v for k, v in r.items() if k not in drop} for r in again
    ]


@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_torchrun_resume_with_three_processes_is_bit_identical(tmp_path, optimizer):
    """DDP lays its gradient buckets out anew after a run's first step, so a resumed run
    summed its first step in another order; with 3+ ranks the weights then differed by 1e-8
    (each gradient is now reduced on its own: distributed.reduce_each_gradient)."""
    args = ["train", "--dataset", "mnist1d", "--samples", "256", "--model", "mlp"]
    args += ["--model-opt", "width=16", "--model-opt", "depth=2", "--optimizer", optimizer]
    args += ["--epochs", "2", "--batch-size", "30", "--device", "cpu", "--no-progress"]
    a, b, _ = full_and_resumed_under_torchrun(tmp_path, args, processes=3)
    assert all(torch.equal(value, b["state_dict"][key]) for key, value in a["state_dict"].items())


def test_the_per_gradient_hook_averages_like_ddp():
    """reduce_each_gradient gives every rank the mean of the ranks' gradients."""
    mp.spawn(_average_worker, args=(3, rendezvous_file()), nprocs=3, join=True)


def _average_worker(rank, world, rendezvous):
    from sharpscope.distributed import reduce_each_gradient

    with spawned_group(rank, world, rendezvous):
        torch.manual_seed(0)
        x, y = torch.randn(world * 5, 12), torch.randint(0, 4, (world * 5,))
        net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4))
        mean = [torch.zeros_like(p) for p in net.parameters()]
        for r in range(world):  # each rank's own gradient, by hand
            net.zero_grad()
            nn.functional.cross_entropy(net(x[5 * r : 5 * r + 5]), y[5 * r : 5 * r + 5]).backward()
            for total, p in zip(mean, net.parameters()):
                total += p.grad / world
        ddp = nn.parallel.DistributedDataParallel(net)
        ddp.register_comm_hook(None, reduce_each_gradient)
        for _ in range(2):  # the initial bucket layout, then the rebuilt one
            net.zero_grad()
            mine = slice(5 * rank, 5 * rank + 5)
            nn.functional.cross_entropy(ddp(x[mine]), y[mine]).backward()
            for total, p in zip(mean, net.parameters()):
                torch.testing.assert_close(p.grad, total, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer", ["sgd", "bsam"])
def test_the_largest_seed_trains(tmp_path, optimizer):
    """Seeds above 2^64 were a traceback in torch's generator; the trainer's per-epoch
    streams multiply the seed, so 2^62 itself overflowed there."""
    spec = {"name": optimizer, "lr": 0.05}
    summary = train(_config(tmp_path, seed=2**62, epochs=1, optimizer=spec))
    assert summary.metrics["train_loss"] > 0


def test_a_resume_writes_the_snapshot_a_kill_cut_short_and_removes_leftover_files(tmp_path):
    """A SIGKILL after last.pt was written but during epoch_NNN.pt lost that snapshot for
    good (the resumed run went on from the next epoch), and left temporary files behind."""
    full = tmp_path / "full"
    train(_config(full, save_every=1))
    cut = tmp_path / "cut"
    cut.mkdir()
    shutil.copy(full / "epoch_001.pt", cut / "last.pt")  # the state the kill left
    shutil.copy(full / "config.json", cut / "config.json")
    (cut / "metrics.jsonl").write_text((full / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    for leftover in (".epoch_001.pt.x1y2.tmp", ".last.pt.a9b8.tmp"):
        (cut / leftover).write_bytes(b"half a checkpoint")
    train(_config(cut, save_every=1), resume=True)
    assert sorted(p.name for p in cut.iterdir()) == [
        "config.json",
        "epoch_001.pt",
        "epoch_002.pt",
        "last.pt",
        "metrics.jsonl",
    ]
    assert (cut / "epoch_001.pt").read_bytes() == (full / "epoch_001.pt").read_bytes()
    a = torch.load(full / "epoch_002.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "epoch_002.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(value, b[key]) for key, value in a.items())


def test_a_batch_size_the_processes_do_not_divide_names_sizes_that_they_do(tmp_path):
    mp.spawn(_batch_size_worker, args=(2, rendezvous_file(), str(tmp_path)), nprocs=2, join=True)


def _batch_size_worker(rank, world, rendezvous, folder):
    os.environ["WORLD_SIZE"] = str(world)  # what torchrun sets: train() joins the group
    with spawned_group(rank, world, rendezvous):
        for size, near in ((15, "14 or 16"), (1, "2")):
            with pytest.raises(SharpscopeError) as caught:
                train(_config(f"{folder}/{size}", batch_size=size))
            assert str(caught.value) == (
                f"batch size {size} is not divisible by the 2 processes; choose a multiple "
                f"of 2, such as {near}"
            )


def test_any_error_of_rank_0_at_the_lock_reaches_the_other_ranks(tmp_path):
    """Review, session 21: rank 0 shared only a SharpscopeError; another error there (a
    folder it may not open, EMFILE) left the other ranks in the broadcast until torchrun
    killed them."""
    mp.spawn(_lock_failure_worker, args=(2, rendezvous_file(), str(tmp_path)), nprocs=2)


def _lock_failure_worker(rank, world, rendezvous, folder):
    import contextlib

    import sharpscope.trainer as trainer

    @contextlib.contextmanager
    def unopenable(path, busy):
        raise PermissionError(13, "Permission denied", str(path))
        yield

    trainer.exclusive_lock = unopenable  # this spawned process's own module
    os.environ["WORLD_SIZE"] = str(world)
    with spawned_group(rank, world, rendezvous):
        expected = PermissionError if rank == 0 else SharpscopeError
        with pytest.raises(expected) as caught:
            train(_config(f"{folder}/run", epochs=1))
        if rank:
            assert str(caught.value) == (
                f"rank 0 could not take {folder}/run: [Errno 13] Permission denied: '{folder}/run'"
            )


def test_a_parent_another_run_just_used_is_kept_and_the_real_error_raised(tmp_path, monkeypatch):
    """Review, session 21: between "is it empty?" and rmdir a sibling run could make its
    folder in a parent made for this one: rmdir's OSError then replaced the one-line error."""
    real = Path.rmdir

    def racing(self):
        if self.name == "sweep":
            (self / "seed1").mkdir()
        return real(self)

    monkeypatch.setattr(Path, "rmdir", racing)
    with pytest.raises(SharpscopeError, match="batch size 1000000 is larger"):
        train(_config(tmp_path / "sweep" / "seed0", batch_size=10**6))
    assert [p.name for p in (tmp_path / "sweep").iterdir()] == ["seed1"]


def test_a_lock_that_cannot_be_tried_removes_the_folders_it_made(tmp_path, monkeypatch):
    """Review 2, session 21: a lock failure other than "busy" (here out of file
    descriptors) left the run folder and the parents made for it."""
    import contextlib
    import errno

    import sharpscope.trainer as trainer

    @contextlib.contextmanager
    def no_descriptors(path, busy):
        raise OSError(errno.EMFILE, "Too many open files")
        yield

    monkeypatch.setattr(trainer, "exclusive_lock", no_descriptors)
    with pytest.raises(OSError, match="Too many open files"):
        train(_config(tmp_path / "sweep" / "seed0", epochs=1))
    assert list(tmp_path.iterdir()) == []


def test_regression_targets_are_refused_in_one_line(tmp_path):
    """Acceptance s22: float targets with --loss mse died in the accuracy's gather with a
    traceback, leaving an empty metrics.jsonl."""
    (tmp_path / "reg.py").write_text(
        "import torch\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(64, 8, generator=g)\n"
        "    return x, x.sum(1)\n"
        "def net():\n"
        "    return torch.nn.Linear(8, 1)\n"
    )
    out = tmp_path / "run"
    args = ["train", "--dataset", f"{tmp_path}/reg.py:data", "--model", f"{tmp_path}/reg.py:net"]
    args += ["--loss", "mse", "--optimizer", "sgd", "--epochs", "1", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "sharpscope", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "error: training needs class labels (integer targets of shape (N,)); the data gives "
        "float32 targets of shape (64,): regression is not trained here (its accuracy, NLL "
        "and ECE are undefined); the analyses accept float targets"
    )
    assert "Traceback" not in done.stderr and not out.exists()


def test_b6_training_on_a_single_class_is_refused_in_one_line(tmp_path):
    """Bug B6, session 28: labels all 0 built a one-output model whose cross-entropy is 0:
    nothing trained, and the run reported loss 0 beside an 81% accuracy (the one output read
    as a binary logit)."""
    (tmp_path / "one.py").write_text(
        "import torch\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(32, 8, generator=g), torch.zeros(32, dtype=torch.long)\n"
    )
    spec = {"factory": f"{tmp_path}/one.py:data"}
    with pytest.raises(SharpscopeError) as info:
        train(_config(tmp_path / "run", dataset=spec, model={"name": "mlp"}, batch_size=8))
    assert str(info.value) == (
        "training needs at least 2 classes; the data hold a single class (every label is 0), "
        "so the model would get one output, whose cross-entropy is 0 whatever the weights: "
        "nothing would train"
    )
    assert not (tmp_path / "run" / "last.pt").exists()


def test_b7_split_is_no_training_data_option(tmp_path):
    """Bug B7, session 28: --data-opt split=test was taken and ignored by train, but
    recorded, so load_data(checkpoint.data_spec) gave the test split of a run trained on
    the train split. split=train, what training does (an analysis' meta.data says it), is
    dropped."""
    with pytest.raises(SharpscopeError) as info:
        _config(tmp_path / "run", dataset={"name": "mnist1d", "split": "test"})
    assert str(info.value) == (
        "split 'test' is not a training data option: a run trains on the train split (and "
        "evaluates on the test split); give a split to an analysis (--split)"
    )
    config = _config(tmp_path / "run", dataset={"name": "mnist1d", "split": "train"})
    assert config.dataset == {"name": "mnist1d"}


def test_b8_float64_inputs_train_as_the_float32_ones(tmp_path):
    """Bug B8, session 28: float64 inputs (torch.from_numpy's) failed in train against the
    float32 weights ("mat1 and mat2 must have the same dtype"), while every analysis reads
    them in the model's dtype. train now does so too: the same run as on float32 inputs."""
    (tmp_path / "wide.py").write_text(
        "import torch\n"
        "def data(dtype=torch.float32):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)\n"
        "    return {'train': (x[:24].to(dtype), y[:24]), 'test': (x[24:].to(dtype), y[24:])}\n"
        "def data64():\n"
        "    return data(torch.float64)\n"
    )
    runs = {
        name: train(
            _config(
                tmp_path / name, dataset={"factory": f"{tmp_path}/wide.py:{name}"}, batch_size=8
            )
        )
        for name in ("data", "data64")
    }
    narrow, wide = (runs[name].model.state_dict() for name in ("data", "data64"))
    assert all(torch.equal(narrow[k], wide[k]) for k in narrow)
    metrics = [{k: v for k, v in runs[n].metrics.items() if k != "seconds"} for n in runs]
    assert metrics[0] == metrics[1]


def test_b9_non_finite_inputs_are_refused_when_loaded_not_called_divergence(tmp_path):
    """Bug B9, session 28: a NaN in the inputs ended as "training diverged: loss is nan at
    epoch 1, step 3; lower the learning rate or rho", advice that cannot help."""
    (tmp_path / "holes.py").write_text(
        "import torch\n"
        "def data(where='train', value=float('nan')):\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)\n"
        "    x[3, 2] = x[3, 5] = x[20, 0] = value if where == 'train' else 0.0\n"
        "    if where == 'test':\n"
        "        x[30, 1] = value\n"
        "    return {'train': (x[:24], y[:24]), 'test': (x[24:], y[24:])}\n"
        "def in_test():\n"
        "    return data('test', float('-inf'))\n"
    )
    messages = {
        "data": "the train data hold 3 non-finite input values (NaN or inf) in 2 of 24 examples",
        "in_test": "the test data hold 1 non-finite input value (NaN or inf) in 1 of 8 examples",
    }
    for name, message in messages.items():
        spec = {"factory": f"{tmp_path}/holes.py:{name}"}
        with pytest.raises(SharpscopeError) as info:
            train(_config(tmp_path / name, dataset=spec, batch_size=8))
        assert str(info.value) == (
            f"{message}: training on them gives a NaN loss, not a model; clean or drop them in "
            "the data"
        )


def test_config_json_holds_every_optimizer_setting(tmp_path):
    """Acceptance s22: a SAM run's config.json left out rho and the base's momentum and
    weight decay unless typed (an SGD run's held them). It now also holds the resolved spec
    (``optimizer_resolved``, as the checkpoint records it), and a rerun from it trains the
    same run."""
    import json

    from sharpscope.io import load_checkpoint

    sam = {"name": "sam", "lr": 0.05}
    first = tmp_path / "first"
    train(_config(first, optimizer=sam, epochs=1))
    written = json.loads((first / "config.json").read_text())
    checkpoint = load_checkpoint(first / "last.pt")
    resolved = written.pop("optimizer_resolved")
    assert resolved["rho"] == 0.05 and resolved["base"]["momentum"] == 0.9
    # the model too, with every default as built (a later default cannot change the record)
    model = written.pop("model_resolved")
    assert model == {**written["model"], "activation": "relu", "norm": "none"}
    assert resolved == json.loads(json.dumps(checkpoint.raw["optimizer"]))
    assert written["optimizer"] == sam  # as given: --config takes it back, --optimizer switches it
    again = TrainConfig(**{**written, "out": str(tmp_path / "again")})
    train(again)
    rerun = load_checkpoint(tmp_path / "again" / "last.pt")
    for key, value in checkpoint.model.state_dict().items():
        assert torch.equal(rerun.model.state_dict()[key], value), key
    # bSAM's noise seed is the run's unless the spec names one: recorded, not fixed
    train(_config(tmp_path / "bsam", optimizer={"name": "bsam"}, epochs=1, seed=3))
    bsam = json.loads((tmp_path / "bsam" / "config.json").read_text())
    assert bsam["optimizer"] == {"name": "bsam"} and bsam["optimizer_resolved"]["seed"] == 3


def test_an_sgd_runs_config_json_switches_to_a_sam_variant(tmp_path):
    """Review, session 22: with the resolved spec as config.json's optimizer, `--config
    SGD_RUN/config.json --optimizer sam` failed ("unknown option(s) ['max_grad_norm'] for
    base sgd"); the sweep workflow works again."""
    import json

    base = ["--dataset", "mnist1d", "--samples", "128", "--model", "mlp", "--epochs", "1"]
    for args in (
        [*base, "--optimizer", "sgd", "--out", str(tmp_path / "sgd")],
        ["--config", str(tmp_path / "sgd" / "config.json"), "--optimizer", "sam"]
        + ["--out", str(tmp_path / "sam")],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "sharpscope", "train", *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
    switched = json.loads((tmp_path / "sam" / "config.json").read_text())
    assert switched["optimizer_resolved"]["name"] == "sam"
    assert switched["optimizer_resolved"]["base"]["lr"] == 0.1  # the sgd run's, kept


def _write_factories(folder):
    (folder / "fac").mkdir()
    (folder / "fac" / "parts.py").write_text(
        "import torch\n"
        "def net():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(40, 10))\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(128, 40, generator=g), torch.randint(0, 10, (128,), generator=g)\n"
        "def loss():\n"
        "    return torch.nn.functional.cross_entropy\n"
    )


@pytest.mark.filterwarnings("ignore:data factory")
def test_relative_factory_paths_are_recorded_absolute(tmp_path, monkeypatch):
    # {'factory': 'fac/myfac.py:model'} was stored as typed, so the checkpoint could not be
    # analysed from another working directory ("factory file not found")
    _write_factories(tmp_path)
    monkeypatch.chdir(tmp_path)
    config = _config(
        tmp_path / "run",
        epochs=1,
        batch_size=32,
        model="fac/parts.py:net",
        dataset={"factory": "fac/parts.py:data"},
        loss="fac/parts.py:loss",
    )
    train(config)
    where = str(tmp_path / "fac" / "parts.py")
    raw = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert raw["model"] == {"factory": f"{where}:net"}
    assert raw["data"] == {"factory": f"{where}:data"}
    assert raw["loss"] == f"{where}:loss"
    assert raw["config"]["model"] == raw["model"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["dataset"] == raw["data"] and saved["loss"] == raw["loss"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt", trust_factories=True)  # our own run
    assert ckpt.spec == raw["model"] and isinstance(ckpt.model, torch.nn.Sequential)
    # a module-form factory is recorded as given
    assert TrainConfig.from_dict({"model": "pkg.mod:net"}).model == {"factory": "pkg.mod:net"}


@pytest.mark.filterwarnings("ignore:data factory")
def test_a_checkpoint_with_relative_factory_paths_resumes_and_names_the_flag(tmp_path, monkeypatch):
    # checkpoints written before paths were recorded absolute hold them as typed
    _write_factories(tmp_path)
    monkeypatch.chdir(tmp_path)
    relative = {"model": "fac/parts.py:net", "dataset": "fac/parts.py:data", "epochs": 1}
    train(_config(tmp_path / "run", batch_size=32, schedule={"name": "constant"}, **relative))
    last = tmp_path / "run" / "last.pt"
    raw = torch.load(last, weights_only=True)
    raw["model"] = raw["config"]["model"] = {"factory": "fac/parts.py:net"}
    raw["data"] = raw["config"]["dataset"] = {"factory": "fac/parts.py:data"}
    torch.save(raw, last)
    resumed = train(
        _config(
            tmp_path / "run",
            batch_size=32,
            schedule={"name": "constant"},
            **{**relative, "epochs": 2},
        ),
        resume=True,
    )
    assert resumed.start_epoch == 1 and resumed.epochs == 2
    raw = torch.load(last, weights_only=True)
    raw["model"] = {"factory": "fac/parts.py:net"}
    torch.save(raw, last)
    monkeypatch.chdir(tmp_path / "run")
    with pytest.raises(SharpscopeError) as info:
        load_checkpoint(last, trust_factories=True)
    message = str(info.value)
    assert "model factory file not found" in message and "override it with --model" in message
    assert "relative to the folder it was trained in" in message and "\n" not in message


# --- before training: the model on the data, --augment, the process count; row lr


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("torch.nn.Linear(64, 10)", "shapes cannot be multiplied"),  # other input size
        ("torch.nn.Linear(40, 5)", "out of bounds"),  # fewer outputs than classes
    ],
)
def test_a_model_that_does_not_fit_the_data_is_one_line(tmp_path, body, message):
    module = tmp_path / "mymodel.py"
    module.write_text(f"import torch\ndef model():\n    return {body}\n")
    config = _config(tmp_path / "run", model={"factory": f"{module}:model"}, epochs=1)
    with pytest.raises(SharpscopeError, match=f"the model or loss failed on the data.*{message}"):
        train(config)


def test_augment_on_data_that_are_not_images_is_one_line(tmp_path):
    with pytest.raises(SharpscopeError, match=r"needs images of shape \(C, H, W\)"):
        train(_config(tmp_path, augment=True, epochs=1))


def test_resume_with_another_process_count_warns(tmp_path):
    train(_config(tmp_path / "full", epochs=2, save_every=1))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    state = torch.load(tmp_path / "full" / "epoch_001.pt", weights_only=True)
    assert state["world_size"] == 1
    state["world_size"] = 2  # as if torchrun with two processes had written it
    torch.save(state, resumed / "last.pt")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", resumed / "metrics.jsonl")
    with pytest.warns(UserWarning, match="written by 2 process"):
        train(_config(resumed, epochs=2), resume=True)
    state["world_size"] = 1
    torch.save(state, resumed / "last.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(_config(resumed, epochs=2), resume=True)
    # a finished run resumed with another count has nothing to do: no warning about it
    finished = torch.load(resumed / "last.pt", weights_only=True)
    finished["world_size"] = 2
    torch.save(finished, resumed / "last.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert train(_config(resumed, epochs=2), resume=True).start_epoch == 2


def test_each_rows_lr_is_the_one_its_epochs_steps_used(tmp_path):
    """Step decay at epochs 2 and 3 (0-based): epochs 1-2 train at 0.05, epoch 3 at 0.005,
    epoch 4 at 0.0005; the row of an epoch says so, not the next epoch's rate."""
    schedule = {"name": "step", "milestones": [2, 3], "gamma": 0.1}
    train(_config(tmp_path, epochs=4, schedule=schedule))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    lrs = [row["lr"] for row in rows if row["kind"] == "eval"]
    assert lrs == pytest.approx([0.05, 0.05, 0.005, 0.0005])


def test_the_run_seed_seeds_bsams_noise_unless_the_spec_names_one(tmp_path):
    """Seeds 0 and 1 draw different posterior noise (the spec's own seed defaulted to 0 for
    every run); a seed in the spec wins and is what the checkpoint records."""
    bsam = {"name": "bsam", "lr": 0.5}
    runs = {
        name: train(_config(tmp_path / name, optimizer=spec, epochs=1, seed=seed))
        for name, spec, seed in (
            ("s0", bsam, 0),
            ("s1", bsam, 1),
            ("s1-pinned", {**bsam, "seed": 0}, 1),
        )
    }
    specs = {name: load_checkpoint(tmp_path / name / "last.pt").optimizer_spec for name in runs}
    assert [specs[name]["seed"] for name in ("s0", "s1", "s1-pinned")] == [0, 1, 0]
    rng = {
        name: torch.load(tmp_path / name / "last.pt", weights_only=True)["optimizer_state"]["rng"]
        for name in runs
    }
    assert not torch.equal(rng["s0"], rng["s1"])


def test_a_relative_data_root_is_recorded_absolute(tmp_path, monkeypatch):
    """config.json and the checkpoint name the CIFAR folder so that --resume from another
    working directory finds it."""
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path / "run", data_root="data")
    assert config.data_root == str(tmp_path / "data")


def test_b3_the_data_option_data_root_is_the_data_root_setting_recorded_absolute(
    tmp_path, monkeypatch
):
    """Bug B3, session 28: --data-opt data_root=DIR (a TOML dataset table's data_root)
    stayed in the data spec as given, relative, where it beat any later --data-root."""
    monkeypatch.chdir(tmp_path)
    cifar = {"name": "cifar10", "data_root": "data"}
    config = _config(tmp_path / "run", dataset=cifar)
    assert config.data_root == str(tmp_path / "data") and config.dataset == {"name": "cifar10"}
    twice = _config(tmp_path / "run", dataset=cifar, data_root=str(tmp_path / "data"))
    assert twice.data_root == str(tmp_path / "data")
    with pytest.raises(SharpscopeError, match="^data_root is given twice, as other and as"):
        _config(tmp_path / "run", dataset=cifar, data_root="other")
    number = _config(tmp_path / "run", dataset={"name": "cifar10", "data_root": 2024})
    assert number.data_root == str(tmp_path / "2024")  # --data-opt data_root=2024 parses as int
    for bad in ("", [1]):
        with pytest.raises(SharpscopeError, match="data option data_root must be a folder path"):
            _config(tmp_path / "run", dataset={"name": "cifar10", "data_root": bad})


def test_b3_a_checkpoint_whose_data_spec_holds_data_root_resumes_with_it_moved(tmp_path):
    """A checkpoint of an older sharpscope records data_root in its data spec; resumed,
    the setting moves to data_root and the spec is not said to differ."""
    from sharpscope.trainer import check_resume

    config = _config(tmp_path / "run", dataset={"name": "cifar10", "data_root": "data"})
    saved = {**config.to_dict(), "dataset": {"name": "cifar10", "data_root": "data"}}
    saved["data_root"] = None
    check_resume(config, saved, 0, tmp_path / "run" / "last.pt")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"optimizer": {"name": "sgd", "lr": 0.0}}, "lr is 0: the weights never change"),
        (
            {"schedule": {"name": "cosine", "warmup_epochs": 2}},
            r"warmup_epochs 2 is not shorter than the run \(2 epochs\)",
        ),
        (
            {"optimizer": {"name": "sam", "m": 64}},
            "m 64 is not smaller than the batch of 64 examples: every step perturbs with the whole",
        ),
        ({"optimizer": {"name": "sam", "m": 128.0}}, "m 128 is not smaller"),  # JSON's 128.0
        (
            {"schedule": {"name": "cosine", "warmup_epochs": 1.5}, "epochs": 1},
            r"warmup_epochs 1.5 is not shorter than the run \(1 epoch\)",
        ),
        (
            {"schedule": {"name": "step", "milestones": [5, 1, 2, 5]}},  # each named once
            r"schedule milestones 2, 5 are not before the end of the run \(2 epochs\): the "
            "learning rate never decays there",
        ),
        (
            {"schedule": {"name": "step", "milestones": [1, 3]}, "epochs": 3},
            r"schedule milestone 3 is not before the end of the run \(3 epochs\)",
        ),
    ],
)
def test_settings_that_train_but_hardly_as_meant_are_warned_about(tmp_path, changes, message):
    with pytest.warns(UserWarning, match=message) as caught:
        train(_config(tmp_path, **{"epochs": 2, **changes}))
    assert len(caught) == 1  # the other two checks stay silent


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": {"name": "sam", "m": 32}, "schedule": {"warmup_epochs": 1}},
        {"epochs": 2, "schedule": {"name": "step", "milestones": [1]}},  # decays in epoch 2
        {"epochs": 2, "schedule": {"name": "step"}},  # the default milestones
    ],
)
def test_ordinary_settings_train_without_warnings(tmp_path, changes):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(_config(tmp_path, **changes))


def _base_state(state):
    """The base optimizer's state_dict in a checkpoint (SGD runs in the SinglePass wrapper)."""
    return state["optimizer_state"]["base"]


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (
            lambda s: s["rng_state"].update(cpu=torch.zeros(7, dtype=torch.uint8)),
            r"its rng_state does not fit this run \(RuntimeError: ",
        ),
        (
            lambda s: s.update(scheduler_state=[1, 2]),
            r"its scheduler_state does not fit this run \(\w+Error: ",
        ),
        (
            lambda s: next(iter(_base_state(s)["state"].values())).update(
                momentum_buffer=torch.zeros(3)
            ),
            r"cannot load this VaSSO state: its momentum_buffer has shape \(3,\), its parameter "
            r"\(32, 40\); load it into an optimizer built from the same spec and model$",
        ),
        (
            lambda s: _base_state(s)["param_groups"][0].update(lr="0.1"),
            r"cannot load this VaSSO state: lr must be a number, got '0.1' \(str\); load it",
        ),
        (
            lambda s: s["optimizer_state"]["variant"]["d"].update({0: torch.zeros(3)}),
            r"optimizer state 'd' of parameter 0 has shape \(3,\), the parameter \(32, 40\)",
        ),
        (lambda s: s.update(epoch=-1), r"its epoch is -1, not a whole number >= 0$"),
        (lambda s: s.update(step=1.5), r"its step is 1.5, not a whole number >= 0$"),
    ],
    ids=["rng", "scheduler", "state shape", "lr", "vasso d", "epoch", "step"],
)
def test_a_checkpoint_whose_parts_do_not_fit_is_refused_in_one_line(tmp_path, tamper, message):
    """Hand-edited or foreign last.pt files that load: tracebacks at resume or at the
    first step, or (epoch -1) an extra epoch "0" trained (session 26)."""
    optimizer = {"name": "vasso", "lr": 0.05}  # SGD's momentum in its base, d of its own
    train(_config(tmp_path, epochs=1, optimizer=optimizer))
    last = tmp_path / "last.pt"
    state = torch.load(last, weights_only=True)
    tamper(state)
    torch.save(state, last)
    with pytest.raises(
        SharpscopeError, match=rf"^{re.escape(str(last))} cannot be resumed: {message}"
    ):
        train(_config(tmp_path, epochs=1, optimizer=optimizer), resume=True)


@pytest.mark.parametrize(
    "batch, options, error",
    [
        (
            "6",
            [],
            "batch size 6 is not divisible by the 4 processes; resume with 1, 2, 3 or 6 processes",
        ),
        (
            "4",
            ["--optimizer", "bsam", "--splits", "2"],
            "bsam splits 2 is more than the 1 examples of a batch per process; resume with 1 or 2 "
            "processes",
        ),
        (
            "4",
            ["--model-opt", "norm=batch"],
            "--batch-size 4 leaves one example per process, and BatchNorm 'net.2' in train mode "
            "cannot normalize a single example (one value per channel); resume with 1 or 2 "
            "processes, or a model without BatchNorm",
        ),
    ],
)
def test_a_resume_under_torchrun_that_cannot_split_the_batch_names_process_counts(
    tmp_path, batch, options, error
):
    """dist B2 (session 31): a run of batch 6 resumed with 4 processes was told to choose
    a batch size that is a multiple of 4 (bSAM's splits: "a larger --batch-size"), which
    the resume then refused as another setting; only the process count can change."""
    out = tmp_path / "run"
    args = ["--dataset", "digits", "--samples", "64", "--model", "mlp", "--batch-size", batch]
    args += ["--no-progress", "--device", "cpu", "--out", str(out), *options]
    trained = subprocess.run(
        [sys.executable, "-m", "sharpscope", "train", *args, "--epochs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert trained.returncode == 0, trained.stderr[-2000:]
    refused = torchrun("train", "--out", str(out), "--resume", "--epochs", "2", processes=4)
    assert refused.returncode != 0
    assert set(error_lines(refused)) == {f"error: {error}"}, refused.stderr[-2000:]


def test_m_sharpness_in_fp16_is_refused_before_any_file_is_written(tmp_path, monkeypatch):
    """B6 (session 31): --m with --precision fp16 was refused at the first step, after
    config.json and metrics.jsonl were written, in Python words (autocast_dtype=...).

    fp16 trains on CUDA only, so on a CPU-only machine the pre-flight check is run as on a
    GPU: the trainer's own _check_precision, handed a CUDA device."""
    import sharpscope.trainer as trainer

    sam = {"name": "sam", "rho": 0.05, "m": 8, "base": {"name": "sgd", "lr": 0.05}}
    message = (
        "--m cannot be combined with --precision fp16 (m-sharpness training has no fp16 "
        "GradScaler); use --precision bf16 or fp32"
    )
    with pytest.raises(SharpscopeError) as info:
        trainer._check_precision(
            _config(tmp_path, optimizer=sam, precision="fp16"), torch.device("cuda")
        )
    assert str(info.value) == message
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # a GPU that has it
    for precision in ("bf16", "fp32"):  # and only fp16 is refused
        trainer._check_precision(
            _config(tmp_path, optimizer=sam, precision=precision), torch.device("cuda")
        )
    _refused_as_on_a_gpu(
        monkeypatch, _config(tmp_path / "run", optimizer=sam, precision="fp16"), message
    )


def test_fp16_on_the_cpu_is_refused_before_any_file_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(SharpscopeError) as info:
        train(_config(out, precision="fp16"))
    assert str(info.value) == "--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU"
    assert not out.exists()


def test_an_fp16_lets_run_whose_first_epoch_the_scaler_skipped_has_not_diverged(
    tmp_path, monkeypatch
):
    """B4 (session 31): LETS' F is unmeasured while every step overflows (the GradScaler's
    warm-up); train stopped with "training diverged ... lower the learning rate or rho".

    fp16 trains on CUDA only; here it runs on the CPU (torch's CPU fp16 autocast and
    GradScaler), with a loss scale so large that every step overflows."""
    import sharpscope.trainer as trainer

    cpu_scaler = torch.amp.GradScaler
    monkeypatch.setattr(trainer, "_check_precision", lambda config, device: None)
    monkeypatch.setattr(
        torch.amp, "GradScaler", lambda device: cpu_scaler("cpu", init_scale=2.0**100)
    )
    lets = {"name": "lets", "rho": 0.05, "base": {"name": "sgd", "lr": 0.05}}
    out = tmp_path / "run"
    summary = train(
        _config(
            out,
            optimizer=lets,
            precision="fp16",
            epochs=2,
            dataset={"name": "mnist1d", "samples": 256},
        )
    )
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["lets_F"] for r in rows if r["kind"] == "eval"] == [None, None]
    # precision doubt 3: every step skipped, each halving the scale, and the rows say so
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["amp_scale"] for r in evals] == [2.0 ** (100 - r["step"]) for r in evals]
    assert summary.metrics["rho"] == 0.05  # nothing learned while every step was skipped
    assert "lets_F" not in load_checkpoint(out / "last.pt").metrics  # its numbers only


def test_a_divergence_names_the_non_finite_metrics(tmp_path):
    """B4 (session 31): "non-finite evaluation metrics" did not say which."""
    loss = step_loss_factory(
        tmp_path, "value + torch.sqrt((out * 0).sum()) if calls == 8 else value"
    )
    with pytest.raises(TrainingDiverged) as info:
        train(_config(tmp_path / "run", epochs=2, loss=loss))
    assert re.search(
        r"non-finite evaluation metrics at epoch \d: train_nll, train_ece, train_loss, ",
        str(info.value),
    )


def test_bf16_on_a_gpu_without_bfloat16_is_refused_before_any_file_is_written(
    tmp_path, monkeypatch
):
    """Doubt 9 (session 31): torch.autocast refused it inside the first step, a traceback
    after config.json was written. On a CPU-only machine the trainer's own _check_precision
    is handed a CUDA device, and torch.cuda answers as for an old GPU."""
    import sharpscope.trainer as trainer

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100")
    message = (
        "--precision bf16 needs a GPU with bfloat16 support, which Tesla P100 lacks; use "
        "--precision fp16 or fp32"
    )
    with pytest.raises(SharpscopeError) as info:
        trainer._check_precision(_config(tmp_path, precision="bf16"), torch.device("cuda"))
    assert str(info.value) == message
    trainer._check_precision(_config(tmp_path, precision="fp16"), torch.device("cuda"))
    trainer._check_precision(_config(tmp_path, precision="bf16"), torch.device("cpu"))
    _refused_as_on_a_gpu(monkeypatch, _config(tmp_path / "run", precision="bf16"), message)


def test_a_cifar_run_reads_its_own_data_back_from_python(tmp_path):
    """tvmodels doubt 3 (session 31): README's `ss.load_data(ckpt.data_spec, "train")` failed
    for a CIFAR run: the folder is a machine setting, kept in the run's config, not in its
    data spec. Checkpoint.data_root gives it back."""
    import sharpscope as ss

    write_cifar(tmp_path / "data", "cifar10")  # 30 training images
    cifar = {"name": "cifar10", "data_root": str(tmp_path / "data")}
    run = tmp_path / "run"
    train(_config(run, dataset=cifar, model={"name": "cnn", "width": 4}, epochs=1, batch_size=10))
    ckpt = ss.load_checkpoint(run / "last.pt")
    assert "data_root" not in ckpt.data_spec and ckpt.data_root == str(tmp_path / "data")
    data = ss.load_data(ckpt.data_spec, "train", data_root=ckpt.data_root)
    direct = ss.load_data(cifar, "train")
    assert torch.equal(data.inputs, direct.inputs) and torch.equal(data.targets, direct.targets)
    assert ss.load_checkpoint(_digits_run(tmp_path)).data_root is None


def _digits_run(tmp_path):
    out = tmp_path / "digits"
    train(_config(out, dataset={"name": "digits", "samples": 64}, epochs=1, batch_size=32))
    return out / "last.pt"


def _refused_as_on_a_gpu(monkeypatch, config, message):
    """``train(config)`` refused with ``message`` by the precision checks as on a CUDA
    device (this machine has none), before its output folder exists."""
    import sharpscope.trainer as trainer

    as_on_a_gpu = trainer._check_precision
    monkeypatch.setattr(
        trainer,
        "_check_precision",
        lambda config, device: as_on_a_gpu(config, torch.device("cuda")),
    )
    with pytest.raises(SharpscopeError, match=re.escape(message)):
        train(config)
    assert not Path(config.out).exists()
