"""Models that train or analyse badly are refused in one line, before any file is written
(session 29 models audit, bugs B2-B6): a TorchScript model, a BatchNorm step of one
example, a model with nothing to train, a factory model on the meta device, options too
large to build."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import sharpscope as ss
from sharpscope.cli import app
from sharpscope.errors import SharpscopeError
from sharpscope.registry import build_model
from sharpscope.trainer import train

from cases import train_config

runner = CliRunner()

FACTORIES = """
import warnings
import torch
from torch import nn

def plain():
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 10))

def scripted():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in newer torch
        return torch.jit.script(plain())

def frozen():
    return plain().requires_grad_(False)

def empty():
    return nn.Flatten()

class _TooLarge(nn.Sequential):
    def to(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried 4e+14 bytes")

def too_large():
    return _TooLarge(nn.Flatten(), nn.Linear(40, 10))

def meta():
    with torch.device("meta"):
        return plain()

def half():
    return plain().half()

def wide():
    return nn.Sequential(nn.Flatten(), nn.Linear(40, 20))

def bn():
    return nn.Sequential(nn.Linear(40, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 10))

class _Sparse(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(16, 2, sparse=True)
        self.head = nn.Linear(80, 10)

    def forward(self, x):
        return self.head(self.emb((x.clamp(0, 1) * 15).long()).flatten(1))

def sparse():
    return _Sparse()

class _Prototypes(nn.Module):  # logits: minus the distances to 10 learned prototypes
    def __init__(self):
        super().__init__()
        self.prototypes = nn.Parameter(torch.randn(10, 40))

    def forward(self, x):
        return -torch.cdist(x.flatten(1), self.prototypes)

def prototypes():
    return _Prototypes()

def bn_conv():
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 4, 3), nn.BatchNorm1d(4), nn.Flatten(),
        nn.Linear(4 * 38, 10),
    )
