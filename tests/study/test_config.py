"""Study config validation and sweep expansion: semantics and one-line errors."""

from __future__ import annotations

import pytest
import torch

from sharpscope.analysis.msharpness import m_sharpness
from sharpscope.errors import SharpscopeError
from sharpscope.study import (
    builtin_config_names,
    expand_sweep,
    load_builtin_config,
    load_study_config,
    study_config_from_dict,
)
from sharpscope.study.measures import measure_adaptive_sharpness
from sharpscope.study.sweep import resolve_epochs, swept_axes

TRAIN = {"dataset": {"name": "mnist1d"}, "model": {"name": "mlp", "width": 16}, "epochs": 4}


def config(**sections):
    return study_config_from_dict({"train": TRAIN, **sections})


def test_rho_applies_only_to_sharpness_aware_optimizers():
    runs = expand_sweep(
        config(sweep={"optimizer": ["sgd", "sam", "asam"], "rho": [0.05, 0.1], "seed": [0, 1]})
    )
    by_optimizer = {}
    for run in runs:
        by_optimizer.setdefault(run.params["optimizer"], []).append(run)
    assert len(by_optimizer["sgd"]) == 2  # once per seed
    assert len(by_optimizer["sam"]) == len(by_optimizer["asam"]) == 4
    assert {r.params["rho"] for r in by_optimizer["sgd"]} == {None}
    assert {r.train["optimizer"]["rho"] for r in by_optimizer["sam"]} == {0.05, 0.1}
    sam = by_optimizer["sam"][0].train["optimizer"]
    assert sam["base"] == {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    assert len({r.run_id for r in runs}) == len(runs)


def test_per_optimizer_axis_values_and_defaults():
    runs = expand_sweep(
        config(
            optimizers={"asam": {"rho": 1.0}, "base": {"lr": 0.05}},
            sweep={"optimizer": ["sam", "asam", "vasso"], "rho": {"sam": [0.02, 0.2]}},
        )
    )
    rhos = {(r.params["optimizer"], r.params["rho"]) for r in runs}
    # ASAM keeps its configured rho, VaSSO its documented default
    assert rhos == {("sam", 0.02), ("sam", 0.2), ("asam", 1.0), ("vasso", 0.05)}
    assert all(r.params["lr"] == 0.05 for r in runs)


def test_m_lr_noise_batch_axes_reach_the_train_config():
    runs = expand_sweep(
        config(
            sweep={
                "optimizer": ["sgd", "sam", "bsam"],
                "m": [16, 64],
                "lr": [0.05, 0.1],
                "label_noise": [0.0, 0.4],
                "batch_size": [64],
            }
        )
    )
    sam = [r for r in runs if r.params["optimizer"] == "sam"]
    assert len(sam) == 2 * 2 * 2
    assert {r.train["optimizer"]["m"] for r in sam} == {16, 64}
    assert {r.train["optimizer"]["base"]["lr"] for r in sam} == {0.05, 0.1}
    assert {r.train["dataset"]["label_noise"] for r in sam} == {0.0, 0.4}
    assert {r.train["batch_size"] for r in runs} == {64}
    bsam = [r for r in runs if r.params["optimizer"] == "bsam"]
    assert len(bsam) == 4  # m does not apply; lr sets bSAM's own lr
    assert {r.train["optimizer"]["lr"] for r in bsam} == {0.05, 0.1}
    assert all(r.params["m"] is None and r.params["momentum"] is None for r in bsam)
    assert set(swept_axes(runs)) >= {"optimizer", "m", "lr", "label_noise"}
    ids = [r.run_id for r in sam]
    assert "sam-m16-lr0.05-noise0-s0" in ids and "sam-m64-lr0.1-noise0.4-s0" in ids


def test_width_depth_and_epochs_axes_reach_the_train_config():
    """Every swept width, depth and epochs value is the one trained (depth and epochs could be
    recorded in params without reaching train)."""
    runs = expand_sweep(
        config(sweep={"optimizer": ["sgd"], "width": [8, 16], "depth": [1, 2], "epochs": [2, 3]})
    )
    assert len(runs) == 8
    for run in runs:
        assert run.train["model"]["width"] == run.params["width"]
        assert run.train["model"]["depth"] == run.params["depth"]
        assert run.train["epochs"] == run.params["epochs"]
    trained = {
        (r.train["model"]["width"], r.train["model"]["depth"], r.train["epochs"]) for r in runs
    }
    assert len(trained) == 8


def test_analysis_epochs_set_save_every():
    runs = expand_sweep(config(analysis={"epochs": [2, "last"]}))
    assert runs[0].analysis_epochs == [2, 4]
    assert runs[0].train["save_every"] == 2
    assert resolve_epochs(["last"], 7) == [7]
    with pytest.raises(
        SharpscopeError, match="asks for epoch 9, but the 'sgd' runs train only 4 epochs"
    ):
        expand_sweep(config(analysis={"epochs": [9]}))


def test_analysis_epochs_that_are_not_multiples_of_the_first_are_all_saved():
    """save_every divides every analysed epoch (their gcd): epochs 2 and 3 need 1, else
    epoch_003.pt is never written (the smallest epoch, 2, passed the [2, 4] test)."""
    (run,) = expand_sweep(config(analysis={"epochs": [2, 3, "last"]}))
    assert run.analysis_epochs == [2, 3, 4]
    assert run.train["save_every"] == 1


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"sweeep": {}}, "unknown key 'sweeep' in the study config (top level); valid keys: study"),
        (
            {"sweep": {"optimiser": ["sgd"]}},
            "unknown key 'optimiser' in [sweep]; valid keys: optimizer",
        ),
        (
            {"sweep": {"optimizer": ["sgdd"]}},
            "unknown optimizer 'sgdd' in sweep.optimizer; choose one of: adam",
        ),
        ({"sweep": {"rho": [-1.0]}}, "sweep.rho must be in [0, inf], got -1.0"),
        ({"sweep": {"seed": ["a"]}}, "sweep.seed values must be an integer from 0 to 2^62"),
        ({"sweep": {"seed": [2**63]}}, "sweep.seed values must be an integer from 0 to 2^62"),
        (
            {"sweep": {"optimizer": ["sgd"], "rho": {"sam": [0.1]}}},
            "names optimizer 'sam', which is not in sweep.optimizer",
        ),
        (
            {"sweep": {"optimizer": ["sgd"], "momentum": {"sgd": [0.5]}, "rho": {"sgd": [0.1]}}},
            "gives values for 'sgd', but rho does not apply to sgd",
        ),
        (
            {"analysis": {"spectrum": {"kk": 5}}},
            "unknown key 'kk' in [analysis.spectrum]; valid keys: k,",
        ),
        (
            {"analysis": {"msharpness": {}}},
            "unknown key 'msharpness' in [analysis]; valid keys: epochs",
        ),
        (
            {"analysis": {"m_sharpness": {"norm": "l3"}}},
            "unknown analysis.m_sharpness.norm 'l3'; choose one of: l2, linf",
        ),
        (
            {"analysis": {"adaptive_sharpness": {"projection": "ball"}}},
            "unknown analysis.adaptive_sharpness.projection 'ball'; choose one of: exact, rescale",
        ),
        (
            {"analysis": {"m_sharpness": {"projection": "rescale"}}},
            "unknown key 'projection' in [analysis.m_sharpness]",
        ),
        (
            {"analysis": {"split": "val"}},
            "unknown analysis.split 'val'; choose one of: train, test",
        ),
        (
            {"study": {"keep_checkpoints": "some"}},
            "unknown study.keep_checkpoints 'some'; choose one of: all, analysed",
        ),
        (
            {"optimizers": {"sam": {"name": "sharp"}}},
            "unknown optimizer 'sharp' in optimizers.sam; choose one of",
        ),
        ({"executor": {"partition": "gpu"}}, "unknown key 'partition' in [executor]"),
        ({"analysis": {"device": "mps"}}, "unknown device 'mps'; choose one of: auto, cpu"),
    ],
)
def test_bad_configs_raise_one_line_naming_the_key_and_the_choices(sections, message):
    with pytest.raises(SharpscopeError) as info:
        config(**sections)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize(
    ("analysis", "message"),
    [
        # each was a traceback, silently read the other way, or failed only after every
        # run had trained
        ({"seed": "abc"}, "analysis.seed must be an integer from 0 to 2^62, got 'abc'"),
        ({"samples": 0}, 'analysis.samples must be a positive integer or "all", got 0'),
        (
            {"samples": "every"},
            "analysis.samples must be a positive integer or \"all\", got 'every'",
        ),
        (
            {"seed": 2**64},
            "analysis.seed must be an integer from 0 to 2^62, got 18446744073709551616",
        ),
        ({"seed": 1.5}, "analysis.seed must be an integer from 0 to 2^62, got 1.5"),
        (
            {"average_sharpness": {"adaptive": "false"}},
            "analysis.average_sharpness.adaptive must be true or false, got 'false'",
        ),
        (
            {"pac_bayes": {"magnitude_aware": "no"}},
            "analysis.pac_bayes.magnitude_aware must be true or false",
        ),
        (
            {"samples": 128, "m_sharpness": {"m": [1024]}},
            "analysis.m_sharpness.m 1024 is larger than the 128 examples of analysis.samples",
        ),
        ({"m_sharpness": {"rho": [0.0]}}, "analysis.m_sharpness.rho must be a number > 0"),
        ({"m_sharpness": {"seed": "x"}}, "analysis.m_sharpness.seed must be an integer from 0"),
        ({"spectrum": {"tol": "x"}}, "analysis.spectrum.tol must be a number"),
        ({"spectrum": {"k": 5, "max_steps": 2}}, "max_steps 2 is fewer than k 5"),
        ({"pac_bayes": {"num_draws": 0}}, "analysis.pac_bayes.num_draws must be a positive"),
        ({"keskar": {"iterations": -3}}, "analysis.keskar.iterations must be a positive"),
        ({"keskar": {"epsilon": [0.0]}}, "analysis.keskar.epsilon must be a number > 0"),
        ({"landscape": {"span": "x"}}, "analysis.landscape.span must be a number"),
        # a slice needs 3 points per axis: refused before any training, not after each run
        ({"landscape": {"grid": 2}}, "analysis.landscape.grid must be at least 3 points per axis"),
        ({"landscape": {"norm": "unit"}}, "unknown analysis.landscape.norm 'unit'; choose one"),
    ],
)
def test_bad_analysis_values_are_refused_before_anything_trains(analysis, message):
    with pytest.raises(SharpscopeError) as info:
        config(analysis=analysis)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_bad_optimizer_value_is_refused_before_the_other_runs_train():
    """`sam = {rho = "big"}` let the SGD runs train, then failed every SAM run."""
    with pytest.raises(SharpscopeError, match="optimizer 'sam': rho must be a number >= 0"):
        study_config_from_dict(
            {"train": {"epochs": 1}, "sweep": {"optimizer": ["sgd", "sam"]},
             "optimizers": {"sam": {"rho": "big"}}}
        )  # fmt: skip


