"""Problems with exact answers, shared by the test modules (STYLE.md: tests/cases.py).

pytest puts this folder on ``sys.path`` (it holds the root conftest), so test modules in
sub-folders import it as ``from cases import ...``.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import subprocess
import sys

import torch
import torch.distributed as dist
from torch import nn

F64 = torch.float64

# The keys interface.md promises in `spectrum --json` / Spectrum.to_json().
SPECTRUM_JSON_KEYS = {
    "eigenvalues",
    "lambda_max",
    "lambda_5",
    "ratio",
    "trace",
    "trace_stderr",
    "density",
    "hvp_count",
    "seconds",
    "meta",
}


def bn_conv1d(channels: int, length: int, *, dtype: torch.dtype = F64, seed: int = 0):
    """A small Conv1d -> BatchNorm -> ReLU -> Linear(3) classifier of flat inputs of
    ``channels * length`` values, its BatchNorm statistics and scale away from 1 and 0."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Unflatten(1, (channels, length)),
        nn.Conv1d(channels, 4, 3, stride=2, padding=1),
        nn.BatchNorm1d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * ((length + 1) // 2), 3),
    ).to(dtype)
    with torch.no_grad():
        net[2].running_mean.uniform_(-0.5, 0.5)
        net[2].running_var.uniform_(0.5, 2.0)
        net[2].weight.uniform_(0.5, 1.5)
    return net


def half_mse(out, t):
    """ℓ = ½(f(x) − y)²: with a linear model the loss is exactly quadratic in w."""
    return 0.5 * (out.squeeze(-1) - t).pow(2).mean()


def linear_regression(n: int, d: int, seed: int = 0, *, noise: bool = True):
    """A float64 linear model and data (features scaled 0.5..2) with y = x·w (+ noise).

    Without noise every subset loss is at its minimum (gradient 0, loss 0).
    """
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, 1, bias=False).to(F64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=F64))
    x = torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(0.5, 2.0, d, dtype=F64)
    y = x @ model.weight.detach()[0]
    if noise:
        y = y + torch.randn(n, generator=g, dtype=F64)
    return model, x, y


def three_class_blobs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples of 8 features around three seeded centres (spread 2) and their labels
    0..2 (generator seed 1; torch's global seed is left alone)."""
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (n,), generator=gen)
    return torch.randn(3, 8, generator=gen)[y] * 2 + torch.randn(n, 8, generator=gen), y


def fit_full_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float):
    """A few seeded full-batch SGD steps, so a spectrum has trained-like outliers."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def bulk(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    """n seeded uniform float64 values in [lo, hi): the bulk of a planted spectrum."""
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64)


def rel_err(found: torch.Tensor, exact: torch.Tensor) -> float:
    """Largest relative error of ``found`` against ``exact`` (elementwise)."""
    return float(((found - exact).abs() / exact.abs()).max())


def interrupt_after_first_epoch(monkeypatch) -> None:
    """Make the trainer crash (KeyboardInterrupt) in epoch 2, after epoch 1's checkpoint."""
    import sharpscope.trainer as train_module

    original = train_module._evaluate_epoch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated crash during epoch 2")
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "_evaluate_epoch", flaky)


def full_and_resumed_runs(config_at, tmp_path, monkeypatch):
    """Train once through, and once cut in epoch 2 then resumed; both summaries.

    ``config_at(out)`` gives the TrainConfig writing to ``out``.
    """
    import pytest

    from sharpscope.io import load_checkpoint
    from sharpscope.trainer import train

    full = train(config_at(tmp_path / "full"))
    interrupt_after_first_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(config_at(tmp_path / "cut"))
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "cut" / "last.pt").epoch == 1
    return full, train(config_at(tmp_path / "cut"), resume=True)


