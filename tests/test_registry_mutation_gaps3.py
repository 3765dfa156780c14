"""Mutation gaps in sharpscope/registry.py (session 25): exact answers for the spec forms."""

from __future__ import annotations

import pytest
import torch

from sharpscope.errors import SharpscopeError
from sharpscope.registry import (
    build_model,
    check_trusted_factories,
    factory_of,
    is_factory_path,
    normalize_spec,
)


# kills R01: is_factory_path returning True for any name with a colon (":f", "cnn1d:")
def test_a_colon_at_either_end_is_not_a_factory_path():
    assert is_factory_path("pkg.mod:make") is True
    assert is_factory_path("file.py:net") is True
    assert is_factory_path(":make") is False
    assert is_factory_path("cnn1d:") is False
    assert normalize_spec("cnn1d:", "model") == {"name": "cnn1d:"}


# kills R02: a TOML/dict spec whose name is an import path kept as a registry name
def test_a_dict_spec_naming_an_import_path_becomes_a_factory_spec():
    spec = normalize_spec({"name": "pkg.mod:make", "width": 2}, "model")
    assert spec == {"factory": "pkg.mod:make", "width": 2}
    assert normalize_spec({"name": "mlp", "width": 2}, "model") == {"name": "mlp", "width": 2}


# kills R06: a factory spec's extra keys (--model f.py:net --model-opt width=5) not passed on
def test_a_factory_spec_passes_its_options_to_the_factory(tmp_path):
    file = tmp_path / "nets.py"
    file.write_text("import torch\ndef net(width=2):\n    return torch.nn.Linear(3, width)\n")
    model = build_model({"factory": f"{file}:net", "width": 5}, (3,), 2)
    assert model.out_features == 5
    assert build_model({"factory": f"{file}:net"}, (3,), 2).out_features == 2


# kills R11: a registry name's options (width) dropped, the default model built instead
def test_a_registry_spec_builds_the_model_with_its_options():
    model = build_model({"name": "mlp", "width": 7, "depth": 1, "norm": "none"}, (5,), 3)
    # one hidden layer of 7 units, no norm: 5*7 + 7 weights in, 7*3 + 3 out
    assert sum(p.numel() for p in model.parameters()) == 5 * 7 + 7 + 7 * 3 + 3


# kills R12: factory_of ignoring a factory path stored under "name"
def test_factory_of_finds_an_import_path_under_name():
    assert factory_of({"name": "os:system"}) == "os:system"
    assert factory_of({"name": "mlp", "width": 3}) is None


# kills R07 (given-check inverted) and R12 (name key ignored): a checkpoint naming a
# factory is refused unless trusted or the user names that kind instead
@pytest.mark.parametrize("spec", [{"factory": "os:system"}, {"name": "os:system"}])
def test_a_factory_named_by_a_file_is_refused_unless_trusted_or_overridden(spec):
    with pytest.raises(SharpscopeError, match="names the model factory 'os:system'"):
        check_trusted_factories({"model": spec}, "x.pt", False)
    with pytest.raises(SharpscopeError, match="os:system"):
        check_trusted_factories({"model": spec}, "x.pt", False, given={"model": None})
    check_trusted_factories({"model": spec}, "x.pt", True)  # trusted: allowed
    # the user named a model instead: the file's factory is neither used nor refused
    check_trusted_factories({"model": spec}, "x.pt", False, given={"model": "mlp"})
    # only the kind the user overrode is exempt
    with pytest.raises(SharpscopeError, match="data set factory 'pkg:data'"):
        check_trusted_factories(
            {"model": spec, "data set": {"factory": "pkg:data"}},
            "x.pt",
            False,
            given={"model": "mlp"},
        )


def test_mse_of_class_labels_is_the_mean_over_all_entries():
    from sharpscope.registry import get_loss

    out = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)
    # one-hot [1,0,0] and [0,1,0]: squared errors 0,0,0 and 0,1,4 -> 5/6
    assert get_loss("mse")(out, torch.tensor([0, 1])).item() == pytest.approx(5 / 6, abs=1e-15)