def test_bad_train_section_names_the_key():
    with pytest.raises(
        SharpscopeError, match="unknown key 'epoch' in \\[train\\]; valid keys: dataset"
    ):
        study_config_from_dict({"train": {"epoch": 3}})
    with pytest.raises(SharpscopeError, match="train.out is set by the study"):
        study_config_from_dict({"train": {"out": "x"}})


def test_toml_file_round_trip_and_errors(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        '[train]\nepochs = 2\nmodel = {name = "mlp", width = 8}\n'
        '[sweep]\noptimizer = ["sgd", "sam"]\nseed = [0, 1]\n'
    )
    loaded = load_study_config(path)
    assert loaded.name == "mine" and len(expand_sweep(loaded)) == 4
    again = study_config_from_dict(loaded.to_dict())
    assert [r.to_dict() for r in expand_sweep(again)] == [r.to_dict() for r in expand_sweep(loaded)]
    (tmp_path / "bad.toml").write_text("[train\n")
    with pytest.raises(SharpscopeError, match="is not valid TOML"):
        load_study_config(tmp_path / "bad.toml")
    with pytest.raises(SharpscopeError, match="study config not found"):
        load_study_config(tmp_path / "missing.toml")
    with pytest.raises(SharpscopeError, match="is a folder, not a TOML file"):
        load_study_config(tmp_path)
    (tmp_path / "binary.toml").write_bytes(bytes(range(128, 256)))
    with pytest.raises(SharpscopeError, match="not UTF-8 text"):
        load_study_config(tmp_path / "binary.toml")


