"""Results computed from the Python API record the data they were computed on."""

from __future__ import annotations

import torch

import sharpscope as ss
from sharpscope.results import RunMeta


def test_a_datasplit_is_recorded_in_the_metadata_unless_meta_names_data():
    torch.manual_seed(0)
    model = ss.build_model({"name": "mlp", "width": 8, "depth": 1}, (40,), 10)
    data = ss.load_data("mnist1d", "test", samples=128, seed=3)
    # the seeded subset is part of the provenance: another seed is another subset
    recorded = {"name": "mnist1d", "split": "test", "samples": 128, "seed": 3}
    assert ss.top_eigenvalues(model, data, k=2).meta.data == recorded
    assert ss.m_sharpness(model, data, m=64, rho=0.05).meta.data == recorded
    assert ss.epsilon_sharpness(model, data, epsilon=1e-3).meta.data == recorded
    assert ss.landscape(model, data, dims=1, grid=3).meta.data == recorded
    given = RunMeta(data={"name": "mine"})
    assert ss.m_sharpness(model, data, m=64, rho=0.05, meta=given).meta.data == {"name": "mine"}
    # plain tensors carry no spec: nothing is invented
    pair = (data.inputs, data.targets)
    assert ss.m_sharpness(model, pair, m=64, rho=0.05).meta.data is None


def test_a_whole_datasplit_records_no_subset():
    torch.manual_seed(0)
    model = ss.build_model({"name": "mlp", "width": 8, "depth": 1}, (40,), 10)
    data = ss.load_data("mnist1d", "test")
    assert ss.m_sharpness(model, data, m=500, rho=0.05).meta.data == {
        "name": "mnist1d",
        "split": "test",
    }


def test_every_analysis_records_a_loss_spec_under_the_same_name():
    """A dict spec or a nested function is recorded by its name, by spectrum as by the others."""

    def make_loss():
        def my_ce(outputs, targets):
            return torch.nn.functional.cross_entropy(outputs, targets)

        return my_ce

    torch.manual_seed(0)
    model = ss.build_model({"name": "mlp", "width": 8, "depth": 1}, (40,), 10)
    data = ss.load_data("mnist1d", "test", samples=64, seed=3)
    for loss, name in (({"name": "cross_entropy"}, "cross_entropy"), (make_loss(), "my_ce")):
        assert ss.top_eigenvalues(model, data, k=1, loss=loss).meta.extra["loss"] == name
        assert ss.landscape(model, data, dims=1, grid=3, loss=loss).loss_name == name


def test_the_recorded_data_spec_reloads_the_same_examples():
    """meta.data holds the split beside the options: load_data takes it back as it is."""
    data = ss.load_data("mnist1d", "test", samples=128, seed=3)
    model = ss.build_model({"name": "mlp", "width": 8, "depth": 1}, (40,), 10)
    recorded = ss.m_sharpness(model, data, m=64, rho=0.05).meta.data
    for again in (ss.load_data(recorded, recorded["split"]), ss.load_data(recorded)):
        assert again.split == "test" and torch.equal(again.inputs, data.inputs)
    from sharpscope.data import check_data_spec

    assert check_data_spec(recorded) == ((40,), 10)  # the up-front check takes it too
