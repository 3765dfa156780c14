"""Study mistakes found before any run trains (session 30 studycfg B3-B9)."""

from __future__ import annotations

import pytest

from sharpscope.errors import SharpscopeError
from sharpscope.study import study_config_from_dict
from sharpscope.study.runner import run_study

TRAIN = {
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "width": 8, "depth": 1},
    "epochs": 1,
    "batch_size": 64,
    "device": "cpu",
}


def config(train=None, **sections):
    return study_config_from_dict({"train": {**TRAIN, **(train or {})}, **sections})


@pytest.mark.parametrize(
    "measure, options, words",
    [
        ("pac_bayes", {"target_drop": 5.0}, "target_drop must be in (0, 1), got 5.0"),
        ("pac_bayes", {"target_drop": 1.0}, "target_drop must be in (0, 1), got 1.0"),
        ("spectrum", {"skip": ["tracee"]}, "cannot skip 'tracee': choose from trace, density"),
        ("spectrum", {"skip": 3}, "analysis.spectrum.skip must be a list of trace, density"),
        ("spectrum", {"backend": "scipy"}, "unknown backend 'scipy'"),
        ("spectrum", {"backend": "pyhessian", "which": "SA"}, "pyhessian backend takes only"),
        ("spectrum", {"basis_device": "gpu"}, "basis_device: unknown device 'gpu'"),
        ("spectrum", {"basis_device": 3}, "basis_device: unknown device '3'"),
        ("spectrum", {"k": 100000}, "k 100000 is larger than the number of parameters (610)"),
        ("spectrum", {"block_size": 5000}, "block_size 5000 is larger than the number of"),
        (
            "spectrum",
            {"deflate": 610},
            "analysis.spectrum.deflate 610 must be fewer than the number of parameters (610) "
            "of the model of run",
        ),
        ("keskar", {"subspace_dim": 100000}, "subspace_dim 100000 is larger than the 610"),
    ],
)
def test_analysis_options_that_fail_after_training_are_refused_up_front(measure, options, words):
    """They were accepted, every run trained, and then every run's analysis failed (two of
    them with a TypeError / RuntimeError text)."""
    with pytest.raises(SharpscopeError) as info:
        config(analysis={measure: options})
    assert words in str(info.value)


def test_sam_on_without_norm_layers_and_m1_with_batchnorm_are_refused_up_front():
    with pytest.raises(SharpscopeError, match=r"run 'samon-s0': SAM-ON perturbs normalization"):
        config(sweep={"optimizer": ["sgd", "samon"]})
    with pytest.raises(SharpscopeError, match=r"run 'sam-s0': m-sharpness with m=1 .*BatchNorm"):
        config(
            train={"model": {"name": "mlp", "width": 8, "depth": 1, "norm": "batch"}},
            sweep={"optimizer": ["sgd", "sam"], "m": [1]},
        )
    # with norm layers both are fine
    config(
        train={"model": {"name": "mlp", "width": 8, "depth": 1, "norm": "batch"}},
        sweep={"optimizer": ["sgd", "samon", "sam"], "m": [2]},
    )


def test_a_batch_larger_than_the_training_set_is_refused_before_any_run_trains(tmp_path):
    study = config(sweep={"optimizer": ["sgd"], "batch_size": [64, 100000]})
    with pytest.raises(SharpscopeError, match="batch size 100000 is larger than the 1437"):
        run_study(study, tmp_path / "s")
    assert not (tmp_path / "s").exists()  # the bs 64 run did not train first


