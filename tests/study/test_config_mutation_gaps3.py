"""Mutation gaps in sharpscope/study/config.py (session 25): defaults as the specs give them,
sweep axes kept apart, values round-tripped, legitimate values accepted."""

from __future__ import annotations

import pytest

from sharpscope.errors import SharpscopeError
from sharpscope.study import expand_sweep, load_study_config, study_config_from_dict
from sharpscope.study.config import optimizer_name

TRAIN = {"dataset": {"name": "mnist1d"}, "model": {"name": "mlp", "width": 16}, "epochs": 4}


def config(**sections):
    return study_config_from_dict({"train": TRAIN, **sections})


# kills C02: SAM-ON dropped from the optimizers the m axis applies to (interface: m applies
# to SAM, ASAM and SAM-ON; the axis would collapse to one run with m recorded empty)
def test_the_m_axis_applies_to_sam_asam_and_samon_only():
    train = {**TRAIN, "model": {"name": "mlp", "width": 16, "norm": "batch"}}  # for SAM-ON
    sweep = {"optimizer": ["sgd", "sam", "asam", "samon", "vasso"], "m": [4, 8]}
    runs = expand_sweep(study_config_from_dict({"train": train, "sweep": sweep}))
    got = sorted(
        (r.params["optimizer"], r.params["m"], r.train["optimizer"].get("m")) for r in runs
    )
    assert got == [
        ("asam", 4, 4),
        ("asam", 8, 8),
        ("sam", 4, 4),
        ("sam", 8, 8),
        ("samon", 4, 4),
        ("samon", 8, 8),
        ("sgd", None, None),
        ("vasso", None, None),
    ]


# kills C05: an optimizer listed twice in sweep.optimizer accepted (every run trained twice
# under one run id)
def test_an_optimizer_listed_twice_is_refused():
    with pytest.raises(SharpscopeError, match="sweep.optimizer lists an optimizer twice"):
        config(sweep={"optimizer": ["sam", "sgd", "sam"]})


# kills C06 (samples 1024 -> 512), C08 (split), C22 (keep_checkpoints "analysed": epoch
# checkpoints deleted by default), C19 (name not the file's stem)
def test_the_study_and_analysis_defaults(tmp_path):
    path = tmp_path / "my-study.toml"
    path.write_text('[train]\ndataset = {name = "mnist1d"}\nmodel = {name = "mlp", width = 16}\n')
    study = load_study_config(path)
    assert study.name == "my-study"
    assert study.keep_checkpoints == "all"
    assert study.description == "" and study.reproduction is None
    plan = study.analysis
    assert (plan.epochs, plan.samples, plan.split, plan.batch_size, plan.seed, plan.device) == (
        ["last"],
        1024,
        "train",
        None,
        0,
        None,
    )
    assert plan.measures == {}
    assert study.sweep == {"optimizer": ["sgd"]}


# kills C07: repeated analysis epochs kept (each measured twice)
def test_repeated_analysis_epochs_are_measured_once_in_the_given_order():
    assert config(analysis={"epochs": [2, "last", 2, 4, "last"]}).analysis.epochs == [2, "last", 4]


# kills C09, C10, C11, C12: the study defaults of analysis.md section 5 (m 128, SAM's rho
# grid 0.05/0.1, ASAM's 0.5/1.0, 20 Auto-PGD steps, L2)
def test_m_sharpness_and_adaptive_sharpness_defaults():
    measures = config(analysis={"m_sharpness": {}, "adaptive_sharpness": {}}).analysis.measures
    assert measures["m_sharpness"] == {"m": [128], "rho": [0.05, 0.1], "steps": 20, "norm": "l2"}
    assert measures["adaptive_sharpness"] == {
        "m": [128],
        "rho": [0.5, 1.0],
        "steps": 20,
        "norm": "l2",
    }


# kills C13 (adaptive_rho not defaulting to rho), C14 (pac_bayes magnitude_aware [False,
# True]), C15 (keskar epsilon [1e-3, 5e-4]), C16 (landscape dims [1])
def test_the_other_measures_defaults():
    measures = config(
        analysis={"average_sharpness": {}, "pac_bayes": {}, "keskar": {}, "landscape": {}}
    ).analysis.measures
    assert measures["average_sharpness"] == {
        "rho": [0.05],
        "adaptive": [False],
        "adaptive_rho": [0.05],
    }
    given = config(analysis={"average_sharpness": {"rho": [0.1, 0.2], "adaptive": [True]}})
    assert given.analysis.measures["average_sharpness"]["adaptive_rho"] == [0.1, 0.2]
    assert measures["pac_bayes"] == {"magnitude_aware": [False, True]}
    assert measures["keskar"] == {"epsilon": [1e-3, 5e-4]}
    assert measures["landscape"] == {"dims": [1]}


# kills C17 (samples "all" written without its key, read back as 1024), C18 (reproduction
# dropped), C29 ("all" read as 1024), C30 (analysis seed dropped)
def test_to_dict_round_trips_all_samples_reproduction_and_seed():
    study = study_config_from_dict(
        {
            "study": {"name": "x", "reproduction": "b", "keep_checkpoints": "analysed"},
            "train": TRAIN,
            "analysis": {"samples": "all", "seed": 7, "split": "test", "m_sharpness": {"m": 16}},
        }
    )
    assert study.analysis.samples is None and study.analysis.seed == 7
    sections = study.to_dict()
    assert sections["analysis"]["samples"] == "all"
    assert sections["study"] == {
        "name": "x",
        "description": "",
        "keep_checkpoints": "analysed",
        "reproduction": "b",
    }
    again = study_config_from_dict(sections)
    assert again.analysis.to_dict() == study.analysis.to_dict()
    assert (again.reproduction, again.keep_checkpoints, again.name) == ("b", "analysed", "x")


