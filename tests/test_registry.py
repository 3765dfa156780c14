"""Registries: models and losses by name, user factories by import path."""

from __future__ import annotations

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.registry import build_model, get_loss, model_names, resolve_factory


def test_model_registry_has_the_interface_names():
    assert {"mlp", "cnn1d", "cnn", "resnet20", "resnet32", "resnet56", "wrn", "vit"} <= set(
        model_names()
    )


def test_unknown_model_lists_choices():
    with pytest.raises(SharpscopeError, match="unknown model 'resnet18'; choose one of: .*cnn1d"):
        build_model("resnet18", (40,), 10)


def test_factory_from_module_and_file(tmp_path):
    file = tmp_path / "factories.py"
    file.write_text(
        "import torch\ndef net():\n    return torch.nn.Linear(3, 2)\ndef loss():\n    return torch.nn.functional.l1_loss\n"
    )
    model = build_model({"factory": f"{file}:net"}, (3,), 2)
    assert isinstance(model, torch.nn.Linear)
    loss = get_loss(f"{file}:loss")
    assert loss.loss is torch.nn.functional.l1_loss  # wrapped: a non-scalar is refused
    out, y = torch.randn(4, 2), torch.randn(4, 2)
    assert torch.equal(loss(out, y), torch.nn.functional.l1_loss(out, y))
    assert resolve_factory("math:sqrt")(9.0) == 3.0


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("math:nope", "'math' has no callable named 'nope'"),
        ("/tmp/does/not/exist.py:f", "factory file not found"),
    ],
)
def test_bad_factories_give_one_line(path, message):
    with pytest.raises(SharpscopeError, match=message):
        resolve_factory(path)


def test_losses_match_torch():
    out, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    assert torch.equal(get_loss("cross_entropy")(out, y), torch.nn.functional.cross_entropy(out, y))
    expected = torch.nn.functional.mse_loss(out, torch.nn.functional.one_hot(y, 3).float())
    assert torch.allclose(get_loss("mse")(out, y), expected)
    with pytest.raises(
        SharpscopeError, match="unknown loss 'hinge'; choose one of: cross_entropy, mse"
    ):
        get_loss("hinge")


def test_the_default_loss_is_cross_entropy():
    """get_loss() and get_loss(None) give F.cross_entropy's value, not the MSE's."""
    out, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    expected = torch.nn.functional.cross_entropy(out, y)
    assert torch.equal(get_loss()(out, y), expected)
    assert torch.equal(get_loss(None)(out, y), expected)


def test_mse_loss_one_hot_encodes_int32_targets_like_int64():
    """int32 class targets give the same MSE as int64 ones: against one_hot(y, 3)."""
    out, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    expected = torch.nn.functional.mse_loss(out, torch.nn.functional.one_hot(y, 3).float())
    torch.testing.assert_close(get_loss("mse")(out, y.to(torch.int32)), expected)


def test_mse_loss_works_under_vmap():
    # F.one_hot reads the largest target with .item(), which vmap refuses: the vectorized
    # m-sharpness crashed on every checkpoint trained with --loss mse.
    mse = get_loss("mse")
    g = torch.Generator().manual_seed(0)
    outputs = torch.randn(6, 4, 3, generator=g, dtype=torch.float64)  # 6 subsets of 4
    targets = torch.randint(0, 3, (6, 4), generator=g)
    vectorized = torch.func.vmap(mse)(outputs, targets)
    looped = torch.stack([mse(o, t) for o, t in zip(outputs, targets)])
    torch.testing.assert_close(vectorized, looped, rtol=0, atol=0)
    one_hot = torch.nn.functional.one_hot(targets[0], 3).to(torch.float64)
    assert torch.equal(looped[0], torch.nn.functional.mse_loss(outputs[0], one_hot))
    grads = torch.func.vmap(torch.func.grad(mse))(outputs, targets)
    assert grads.shape == outputs.shape