def test_cuda_without_a_gpu_is_refused_before_any_run_trains(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    study = config(analysis={"device": "cuda"})
    with pytest.raises(SharpscopeError, match="analysis.device: device 'cuda' requested but no"):
        run_study(study, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("base", [5, ["adam"], 0.1])
def test_an_optimizer_base_that_is_no_table_or_name_is_one_line(base):
    """`sam = {base = 5}` was a TypeError traceback (session 30 studycfg B5)."""
    with pytest.raises(SharpscopeError, match=r"optimizers.sam.base must be a table or an"):
        config(optimizers={"sam": {"base": base}}, sweep={"optimizer": ["sam"]})


@pytest.mark.parametrize("dims", [[True], [False, 2]])
def test_landscape_dims_refuse_booleans(dims):
    """`dims = [true]` passed (True == 1) and wrote landscape_Trued.npz (studycfg B9)."""
    with pytest.raises(SharpscopeError, match="analysis.landscape.dims must be 1 or 2"):
        config(analysis={"landscape": {"dims": dims}})


@pytest.mark.parametrize("name", ["", "  ", "..", ".", "../../evil", "a/b", "a\\b", 5, "a\nb"])
def test_the_study_name_must_be_one_folder_name(name):
    """`name = ""` wrote the study into runs/studies itself, `"../../x"` outside it, and
    `name = 5` was turned into a string (studycfg B3)."""
    with pytest.raises(SharpscopeError, match="study.name must be a non-empty folder name"):
        config(study={"name": name})


def test_the_study_description_must_be_a_string():
    with pytest.raises(SharpscopeError, match="study.description must be a string"):
        config(study={"name": "x", "description": {"a": 1}})
    assert config(study={"name": "my study-1.2", "description": "d"}).name == "my study-1.2"


@pytest.mark.parametrize(
    "measure, options, words",
    [
        ("m_sharpness", {"m": [32, 32]}, "analysis.m_sharpness.m lists a value twice: [32, 32]"),
        ("m_sharpness", {"rho": [0.05, 0.05]}, "analysis.m_sharpness.rho lists a value twice"),
        ("keskar", {"epsilon": [1e-3, 0.001]}, "analysis.keskar.epsilon lists a value twice"),
        ("pac_bayes", {"magnitude_aware": [True, True]}, "magnitude_aware lists a value twice"),
        ("landscape", {"dims": [1, 1]}, "analysis.landscape.dims lists a value twice"),
        (
            "landscape",
            {"interpolate": [["sgd", "sam"], ["sgd", "sam"]]},
            "analysis.landscape.interpolate lists a value twice",
        ),
    ],
)
def test_a_measure_value_listed_twice_is_refused(measure, options, words):
    """studycfg D8 (session 30): `m = [32, 32]` computed the measure twice and gave one
    column, where the sweep refuses an axis value given twice."""
    with pytest.raises(SharpscopeError) as info:
        config(sweep={"optimizer": ["sgd", "sam"]}, analysis={measure: options})
    assert words in str(info.value)


def test_a_study_folder_with_a_measure_value_twice_is_still_read_back():
    values = {"train": TRAIN, "analysis": {"m_sharpness": {"m": [32, 32]}}}
    plan = study_config_from_dict(values, check_files=False).analysis
    assert plan.measures["m_sharpness"]["m"] == [32, 32]


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("timeout_min", "x", "executor.timeout_min must be a positive integer, got 'x'"),
        ("timeout_min", 0, "executor.timeout_min must be a positive integer, got 0"),
        ("cpus_per_task", 1.5, "executor.cpus_per_task must be a positive integer"),
        ("nodes", True, "executor.nodes must be a positive integer, got True"),
        ("gpus_per_node", -1, "executor.gpus_per_node must be an integer >= 0, got -1"),
        ("mem_gb", "16G", "executor.mem_gb must be a number, got '16G'"),
        ("name", 3, "executor.name must be a string, got 3"),
        ("stderr_to_stdout", "yes", "executor.stderr_to_stdout must be true or false"),
    ],
)
def test_executor_values_of_the_wrong_type_are_refused_up_front(key, value, words):
    """studycfg D9 (session 30): `timeout_min = "x"` passed validation and failed only
    when submitit started, after the study folder was written."""
    with pytest.raises(SharpscopeError) as info:
        config(executor={key: value})
    assert words in str(info.value)


def test_executor_values_of_the_right_type_pass():
    config(
        executor={
            "timeout_min": 60,
            "gpus_per_node": 0,
            "cpus_per_task": 4,
            "mem_gb": 7.5,
            "nodes": 1,
            "tasks_per_node": 1,
            "name": "sweep",
            "stderr_to_stdout": True,
            "slurm_partition": "gpu",
        }
    )
