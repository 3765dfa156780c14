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
    assert get_loss(f"{file}:loss") is torch.nn.functional.l1_loss
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