# kills C20: rho = 0 refused in a sweep (the rho = 0 control run reduces SAM to its base)
def test_a_zero_rho_momentum_and_weight_decay_are_valid_sweep_values():
    runs = expand_sweep(
        config(
            sweep={
                "optimizer": ["sam"],
                "rho": [0.0, 0.05],
                "weight_decay": [0.0],
                "momentum": [0.0],
            }
        )
    )
    assert sorted(r.train["optimizer"]["rho"] for r in runs) == [0.0, 0.05]
    assert {r.train["optimizer"]["base"]["weight_decay"] for r in runs} == {0.0}
    assert {r.train["optimizer"]["base"]["momentum"] for r in runs} == {0.0}


# kills C21: m equal to analysis.samples refused (m = n is SAM's full-set sharpness)
def test_m_equal_to_the_analysis_samples_is_accepted_and_one_more_refused():
    plan = config(analysis={"samples": 256, "m_sharpness": {"m": [16, 256]}}).analysis
    assert plan.measures["m_sharpness"]["m"] == [16, 256]
    with pytest.raises(SharpscopeError, match="m 257 is larger than the 256 examples"):
        config(analysis={"samples": 256, "m_sharpness": {"m": [257]}})


# kills C23: a list axis cut to its first value
def test_every_value_of_a_list_axis_gives_runs():
    runs = expand_sweep(
        config(sweep={"optimizer": ["sgd", "sam"], "seed": [0, 1, 2], "rho": [0.05, 0.1]})
    )
    assert sorted(
        (r.params["optimizer"], r.params["rho"], r.params["seed"]) for r in runs
    ) == sorted(
        [("sgd", None, s) for s in (0, 1, 2)]
        + [("sam", rho, s) for rho in (0.05, 0.1) for s in (0, 1, 2)]
    )


# kills C24: optimizer_name returning the label instead of the optimizer it names
def test_a_label_names_its_optimizer():
    optimizers = {"sam-adam": {"name": "sam", "base": {"name": "adam"}}, "asam": {"rho": 1.0}}
    assert optimizer_name("sam-adam", optimizers) == "sam"
    assert optimizer_name("asam", optimizers) == "asam"
    assert optimizer_name("sgd", optimizers) == "sgd"
    runs = expand_sweep(
        config(optimizers=optimizers, sweep={"optimizer": ["sam-adam"], "rho": [0.1, 0.2]})
    )
    assert sorted(r.train["optimizer"]["rho"] for r in runs) == [0.1, 0.2]  # rho applies
    assert {r.params["optimizer_name"] for r in runs} == {"sam"}


# kills C25: spectrum max_steps equal to k refused (k steps can give k eigenvalues)
def test_spectrum_max_steps_equal_to_k_is_accepted():
    plan = config(analysis={"spectrum": {"k": 5, "max_steps": 5}}).analysis
    assert plan.measures["spectrum"] == {"k": 5, "max_steps": 5}
    with pytest.raises(SharpscopeError, match="max_steps 4 is fewer than k 5"):
        config(analysis={"spectrum": {"k": 5, "max_steps": 4}})


# kills C26: label_noise 1.0 (no clean label left) accepted
def test_label_noise_axis_bounds():
    runs = expand_sweep(config(sweep={"label_noise": [0.0, 0.99]}))
    assert sorted(r.params["label_noise"] for r in runs) == [0.0, 0.99]
    with pytest.raises(SharpscopeError, match=r"sweep.label_noise must be in \[0, 0.99\], got 1.0"):
        config(sweep={"label_noise": [1.0]})


# kills C27: a per-optimizer axis table merged into one list for every optimizer
def test_a_per_optimizer_axis_keeps_each_optimizers_own_values():
    study = config(
        sweep={"optimizer": ["sam", "asam"], "rho": {"sam": [0.05, 0.1], "asam": [0.5, 1.0]}}
    )
    assert study.sweep["rho"] == {"sam": [0.05, 0.1], "asam": [0.5, 1.0]}
    runs = expand_sweep(study)
    assert sorted((r.params["optimizer"], r.params["rho"]) for r in runs) == [
        ("asam", 0.5),
        ("asam", 1.0),
        ("sam", 0.05),
        ("sam", 0.1),
    ]


# kills C28: a relative loss factory file kept relative (the runs resolve it from elsewhere)
def test_a_relative_loss_factory_is_recorded_absolute(tmp_path, monkeypatch):
    (tmp_path / "losses.py").write_text("def l1():\n    return None\n")
    monkeypatch.chdir(tmp_path)
    study = config(train={**TRAIN, "loss": "losses.py:l1"})
    assert study.train["loss"] == f"{tmp_path}/losses.py:l1"
    assert study_config_from_dict({"train": {**TRAIN, "loss": "mse"}}).train["loss"] == "mse"
