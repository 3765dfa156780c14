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