def test_mse_loss_refuses_targets_outside_the_classes():
    with pytest.raises(ValueError, match=r"target class 3 is outside 0\.\.2"):
        get_loss("mse")(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_mse_loss_reads_an_n_by_1_output_against_1d_float_targets_per_example():
    """odd_models finding 11: nn.Linear(d, 1) with (N,) float targets was the mean over
    all N² (output, target) pairs (PyTorch broadcasts, with a warning), not the MSE."""
    import warnings

    from sharpscope.curvature import HessianOperator

    mse = get_loss("mse")
    g = torch.Generator().manual_seed(0)
    out, y = torch.randn(6, 1, generator=g), torch.randn(6, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no broadcasting warning
        assert torch.equal(mse(out, y), ((out[:, 0] - y) ** 2).mean())
        vectorized = torch.func.vmap(mse)(out.view(2, 3, 1), y.view(2, 3))
    torch.testing.assert_close(vectorized, ((out.view(2, 3) - y.view(2, 3)) ** 2).mean(1))
    model = torch.nn.Linear(4, 1).double()
    x = torch.randn(16, 4, generator=g, dtype=torch.float64)
    t = torch.randn(16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        expected = float(((model(x)[:, 0] - t) ** 2).mean())
    assert HessianOperator(model, (x, t), "mse").loss() == pytest.approx(expected, rel=1e-14)


@pytest.mark.parametrize(
    ("outputs", "targets"),
    [((6, 3), (6,)), ((6,), (6, 1)), ((6, 2), (6, 3)), ((6, 1), (3,))],
    ids=["wide-output", "column-targets", "widths-differ", "lengths-differ"],
)
def test_mse_loss_refuses_every_other_shape_mismatch_in_one_line(outputs, targets):
    with pytest.raises(SharpscopeError, match="give targets of the outputs' shape") as info:
        get_loss("mse")(torch.zeros(outputs), torch.zeros(targets))
    assert "\n" not in str(info.value)


def test_mse_loss_keeps_one_hot_class_labels_on_an_n_by_1_output():
    """Integer labels are still one-hot encoded to the output width, also width 1."""
    mse = get_loss("mse")
    out = torch.tensor([[0.5], [2.0]])
    assert torch.equal(mse(out, torch.tensor([0, 0])), ((out - 1) ** 2).mean())
    with pytest.raises(ValueError, match=r"target class 1 is outside 0\.\.0"):
        mse(out, torch.tensor([0, 1]))
    one_hot = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # float one-hot targets, as given
    assert torch.equal(mse(torch.ones(2, 2), one_hot), torch.tensor(0.5))


def test_vectorized_m_sharpness_with_the_mse_loss_equals_the_loop():
    from sharpscope import m_sharpness

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)
    ).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    for steps in (1, 3):
        kw = {"m": 4, "rho": 0.5, "steps": steps, "loss": "mse", "chunk_size": 4}
        vectorized = m_sharpness(model, (x, y), **kw)
        looped = m_sharpness(model, (x, y), vectorize=False, **kw)
        assert vectorized.sharpness > 0
        torch.testing.assert_close(vectorized.per_subset, looped.per_subset, rtol=1e-9, atol=1e-12)


def test_a_failing_loss_factory_is_one_line_like_a_model_factory(tmp_path):
    file = tmp_path / "factories.py"
    file.write_text(
        "def net():\n    raise ValueError('no net')\ndef loss():\n    raise ValueError('no loss\\nsecond line')\ndef number():\n    return 3\n"
    )
    with pytest.raises(SharpscopeError, match="model factory .*failed: ValueError: no net$"):
        build_model(f"{file}:net", (3,), 2)
    with pytest.raises(SharpscopeError, match="loss factory .*failed: ValueError: no loss$"):
        get_loss(f"{file}:loss")
    with pytest.raises(SharpscopeError, match="loss factory .*returned int, not a callable"):
        get_loss(f"{file}:number")


def test_a_loss_factory_returning_one_loss_per_example_is_one_line(tmp_path):
    # grad_and_value (m-sharpness, spectrum) and backward (training) ended in a traceback
    file = tmp_path / "losses.py"
    file.write_text(
        "import torch\n"
        "def per_example():\n"
        "    return lambda o, t: torch.nn.functional.cross_entropy(o, t, reduction='none')\n"
    )
    loss = get_loss(f"{file}:per_example")
    out, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    with pytest.raises(SharpscopeError, match=r"returned a tensor of shape \(5,\), not a scalar"):
        loss(out, y)
    with pytest.raises(SharpscopeError, match="not a scalar"):
        torch.func.grad(lambda o: loss(o, y))(out)


def test_loss_value_problem_names_what_is_wrong():
    from sharpscope.errors import check_loss_value, loss_value_problem

    assert loss_value_problem(torch.tensor(1.0)) is None
    assert "not a scalar tensor" in loss_value_problem([1.0])
    assert "shape (2, 1)" in loss_value_problem(torch.zeros(2, 1))
    assert "not a finite number" in loss_value_problem(torch.tensor(float("inf")))
    assert loss_value_problem(torch.tensor(float("nan")), finite=False) is None
    with pytest.raises(SharpscopeError, match="the loss on the data is not a finite scalar: .*nan"):
        check_loss_value(torch.tensor(float("nan")))


def test_absolute_factory_makes_file_paths_absolute_only(tmp_path, monkeypatch):
    from sharpscope.registry import absolute_factory, absolute_spec

    monkeypatch.chdir(tmp_path)
    assert absolute_factory("fac/f.py:net") == f"{tmp_path}/fac/f.py:net"
    assert absolute_factory("f.py:net") == f"{tmp_path}/f.py:net"
    assert absolute_factory("../up/f.py:net") == f"{tmp_path.parent}/up/f.py:net"
    for unchanged in ("pkg.mod:net", "/abs/f.py:net", "mse", "cross_entropy"):
        assert absolute_factory(unchanged) == unchanged
    assert absolute_spec({"factory": "f.py:net", "width": 3}) == {
        "factory": f"{tmp_path}/f.py:net",
        "width": 3,
    }
    assert absolute_spec({"name": "mlp"}) == {"name": "mlp"}


@pytest.mark.parametrize(
    "call, flag",
    [
        (lambda: build_model("fac/gone.py:net", (3,), 2), "--model"),
        (lambda: get_loss("fac/gone.py:loss"), "--loss"),
        (lambda: __import__("sharpscope.data").data.load_data("fac/gone.py:data"), "--data"),
    ],
    ids=["model", "loss", "data"],
)
def test_a_missing_relative_factory_file_names_the_flag_that_overrides_it(
    tmp_path, monkeypatch, call, flag
):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SharpscopeError) as info:
        call()
    message = str(info.value)
    assert f"factory file not found: {tmp_path}/fac/gone.py" in message
    assert "'fac/gone.py' is read from the current folder" in message
    assert f"override it with {flag}" in message and "\n" not in message


