"""Gap tests for mutants of sharpscope/study/{sweep,runner}.py that the suite let through
(session 24, mut_study). Each passes on the current code and fails on its mutant."""

from __future__ import annotations

import json

from sharpscope.study import study_config_from_dict
from sharpscope.study.sweep import expand_sweep, format_value


def _config(sweep, train=None, analysis=None, name="gaps"):
    sections = {
        "study": {"name": name},
        "train": {
            "dataset": {"name": "mnist1d"},
            "model": {"name": "mlp"},
            "epochs": 2,
            **(train or {}),
        },
        "sweep": sweep,
    }
    if analysis is not None:
        sections["analysis"] = analysis
    return study_config_from_dict(sections)


# S05 sweep.py format_value: f"{value:g}" -> f"{value:.2g}"
def test_run_ids_and_columns_keep_every_digit_of_a_value():
    assert format_value(0.125) == "0.125"
    assert format_value(0.0125) == "0.0125"
    assert format_value(1.5e-4) == "0.00015"
    ids = [r.run_id for r in expand_sweep(_config({"optimizer": ["sgd"], "lr": [0.125, 0.12]}))]
    assert ids == ["sgd-lr0.125-s0", "sgd-lr0.12-s0"]


# S09 sweep.py: params["seed"] from the sweep only (train.seed ignored in the record)
def test_an_unswept_train_seed_is_the_recorded_seed():
    runs = expand_sweep(_config({"optimizer": ["sgd", "sam"]}, train={"seed": 3}))
    assert [(r.run_id, r.params["seed"], r.train["seed"]) for r in runs] == [
        ("sgd-s3", 3, 3),
        ("sam-s3", 3, 3),
    ]


# S12 sweep.py _applies: rho applies to bSAM too (config.py: "rho to the sharpness-aware
# optimizers and bSAM")
def test_a_rho_sweep_reaches_bsam():
    runs = expand_sweep(_config({"optimizer": ["sgd", "bsam"], "rho": [0.01, 0.02]}))
    got = [(r.run_id, r.params["rho"], r.train["optimizer"].get("rho")) for r in runs]
    assert got == [
        ("sgd-s0", None, None),
        ("bsam-rho0.01-s0", 0.01, 0.01),
        ("bsam-rho0.02-s0", 0.02, 0.02),
    ]


# R17 runner.py _check_saved_epochs: `e < last` -> `e <= last` (the last epoch is last.pt)
def test_asking_for_only_the_last_epoch_of_a_trained_run_is_accepted(tmp_path):
    from sharpscope.study.runner import check_study_dir, prepare_study_dir

    train = {"epochs": 4}
    old = _config({"optimizer": ["sgd"]}, train=train, analysis={"epochs": [2]})
    runs = expand_sweep(old)
    assert runs[0].train["save_every"] == 2
    prepare_study_dir(tmp_path, old, runs)
    run_dir = tmp_path / "runs" / "sgd-s0"
    (run_dir / "status.json").write_text('{"state": "trained"}')
    (run_dir / "epoch_002.pt").write_bytes(b"")  # kept; epoch_004.pt pruned ("analysed")
    (run_dir / "last.pt").write_bytes(b"")
    new = _config({"optimizer": ["sgd"]}, train=train, analysis={"epochs": ["last"]})
    new_runs = expand_sweep(new)
    assert new_runs[0].train["save_every"] == 0
    check_study_dir(tmp_path, new, new_runs)  # epoch 4 is last.pt: nothing is missing


# R18 runner.py collect_rows: a run that raised ("error") treated like a diverged one
def test_a_run_that_raised_keeps_a_row_per_analysed_epoch(tmp_path):
    from sharpscope.study.runner import collect_rows, prepare_study_dir

    config = _config({"optimizer": ["sgd"]}, analysis={"epochs": [1, "last"]})
    prepare_study_dir(tmp_path, config, expand_sweep(config))
    run_dir = tmp_path / "runs" / "sgd-s0"
    (run_dir / "status.json").write_text('{"state": "error", "error": "boom"}')
    evals = [{"kind": "eval", "epoch": e, "train_acc": 0.9, "test_acc": {1: 0.7, 2: 0.6}[e],
              "train_loss": 0.1, "test_loss": 0.3} for e in (1, 2)]  # fmt: skip
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    rows = collect_rows(tmp_path)
    got = [(r["status"], r["epoch"], r.get("test_acc"), r.get("error")) for r in rows]
    assert got == [("error", 1, 0.7, "boom"), ("error", 2, 0.6, "boom")]


# R19 runner.py _analysis_split: the analysis subset is drawn with analysis.seed
def test_the_analysis_subset_is_drawn_with_the_analysis_seed():
    import torch

    from sharpscope.data import load_data
    from sharpscope.study.runner import _analysis_split

    config = _config({"optimizer": ["sgd"]}, analysis={"samples": 64, "seed": 3})
    run = expand_sweep(config)[0]
    split, spec = _analysis_split(run, config)
    want = load_data(run.train["dataset"], "train", samples=64, seed=3)
    other = load_data(run.train["dataset"], "train", samples=64, seed=4)
    assert not torch.equal(want.inputs, other.inputs)  # the seed matters for this data
    assert torch.equal(split.inputs, want.inputs)
    assert torch.equal(split.targets, want.targets)


# R20 runner.py run_states: a trained run whose analyses are to come reads "analysing"
def test_a_trained_run_is_analysing_in_study_status(tmp_path):
    from sharpscope.study.runner import prepare_study_dir, run_states

    config = _config({"optimizer": ["sgd"]})
    prepare_study_dir(tmp_path, config, expand_sweep(config))
    (tmp_path / "runs" / "sgd-s0" / "status.json").write_text('{"state": "trained"}')
    assert [s["state"] for s in run_states(tmp_path)] == ["analysing"]