@contextlib.contextmanager
def spawned_group(rank: int, world: int, rendezvous: str, backend: str = "gloo"):
    """A spawned test worker's process group met through ``rendezvous`` (a ``file://``
    init method from :func:`rendezvous_file`; one torch thread): gloo, or
    ``backend="nccl"`` for CUDA tests.

    A rank that finishes leaves as a torchrun rank of the CLI does
    (:func:`sharpscope.distributed.leave_process_group`): the ranks meet at a barrier, the
    group is destroyed and the process exits at once, without the interpreter's teardown, in
    which a gloo rank was seen to abort after its work was saved (SIGABRT, "terminate called
    without an active exception"; CI, under load, with or without the barrier). A rank that
    fails skips the barrier and raises; ``mp.spawn`` then reports it and stops the others.
    """
    from sharpscope.distributed import leave_process_group

    torch.set_num_threads(1)
    # a collective that one rank never joins fails after 2 minutes instead of hanging the suite
    dist.init_process_group(
        backend,
        init_method=rendezvous,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    if world > 1:
        leave_process_group(0)  # does not return
    dist.destroy_process_group()


def rendezvous_file() -> str:
    """A ``file://`` init method in a fresh temporary folder. A TCP port found free and
    then closed can be taken by another test (pytest -n, torchrun --standalone) before the
    group binds it, which failed a DDP test under load; a file cannot be taken."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="sharpscope-group-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return f"file://{folder}/store"


# name -> (folder, files in order (train..., test...), label key, number of classes)
CIFAR_FILES = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
        b"labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train", "test"], b"fine_labels", 100),
}


def write_cifar(
    folder, name, n_train_per_file=6, n_test=5, seed=0, *, labels=None, pixels=None, protocol=2
):
    """Tiny CIFAR-10/100 files in the originals' python-2 pickle layout; the folder holding them.

    Random uint8 images and labels. ``labels``: one list per file, in file order, fixes the
    labels (and each file's size); ``pixels(images, labels)`` returns the (n, 3072) uint8
    rows to write instead of the random ``images``.
    """
    import pickle

    import numpy as np

    rng = np.random.default_rng(seed)
    sub_name, files, key, classes = CIFAR_FILES[name]
    sub = folder / sub_name
    sub.mkdir(parents=True)
    for i, file in enumerate(files):
        n = n_test if "test" in file else n_train_per_file
        if labels is not None:
            n = len(labels[i])
        images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        targets = rng.integers(0, classes, size=n).tolist() if labels is None else list(labels[i])
        batch = {
            b"batch_label": file.encode(),
            b"data": images if pixels is None else pixels(images, targets),
            key: targets,
            b"filenames": [f"img_{j}.png".encode() for j in range(n)],
        }
        with (sub / file).open("wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)  # the originals: python2 pickles
    return sub


def write_checkpoint(path, spec, input_shape, data, seed=0, epoch=1, **extra):
    """A checkpoint in sharpscope's format for a freshly built ``spec`` (10 classes), with
    BatchNorm running statistics moved off their defaults so eval mode matters."""
    from sharpscope.io import FORMAT, VERSION, save_checkpoint
    from sharpscope.registry import build_model

    torch.manual_seed(seed)
    net = build_model(spec, tuple(input_shape), 10)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    save_checkpoint(
        path,
        {
            "format": FORMAT,
            "version": VERSION,
            "model": spec,
            "data": data,
            "input_shape": list(input_shape),
            "num_classes": 10,
            "epoch": epoch,
            "step": epoch,
            "metrics": {},
            "state_dict": net.state_dict(),
            **extra,
        },
    )
    return path


def tiny_study_toml(name: str, m: list[int]) -> str:
    """A study config of four one-epoch runs (SGD and SAM, two seeds) of a width-8 MLP on
    192 MNIST-1D examples, analysed for m-sharpness (these m, rho 0.05) on 64 of them."""
    return f"""
[study]
name = "{name}"

[train]
dataset = {{name = "mnist1d", samples = 192}}
model = {{name = "mlp", width = 8, depth = 1}}
epochs = 1
batch_size = 64
device = "cpu"

[sweep]
optimizer = ["sgd", "sam"]
seed = [0, 1]

[analysis]
samples = 64

[analysis.m_sharpness]
m = {m}
rho = [0.05]
steps = 1
"""


class RecurrentClassifier(nn.Module):
    """A 2-feature sequence classifier (3 classes) on an ``nn.LSTM`` or ``nn.GRU``:
    ``torch.func.vmap`` has no batching rule for either."""

    def __init__(self, cell: type[nn.Module] = nn.LSTM) -> None:
        super().__init__()
        self.rnn, self.head = cell(2, 4, batch_first=True), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def loss_that_kills_rank_1(after_calls: int, rank: int = 1) -> str:
    """Source of a loss factory ``loss()`` whose cross-entropy ends rank 1 (or ``rank``) of a
    torchrun job (``os._exit(9)``, as an out-of-memory kill would) once called
    ``after_calls`` times."""
    return (
        "import os\n"
        "import torch\n\n\n"
        f"def loss(calls={after_calls}):\n"
        "    count = [0]\n\n"
        "    def cross_entropy(out, target):\n"
        "        count[0] += 1\n"
        f"        if os.environ.get('RANK') == '{rank}' and count[0] > calls:\n"
        "            os._exit(9)\n"
        "        return torch.nn.functional.cross_entropy(out, target)\n\n"
        "    return cross_entropy\n"
    )


def torchrun(
    *args: str, processes: int = 2, cwd=None, launcher: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone ... -m sharpscope ARGS``, output
    captured; ``launcher``: more options of torchrun's own (e.g. ``--monitor-interval``)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", *launcher]
    command += ["--nproc_per_node", str(processes), "-m", "sharpscope", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)


#: torchrun's agent checks its processes every 30 s: a rank meets a lost peer itself
#: before the agent would stop it with SIGTERM
SLOW_AGENT = ("--monitor-interval", "30")

#: what every rank says when the processes read different data
DIFFERENT_DATA = (
    "error: the train data differ between the torchrun processes (rank 1's are not rank "
    "0's): every process must read the same data; a data factory that draws random data "
    "must seed it (e.g. torch.Generator().manual_seed(0))"
)


def error_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The ``error:`` lines a finished command printed on stderr."""
    return [line for line in done.stderr.splitlines() if line.startswith("error:")]


def full_and_resumed_under_torchrun(tmp_path, args: list[str], processes: int = 2):
    """Checkpoints of a torchrun run straight through (``full``) and of the same run
    restarted from its epoch-1 snapshot (``cut``); also the resumed call's output."""
    full = torchrun(
        *args, "--save-every", "1", "--out", str(tmp_path / "full"), processes=processes
    )
    assert full.returncode == 0, full.stderr[-2000:]
    (tmp_path / "cut").mkdir()
    shutil.copy(tmp_path / "full" / "epoch_001.pt", tmp_path / "cut" / "last.pt")
    shutil.copy(tmp_path / "full" / "metrics.jsonl", tmp_path / "cut" / "metrics.jsonl")
    resumed = torchrun(
        "train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress", processes=processes
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)
    return a, b, resumed


def train_config(folder, **changes):
    """A small CPU training config (MNIST-1D, 512 examples, MLP of width 32, SGD, 2 epochs,
    batch 64) writing to ``folder``; ``changes`` replace its fields (``out`` too)."""
    from sharpscope.trainer import TrainConfig

    values = dict(
        dataset={"name": "mnist1d", "samples": 512},
        model={"name": "mlp", "width": 32, "depth": 1},
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4},
        epochs=2,
        batch_size=64,
        seed=0,
        out=str(folder),
        progress=False,
        device="cpu",
    )
    values.update(changes)
    return TrainConfig.from_dict(values)


def step_loss_factory(folder, returns: str) -> str:
    """A ``file.py:make`` loss factory spec: cross-entropy ``value`` that returns the Python
    expression ``returns`` instead (of ``value`` and ``calls``, the training steps so far,
    this one included)."""
    path = folder / "step_loss.py"
    path.write_text(
        "import torch, torch.nn.functional as F\n"
        "calls = 0\n"
        "def make():\n"
        "    def loss(out, y):\n"
        "        global calls\n"
        "        if out.requires_grad:  # a training step\n"
        "            calls += 1\n"
        "        value = F.cross_entropy(out, y)\n"
        f"        return {returns}\n"
        "    return loss\n"
    )
    return f"{path}:make"


class AttentionClassifier(nn.Module):
    """nn.TransformerEncoderLayer (width 4, 2 heads) -> mean over the sequence -> 3 logits:
    its fused attention kernels have no double backward and no forward-mode derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=6, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class PreNormOutputReused(nn.Module):
    """conv -> BN, but the raw conv output also feeds the head: folding would change f."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv1d(1, 3, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)

    def forward(self, x):
        z = self.conv(x)
        return self.head((self.norm(z) + z).mean(-1))


def product_function(a_factor: float = 1.0, b_factor: float = 1.0):
    """``a * b`` as an old-style ``torch.autograd.Function`` (no ``setup_context``, so no
    torch.func rule) whose backward scales a's gradient by ``a_factor`` and b's by
    ``b_factor``: with factors other than 1 the gradient field it defines is not a gradient,
    and its reverse-over-reverse "Hessian" is not symmetric (as PyTorch's weight_norm
    double backward is not)."""

    class Product(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return a * b

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            return a_factor * grad * b, b_factor * grad * a

    return Product


def finite_difference_hessian(model: nn.Module, x, y, h: float = 1e-5) -> torch.Tensor:
    """The symmetrized central difference of the cross-entropy's gradient, column by
    column: first derivatives only (reverse mode, which every kernel has), independent of
    any second-derivative path; about h² ≈ 1e-10 from the exact Hessian in float64."""
    params = list(model.parameters())
    theta = torch.cat([p.detach().reshape(-1) for p in params])

    def gradient(flat):
        torch.nn.utils.vector_to_parameters(flat, params)
        loss = nn.functional.cross_entropy(model(x), y)
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    columns = []
    for i in range(len(theta)):
        step = torch.zeros_like(theta)
        step[i] = h
        columns.append((gradient(theta + step) - gradient(theta - step)) / (2 * h))
    torch.nn.utils.vector_to_parameters(theta, params)
    H = torch.stack(columns, 1)
    return (H + H.T) / 2