def test_every_shipped_config_is_valid():
    names = builtin_config_names()
    assert "quick" in names
    for letter in "abcdef":
        assert any(n.startswith(f"{letter}-") and n.endswith("-quick") for n in names), letter
        assert any(n.startswith(f"{letter}-") and n.endswith("-full") for n in names), letter
    for name in names:
        study = load_builtin_config(name)
        assert expand_sweep(study), name
    with pytest.raises(SharpscopeError, match="unknown built-in study 'nope'; choose one of"):
        load_builtin_config("nope")


@pytest.mark.parametrize(
    "train, sweep, message",
    [
        # each of these created the study folder, failed every run and wrote an empty report
        ({"dataset": {"name": "nosuch"}}, {}, "unknown data set 'nosuch'; choose one of: cifar10"),
        ({"model": {"name": "nosuch"}}, {}, "unknown model 'nosuch'; choose one of: cnn, cnn1d"),
        ({"model": {"name": "mlp", "widht": 3}}, {}, "model 'mlp' has no option 'widht'"),
        ({"model": {"name": "mlp", "width": 0}}, {}, "model 'mlp': option width=0 is invalid"),
        ({"model": {"name": "resnet20"}}, {}, "model 'resnet20' expects inputs of shape (C, H, W)"),
        ({}, {"model": [{"name": "mlp"}, {"name": "nosuch"}]}, "unknown model 'nosuch'"),
        ({"model": {"name": "vit"}}, {"width": [8, 16]}, "model 'vit' has no option 'width'"),
        ({"dataset": {"name": "mnist1d", "colour": 1}}, {}, "unknown data option 'colour'"),
        ({"dataset": {"name": "mnist1d", "samples": 0}}, {}, "samples must be an integer >= 1"),
        ({"loss": "hinge"}, {}, "unknown loss 'hinge'; choose one of: cross_entropy, mse"),
        ({"device": "gpu"}, {}, "unknown device 'gpu'; choose one of: auto, cpu"),
        ({"model": "no_such_pkg_q.models:net"}, {}, "put the folder holding it on PYTHONPATH"),
    ],
    ids=[
        "dataset",
        "model",
        "model-option",
        "model-value",
        "model-for-other-data",
        "sweep-model",
        "sweep-width",
        "data-option",
        "data-value",
        "loss",
        "device",
        "module-factory",
    ],
)
def test_data_model_and_loss_are_resolved_when_the_config_is_loaded(train, sweep, message):
    with pytest.raises(SharpscopeError) as info:
        study_config_from_dict({"train": {**TRAIN, **train}, "sweep": sweep})
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_factory_files_are_checked_and_recorded_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fac").mkdir()
    (tmp_path / "fac" / "parts.py").write_text("def net():\n    pass\ndef data():\n    pass\n")
    for key, value, kind in (
        ("model", "fac/gone.py:net", "model"),
        ("dataset", "fac/gone.py:data", "data set"),
        ("loss", "fac/gone.py:loss", "loss"),
    ):
        with pytest.raises(SharpscopeError, match=f"^{kind} factory file not found: {tmp_path}"):
            study_config_from_dict({"train": {**TRAIN, key: value}})
    loaded = study_config_from_dict(
        {
            "train": {**TRAIN, "model": "fac/parts.py:net", "loss": "mse"},
            "sweep": {"model": [{"factory": "fac/parts.py:net"}, {"name": "mlp"}]},
        }
    )
    where = f"{tmp_path}/fac/parts.py:net"
    assert loaded.train["model"] == {"factory": where}
    assert loaded.sweep["model"][0] == {"factory": where}
    assert {r.train["model"].get("factory") for r in expand_sweep(loaded)} == {where, None}
    # a finished study is read back (report, status) without its factories
    (tmp_path / "fac" / "parts.py").unlink()
    with pytest.raises(SharpscopeError, match="model factory file not found"):
        study_config_from_dict(loaded.to_dict())
    again = study_config_from_dict(loaded.to_dict(), check_files=False)
    assert again.train["model"] == {"factory": where}