"""


@pytest.fixture
def factories(tmp_path):
    path = tmp_path / "fac.py"
    path.write_text(FACTORIES)
    return lambda name: {"factory": f"{path}:{name}"}


def _refused(folder, message, **changes):
    """``train`` refuses in one line matching ``message`` and leaves ``folder`` empty."""
    with pytest.raises(SharpscopeError) as info:
        train(train_config(folder, **changes))
    text = str(info.value)
    assert "\n" not in text
    assert message in text, text
    assert not folder.exists() or not any(folder.iterdir())
    return text


def _scripted(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.script(model)


# ------------------------------------------------------------------ B2: TorchScript


def test_a_torchscript_model_is_refused_before_training(tmp_path, factories):
    text = _refused(tmp_path / "o", "is a TorchScript module", model=factories("scripted"))
    assert "return the Python nn.Module" in text


@pytest.mark.parametrize("where", ["top", "submodule"])
def test_every_analysis_refuses_a_torchscript_model_in_one_line(where):
    torch.manual_seed(0)
    linear = nn.Linear(4, 2)
    model = _scripted(linear) if where == "top" else nn.Sequential(_scripted(linear))
    data = (torch.randn(16, 4), torch.randint(0, 2, (16,)))
    calls = [
        lambda: ss.top_eigenvalues(model, data, k=1),
        lambda: ss.hessian_trace(model, data),
        lambda: ss.m_sharpness(model, data, m=4, rho=0.05),
        lambda: ss.landscape(model, data, dims=1, grid=3),
    ]
    for call in calls:
        with pytest.raises(SharpscopeError, match="TorchScript module") as info:
            call()
        assert "\n" not in str(info.value)
        if where == "submodule":
            assert "submodule '0'" in str(info.value)


# ------------------------------------------------------------------ B3: BatchNorm on one example


def test_a_batchnorm_step_of_one_example_is_refused_before_training(tmp_path, factories):
    _refused(
        tmp_path / "a",
        "--batch-size 1 runs the model on one example per step, and BatchNorm '1'",
        model=factories("bn"),
        batch_size=1,
    )
    _refused(
        tmp_path / "b",
        "bsam splits 4 cut a batch of 4 into chunks as small as one example",
        model=factories("bn"),
        batch_size=4,
        optimizer={"name": "bsam", "splits": 4},
    )
    _refused(
        tmp_path / "c",
        "use splits <= 2",
        model={"name": "mlp", "width": 8, "depth": 1, "norm": "batch"},
        batch_size=5,
        optimizer={"name": "bsam", "splits": 3},  # chunks of 2, 2 and 1
    )
    _refused(  # m-sharpness groups of one: refused at the first step, after config.json
        tmp_path / "d",
        "m-sharpness with m=1 splits a batch of 64 into groups that leave one example alone",
        model={"name": "mlp", "width": 8, "depth": 1, "norm": "batch"},
        optimizer={"name": "sam", "rho": 0.05, "lr": 0.1, "m": 1},
    )


def test_batchnorm_over_more_than_one_value_trains_with_one_example(tmp_path, factories):
    """A conv BatchNorm normalizes over the positions too: one example is enough."""
    dataset = {"name": "mnist1d", "samples": 8}
    train(
        train_config(tmp_path, model=factories("bn_conv"), batch_size=1, epochs=1, dataset=dataset)
    )
    assert (tmp_path / "last.pt").exists()


def test_batchnorm_on_one_value_names_the_layer_and_leaves_the_model_as_it_was():
    from sharpscope.modes import batchnorm_on_one_value

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert batchnorm_on_one_value(model, torch.randn(5, 3)) == "1"
    assert model.training and model[1].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model[1]._forward_pre_hooks
    model[1].eval()  # a frozen BatchNorm uses its running statistics: nothing to refuse
    assert batchnorm_on_one_value(model, torch.randn(5, 3)) is None


# ------------------------------------------------------------------ B4: nothing to train


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("frozen", "the model has no trainable parameters (all requires_grad=False?)"),
        ("empty", "the model has no parameters at all"),
    ],
)
@pytest.mark.parametrize("optimizer", ["sgd", "sam"])
def test_a_model_with_nothing_to_train_is_refused_before_any_file(
    tmp_path, factories, name, message, optimizer
):
    _refused(tmp_path / "o", message, model=factories(name), optimizer={"name": optimizer})


def test_spectrum_of_a_frozen_model_does_not_suggest_k_0(tmp_path, factories):
    train(train_config(tmp_path / "run", model=factories("plain"), epochs=1))
    args = [
        "spectrum",
        str(tmp_path / "run" / "last.pt"),
        "--model",
        factories("frozen")["factory"],
        "--samples",
        "32",
        "--k",
        "1",
        "--device",
        "cpu",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: the model has no trainable parameters"), line
    assert "k <=" not in result.stderr


# ------------------------------------------------------------------ B5: meta device


def test_a_factory_model_on_the_meta_device_is_one_line(tmp_path, factories):
    text = _refused(tmp_path / "o", "on the meta device", model=factories("meta"))
    assert "fac.py:meta" in text and "to_empty" in text
    with pytest.raises(SharpscopeError, match="meta device"):
        build_model(factories("meta"), (40,), 10)
    with torch.device("meta"):  # asked for on purpose: a meta build stays possible
        assert build_model(factories("plain"), (40,), 10)[1].weight.is_meta
        assert build_model({"name": "resnet20"}, (3, 32, 32), 10).head.weight.is_meta


def test_the_analyses_refuse_a_model_on_the_meta_device():
    with torch.device("meta"):
        model = nn.Linear(4, 2)
    data = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    for call in (
        lambda: ss.top_eigenvalues(model, data, k=1),
        lambda: ss.m_sharpness(model, data, m=4, rho=0.05),
    ):
        with pytest.raises(SharpscopeError, match="on the meta device"):
            call()


# ------------------------------------------------------------------ B6: absurd sizes


def test_an_option_too_large_to_build_is_one_line(tmp_path):
    with pytest.raises(SharpscopeError) as info:
        build_model({"name": "resnet20", "width": 1e20}, (3, 32, 32), 10)
    text = str(info.value)
    assert text.startswith("building model 'resnet20' with width=1e+20 failed")
    assert "overflows a 64-bit integer" in text and "\n" not in text
    _refused(
        tmp_path / "o",
        "building model 'mlp'",
        model={"name": "mlp", "width": 2**62, "depth": 1},
    )


def test_a_model_that_does_not_fit_in_memory_says_so_not_batch_size(monkeypatch):
    from sharpscope import models

    def huge(input_shape, num_classes, **options):
        if not torch.empty(0).is_meta:  # the real build runs out; the meta count does not
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:116] DefaultCPUAllocator: "
                "can't allocate memory: you tried to allocate 4e+14 bytes"
            )
        return nn.Linear(1000, 1000)

    monkeypatch.setitem(models.MODELS, "huge", huge)
    with pytest.raises(SharpscopeError) as info:
        build_model({"name": "huge", "width": 9}, (3,), 10)
    text = str(info.value)
    assert "building model 'huge' with width=9 ran out of memory" in text
    assert "(1,001,000 parameters, 0.0 GB in float32)" in text
    assert "batch-size" not in text


def test_a_model_too_large_for_the_device_says_so_not_batch_size(tmp_path, factories):
    text = _refused(
        tmp_path / "o", "does not fit in the memory of cpu", model=factories("too_large")
    )
    assert "(410 parameters)" in text and "batch" not in text


# ------------------------------------------------------------------ D1: other data


def test_an_analysis_on_data_with_more_classes_names_the_mismatch(tmp_path):
    """D1 (session 29): PyTorch's 'Target 15 is out of bounds' did not say that the data
    have more classes than the checkpoint's model was built for."""
    train(train_config(tmp_path / "run", epochs=1))
    (tmp_path / "more.py").write_text(
        "import torch\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(64, 40, generator=g), torch.arange(64) % 20\n"
    )
    args = ["msharpness", str(tmp_path / "run" / "last.pt"), "--m", "8", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--data", f"{tmp_path / 'more.py'}:make"])
    assert result.exit_code == 2, result.output
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert (
        "built for inputs of shape (40,) and 10 classes, and the data give inputs of shape "
        "(40,) and 20 classes" in line
    ), line
    assert line.startswith("error: the model or loss failed on the data: IndexError:")


def test_a_model_with_half_precision_weights_warns_that_small_updates_are_lost(tmp_path, factories):
    """A factory's .half() model trained silently while most of its weights never moved
    (s29 models D5); mixed precision keeps float32 weights."""
    with pytest.warns(UserWarning, match=r"weights are float16: an update below .* is lost"):
        train(train_config(tmp_path / "h", model=factories("half"), epochs=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(train_config(tmp_path / "f", model=factories("plain"), epochs=1))


def test_a_model_with_more_outputs_than_classes_warns(tmp_path, factories):
    """A 20-output model on MNIST-1D's 10 classes trained silently (s29 models D2)."""
    with pytest.warns(UserWarning, match=r"the model has 20 outputs but the data have 10 classes"):
        train(train_config(tmp_path / "w", model=factories("wide"), epochs=1))


def test_negative_labels_are_refused_before_training_without_the_analyses_warning(tmp_path):
    """cross_entropy skips -100 (ignore_index), so such data trained an epoch and then failed
    in its first evaluation with a traceback, the epoch lost (s29 readme B1)."""
    factory = tmp_path / "neg.py"
    factory.write_text(
        "import torch\n"
        "def neg():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    y = torch.randint(0, 3, (64,), generator=g)\n"
        "    y[:3] = -100\n"
        "    return torch.randn(64, 40, generator=g), y\n"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the analyses' batch-weight warning is not for train
        _refused(
            tmp_path / "n",
            "the train data hold 3 negative labels (such as cross_entropy's ignore_index -100)",
            dataset={"factory": f"{factory}:neg"},
        )


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "sam"])
def test_a_sparse_embedding_is_refused_before_training(tmp_path, factories, optimizer):
    """models D11 (session 29): nn.Embedding(sparse=True) with SGD's momentum and weight
    decay ended in PyTorch's traceback "add(sparse, dense) is not supported" at the first
    step (Adam: "does not support sparse gradients")."""
    _refused(
        tmp_path / "o",
        "the model's Embedding 'emb' has sparse=True",
        model=factories("sparse"),
        optimizer={"name": optimizer},
    )


def test_lets_hvp_on_a_model_without_second_derivatives_is_refused_before_training(
    tmp_path, factories
):
    """tvmodels B1 (session 31): `--hypergrad hvp` on a model PyTorch cannot differentiate
    twice ended at the first step in PyTorch's traceback, after config.json was written
    (nn.Hardsigmoid, in every torchvision MobileNetV3, now has a twice-differentiable form;
    torch.cdist has none: "the derivative for '_cdist_backward' is not implemented")."""
    lets = {"name": "lets", "hypergrad": "hvp", "base": {"name": "sgd", "lr": 0.05}}
    text = _refused(
        tmp_path / "o",
        "LETS hypergrad='hvp' needs the model's second derivatives",
        model=factories("prototypes"),
        optimizer=lets,
    )
    assert "_cdist_backward" in text and "use hypergrad='diag' or 'fd'" in text
    # the same line from a researcher's own loop, at the step
    from sharpscope.optim import LETS, BatchClosure

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Hardsigmoid(), nn.Linear(8, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    loss = nn.functional.cross_entropy
    opt = LETS(model.parameters(), torch.optim.SGD, lr=0.1, hypergrad="hvp", val_batches=(x, y))
    for _ in range(2):  # Hardsigmoid: LETS' HVP runs (the first step has none to take)
        opt.step(BatchClosure(model, loss, x, y))
    namespace: dict = {}
    exec(FACTORIES, namespace)  # the factories' own module
    prototypes = namespace["prototypes"]()
    x = torch.randn(16, 40)
    opt = LETS(
        prototypes.parameters(), torch.optim.SGD, lr=0.1, hypergrad="hvp", val_batches=(x, y)
    )
    with pytest.raises(SharpscopeError, match="needs the model's second derivatives"):
        for _ in range(2):
            opt.step(BatchClosure(prototypes, loss, x, y))