def test_a_module_factory_that_cannot_be_imported_mentions_pythonpath_and_the_file_form():
    with pytest.raises(SharpscopeError) as info:
        resolve_factory("no_such_pkg_xyz.models:net")
    message = str(info.value)
    assert "cannot import module 'no_such_pkg_xyz.models'" in message
    assert "PYTHONPATH" in message and "path/to/no_such_pkg_xyz/models.py:net" in message


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"factory": [":"]}, "the model spec's factory must be a string, got [':']"),
        ({"name": ["x:y"]}, "the model spec's name must be a string, got ['x:y']"),
        ({"name": 3}, "the model spec's name must be a string, got 3"),
    ],
)
def test_a_spec_whose_name_or_factory_is_not_a_string_is_named_as_such(spec, message):
    """Acceptance report, session 21: {"factory": [":"]} failed as "model factory '[':']'
    failed: AttributeError: 'list' object has no attribute 'startswith'"."""
    from sharpscope.registry import normalize_spec

    with pytest.raises(SharpscopeError) as info:
        normalize_spec(spec, "model")
    assert str(info.value) == message


EXITING_FACTORIES = """\
import argparse
import sys

import torch


def parses_argv():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8)
    n = parser.parse_args().n
    return torch.randn(n, 3), torch.zeros(n, dtype=torch.long)


def exits_zero(**options):
    sys.exit(0)


def exits_three(**options):
    raise SystemExit(3)


def fine():
    sys.stderr.write("a note from the factory\\n")
    return torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
"""