def test_a_study_naming_an_unknown_data_set_writes_nothing(tmp_path):
    from sharpscope.study.runner import run_study

    path = tmp_path / "bad.toml"
    path.write_text(
        '[train]\nepochs = 1\ndataset = {name = "nosuch"}\n[sweep]\noptimizer = ["sgd"]\n'
    )
    with pytest.raises(SharpscopeError, match="unknown data set 'nosuch'"):
        run_study(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("projection", ["exact", "rescale"])
def test_adaptive_sharpness_projection_reaches_the_measurement(projection):
    """The study's adaptive m-sharpness runs with the configured projection (default exact)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    data = (torch.randn(16, 4), torch.randint(0, 3, (16,)))
    options = {"m": [8], "rho": [0.5], "steps": 3}
    if projection != "exact":
        options["projection"] = projection
    plan = config(analysis={"adaptive_sharpness": options}).analysis
    options = plan.measures["adaptive_sharpness"]
    columns, payload = measure_adaptive_sharpness(
        model, data, "cross_entropy", options, {"seed": 0}
    )
    [result] = payload["results"]
    assert result["projection"] == projection and result["steps"] == 3
    want = m_sharpness(model, data, m=8, rho=0.5, adaptive=True, steps=3, projection=projection)
    assert columns["adaptive_sharpness"] == pytest.approx(want.sharpness, rel=1e-12)


def test_average_sharpness_uses_adaptive_rho_for_the_adaptive_variant():
    """Each column equals average_sharpness at its own radius: rho for the plain variant,
    adaptive_rho for the adaptive one (swapped radii passed)."""
    from sharpscope.analysis.measures import average_sharpness
    from sharpscope.study.measures import measure_average_sharpness

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    data = (torch.randn(32, 6), torch.randint(0, 3, (32,)))
    options = {"adaptive": [False, True], "rho": [0.01], "adaptive_rho": [0.5], "num_draws": 4}
    options = config(analysis={"average_sharpness": options}).analysis.measures["average_sharpness"]
    columns, _ = measure_average_sharpness(model, data, "cross_entropy", options, {"seed": 0})
    assert set(columns) == {
        "avgsharp_rho0.01",
        "avgsharp_rho0.01_stderr",
        "avgsharp_ada_rho0.5",
        "avgsharp_ada_rho0.5_stderr",
    }
    for name, rho, adaptive in (
        ("avgsharp_rho0.01", 0.01, False),
        ("avgsharp_ada_rho0.5", 0.5, True),
    ):
        direct = average_sharpness(model, data, rho, adaptive=adaptive, num_draws=4, seed=0)
        assert columns[name] == pytest.approx(direct.sharpness, rel=1e-6), name
        # the Monte Carlo error a reader needs to judge the column (it was only in the JSON)
        assert columns[f"{name}_stderr"] == pytest.approx(direct.stderr, rel=1e-6), name
    from sharpscope.study.measures import is_measure_column

    assert not is_measure_column("avgsharp_rho0.01_stderr")  # not correlated as a measure


def test_lambda_5_is_the_fifth_eigenvalue_when_more_are_computed():
    """lambda_5 and the ratio use the fifth eigenvalue with k = 7 (the last computed one passed,
    as every other test uses k = 5)."""
    from sharpscope.study.measures import measure_spectrum

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    data = (torch.randn(64, 8), torch.randint(0, 4, (64,)))
    options = {"k": 7, "tol": 1e-4, "max_steps": 60, "trace_probes": 6, "num_probes": 1,
               "num_lanczos_steps": 10}  # fmt: skip
    options = config(analysis={"spectrum": options}).analysis.measures["spectrum"]
    columns, payload = measure_spectrum(
        model, data, "cross_entropy", options, {"seed": 0, "batch_size": None}
    )
    eigenvalues = payload["eigenvalues"]
    assert len(eigenvalues) == 7 and eigenvalues[4] > eigenvalues[6]  # largest first
    assert columns["lambda_5"] == pytest.approx(eigenvalues[4])
    assert columns["ratio"] == pytest.approx(eigenvalues[0] / eigenvalues[4])


@pytest.mark.parametrize(
    ("spectrum", "words"),
    [
        ({"trace_probes": 10}, ["Hutch++", "multiple of 3", "10"]),
        ({"trace_probes": 1, "trace_method": "hutchinson"}, ["Hutchinson", "at least 2"]),
        ({"num_probes": 0}, ["analysis.spectrum.num_probes", "positive integer"]),
        ({"max_steps": -1}, ["analysis.spectrum.max_steps"]),
        ({"kernel": "gauss"}, ["kernel", "papyan"]),
        ({"which": "SM"}, ["which", "LA"]),
    ],
)
def test_spectrum_options_are_checked_before_any_run_trains(spectrum, words):
    """A study would otherwise train every run, then fail each one's analysis."""
    with pytest.raises(SharpscopeError) as error:
        config(analysis={"spectrum": spectrum})
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_spectrum_options_a_run_can_use_pass_the_check():
    options = {"trace_probes": 4, "trace_method": "hutchinson", "kernel": "papyan", "k": 3}
    assert config(analysis={"spectrum": options}).analysis.measures["spectrum"]["k"] == 3
    assert config(analysis={"spectrum": {"trace_probes": 9}}).analysis.measures["spectrum"]


@pytest.mark.parametrize("text", ["", "[study]\nname = 'x'\n", "[train]\n"])
def test_a_config_file_that_names_nothing_to_train_is_refused(tmp_path, text):
    path = tmp_path / "empty.toml"
    path.write_text(text)
    with pytest.raises(SharpscopeError, match=r"no \[train\] or \[sweep\] table"):
        load_study_config(path)


def test_unconverged_top_eigenvalues_are_counted_in_their_own_column():
    """With two Lanczos steps the top 3 cannot all converge: the column says how many did
    not (the report names such runs); it is not a measure, so it is never correlated."""
    from sharpscope.study.measures import is_measure_column, measure_spectrum

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    data = (torch.randn(64, 8), torch.randint(0, 4, (64,)))
    common = {"seed": 0, "batch_size": None}
    base = {"k": 3, "trace_probes": 6, "num_probes": 1, "num_lanczos_steps": 6}
    few = config(analysis={"spectrum": {**base, "max_steps": 3}}).analysis.measures["spectrum"]
    columns, payload = measure_spectrum(model, data, "cross_entropy", few, common)
    unconverged = sum(not c for c in payload["converged"])
    assert unconverged > 0 and columns["spectrum_unconverged"] == unconverged
    assert type(columns["spectrum_unconverged"]) is int  # a count: "2" in results.csv, not "2.0"
    many = config(analysis={"spectrum": {**base, "max_steps": 80}}).analysis.measures["spectrum"]
    columns, _ = measure_spectrum(model, data, "cross_entropy", many, common)
    assert columns["spectrum_unconverged"] == 0
    assert not is_measure_column("spectrum_unconverged")


def test_a_pinned_hvp_mode_reaches_the_spectrum_and_a_bad_one_is_refused():
    """hvp_mode "auto" times both products on the machine as it is; pinned, a rerun on a
    busy machine cannot pick the other one (results bit-identical)."""
    from sharpscope.study.measures import measure_spectrum

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    data = (torch.randn(32, 8), torch.randint(0, 4, (32,)))
    base = {"k": 2, "trace_probes": 6, "num_probes": 1, "num_lanczos_steps": 5, "max_steps": 20}
    for mode in ("forward", "reverse"):
        options = config(analysis={"spectrum": {**base, "hvp_mode": mode}}).analysis
        _, payload = measure_spectrum(
            model,
            data,
            "cross_entropy",
            options.measures["spectrum"],
            {"seed": 0, "batch_size": None},
        )
        assert payload["meta"]["extra"]["hvp_mode"] == mode
    with pytest.raises(SharpscopeError, match="hvp_mode must be auto, forward or reverse"):
        config(analysis={"spectrum": {"hvp_mode": "fast"}})


def test_b3_a_dataset_tables_data_root_becomes_the_machine_setting_data_root(tmp_path, monkeypatch):
    """Bug B3, session 28: [train] dataset = {..., data_root = "c"} stayed in the data spec
    as given (relative). It is now train.data_root, absolute, which a resumed study may
    change; a run.json of an older sharpscope, with data_root in its dataset, still matches."""
    from sharpscope.results import to_jsonable
    from sharpscope.study.runner import _check_same_run

    monkeypatch.chdir(tmp_path)
    train = {**TRAIN, "dataset": {"name": "cifar10", "data_root": "c"}}
    loaded = study_config_from_dict({"train": train}, check_files=False)
    assert loaded.train["dataset"] == {"name": "cifar10"}
    assert loaded.train["data_root"] == str(tmp_path / "c")
    run = expand_sweep(loaded)[0]
    wanted = to_jsonable(run.to_dict())
    older = to_jsonable(run.to_dict())
    older["train"]["dataset"] = {"name": "cifar10", "data_root": "c"}
    del older["train"]["data_root"]
    _check_same_run(run.run_id, older, wanted, tmp_path)


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        (
            {"optimizer": ["sgd"], "rho": [0.05, 0.1]},
            "sweep.rho applies to none of sweep.optimizer (sgd), so it would sweep nothing; "
            "rho applies to sam, asam, vasso, lets, samon, bsam: add one of them, or remove "
            "sweep.rho",
        ),
        ({"optimizer": ["sgd", "vasso"], "m": [8, 16]}, "m applies to sam, asam, samon:"),
        ({"optimizer": ["adam"], "momentum": [0.5, 0.9]}, "sweep.momentum applies to none"),
        ({"optimizer": ["bsam"], "weight_decay": [0.0, 1e-4]}, "sweep.weight_decay applies"),
    ],
)
def test_a_sweep_axis_that_applies_to_no_optimizer_is_refused(sweep, message):
    """Session 30 (studycfg B6): rho swept with SGD alone (a forgotten "sam") or momentum
    with Adam alone trained one run per optimizer, and study.json said "swept": []."""
    with pytest.raises(SharpscopeError, match="applies to none") as info:
        config(sweep=sweep)
    assert message in str(info.value) and "\n" not in str(info.value)
    # an axis that applies to one optimizer of the sweep collapses for the others, as before
    mixed = {**sweep, "optimizer": [*sweep["optimizer"], "sam"]}
    runs = expand_sweep(config(sweep=mixed))
    assert {r.params["optimizer"] for r in runs} == set(mixed["optimizer"])
    # a study folder written before this check is read back (report, status) as it was
    assert expand_sweep(study_config_from_dict({"train": TRAIN, "sweep": sweep}, check_files=False))


def test_lets_beside_other_optimizers_without_a_shared_hold_out_is_warned_about(recwarn):
    """Session 30 (studycfg D1): the trainer held out 10% for LETS alone, so LETS trained on
    other examples than SGD beside it, and nobody was told."""
    with pytest.warns(RuntimeWarning, match="lets beside sam, sgd: LETS holds out 10%"):
        config(sweep={"optimizer": ["sgd", "sam", "lets"]})
    recwarn.clear()
    shared = {**TRAIN, "dataset": {**TRAIN["dataset"], "val_fraction": 0.1}}
    study_config_from_dict({"train": shared, "sweep": {"optimizer": ["sgd", "lets"]}})
    config(sweep={"optimizer": ["lets"]})
    assert not [w for w in recwarn if "holds out" in str(w.message)]