def test_b4_a_factory_that_calls_sys_exit_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    """Bug B4, session 28: a factory (or its module, on import) that called sys.exit ended
    sharpscope with that exit code: argparse's usage line reading sharpscope's arguments,
    or a silent exit 0. Now a line names the factory."""
    from sharpscope.data import load_data

    file = tmp_path / "exiting.py"
    file.write_text(EXITING_FACTORIES)
    monkeypatch.setattr("sys.argv", ["sharpscope", "train", "--dataset", f"{file}:parses_argv"])
    with pytest.raises(SharpscopeError) as caught:
        load_data(f"{file}:parses_argv")
    assert str(caught.value).startswith(f"data factory '{file}:parses_argv' called sys.exit(2); ")
    with pytest.raises(SharpscopeError, match=r"^data factory .*:exits_zero' called sys.exit\(0\)"):
        load_data(f"{file}:exits_zero")
    with pytest.raises(SharpscopeError, match=r"^model factory .* called sys.exit\(3\); a factory"):
        build_model({"factory": f"{file}:exits_three"}, (3,), 2)
    with pytest.raises(SharpscopeError, match=r"^loss factory .*:exits_zero' called sys.exit\(0\)"):
        get_loss(f"{file}:exits_zero")
    assert "unrecognized arguments: train --dataset" in capsys.readouterr().err  # not held
    assert len(load_data(f"{file}:fine")) == 4
    assert capsys.readouterr().err == "a note from the factory\n"  # shown as it comes

    module = tmp_path / "parses_on_import.py"
    module.write_text("import argparse\nargparse.ArgumentParser().parse_args()\ndef f(): pass\n")
    for _ in range(2):  # the module that exited half-way is not kept as imported
        with pytest.raises(SharpscopeError) as caught:
            resolve_factory(f"{module}:f", "data set")
        assert str(caught.value).startswith(
            f"importing '{module}' for data set factory '{module}:f' called sys.exit(2); does "
            "the module parse the command line when imported?"
        )


@pytest.mark.parametrize(
    "analysis, options",
    [
        ("m_sharpness", {"m": 8, "rho": 0.05}),
        ("average_sharpness", {"rho": 0.01, "m": 8, "num_draws": 2}),
        ("epsilon_sharpness", {"iterations": 2}),
        ("pac_bayes_flatness", {"num_halvings": 2, "num_draws": 2}),
        ("landscape", {"dims": 1, "grid": 3}),
    ],
)
def test_every_analysis_warns_about_a_loss_that_sums_over_the_examples(analysis, options):
    # analysis.md: every measure is of the mean loss; reduction="sum" scaled it by the
    # batch size (and the sharpness by the subset size) without a word
    from sharpscope import analysis as analyses

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    data = (torch.randn(32, 4), torch.randint(0, 3, (32,)))
    summed = torch.nn.CrossEntropyLoss(reduction="sum")
    with pytest.warns(RuntimeWarning, match="sums over the examples") as caught:
        getattr(analyses, analysis)(model, data, loss=summed, **options)
    warned = [w for w in caught if "sums over the examples" in str(w.message)]
    assert len(warned) == 1 and warned[0].filename == __file__
