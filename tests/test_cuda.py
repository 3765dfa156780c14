"""The CUDA paths: exact answers on the GPU, and the same results as on the CPU.

Skipped on machines without a CUDA GPU (CI has none); run on a GPU machine with
``pytest tests/test_cuda.py``. Each test runs the code a user runs on a GPU (the
analyses' GPU defaults included: vmap over grid points, blocks of HVPs) and checks it
against a float64 answer computed independently of that path.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.analysis.landscape import VMAP_MAX_FLOPS_PER_SM, landscape
from sharpscope.analysis.msharpness import m_sharpness
from sharpscope.analysis.spectrum import hessian_trace, spectral_density, top_eigenvalues
from sharpscope.curvature import HessianOperator, dense_hessian
from sharpscope.optim import BatchClosure, build_optimizer
from sharpscope.registry import build_model

from cases import (
    fit_full_batch,
    full_and_resumed_runs,
    rendezvous_file,
    spawned_group,
    train_config,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
F64 = torch.float64


@pytest.fixture(scope="module")
def bn_cnn():
    """The registry's BatchNorm CNN (width 2) on 64 random 8x8 images, trained a little."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(64, 1, 8, 8, generator=gen, dtype=F64)
    y = torch.randint(0, 10, (64,), generator=gen)
    model = build_model({"name": "cnn", "width": 2, "norm": "batch"}, (1, 8, 8), 10).to(F64)
    model.train()
    fit_full_batch(model, x, y, 20, 0.05)
    return model.eval(), x, y


def _on_cuda(model, x, y):
    return copy.deepcopy(model).cuda(), x.cuda(), y.cuda()


def test_spectrum_on_cuda_matches_the_dense_hessian(bn_cnn):
    model, x, y = bn_cnn
    H = dense_hessian(model, (x, y))
    exact = torch.linalg.eigvalsh(H).flip(0)
    gpu = _on_cuda(model, x, y)

    top = top_eigenvalues(gpu[0], gpu[1:], k=5, dtype="float64")
    assert top.meta.device.startswith("cuda")
    np.testing.assert_allclose(top.eigenvalues.cpu().numpy(), exact[:5].numpy(), rtol=1e-6)

    trace = hessian_trace(gpu[0], gpu[1:], dtype="float64", seed=0)
    assert abs(trace.trace - float(torch.trace(H))) <= 4 * trace.stderr + 1e-9 * abs(trace.trace)

    options = {"num_probes": 4, "num_lanczos_steps": 40, "dtype": "float64", "seed": 0}
    density = spectral_density(gpu[0], gpu[1:], **options)
    on_cpu = spectral_density(model, (x, y), **options)  # the same probes (a CPU generator)
    assert abs(density.trace - float(torch.trace(H))) <= 4 * density.trace_stderr + 1e-6
    values, reference = density.values.cpu().numpy(), on_cpu.values.numpy()
    np.testing.assert_allclose(values, reference, rtol=1e-6, atol=1e-9 * reference.max())


def test_m_sharpness_on_cuda_vmap_equals_loop_and_cpu(bn_cnn):
    model, x, y = bn_cnn
    options = {"m": 8, "rho": 0.05, "adaptive": True, "steps": 3}
    cpu = m_sharpness(model, (x, y), vectorize=False, **options)
    gpu = _on_cuda(model, x, y)
    fast = m_sharpness(gpu[0], gpu[1:], **options)
    slow = m_sharpness(gpu[0], gpu[1:], vectorize=False, **options)
    assert fast.sharpness == pytest.approx(slow.sharpness, rel=1e-10)
    assert fast.sharpness == pytest.approx(cpu.sharpness, rel=1e-10)
    assert fast.sharpness > 0


def test_landscape_on_cuda_vectorizes_and_matches_the_cpu_loop(bn_cnn):
    model, x, y = bn_cnn
    options = {"grid": 5, "seed": 0}
    cpu = landscape(model, (x, y), 2, vectorize=False, fold_bn=False, **options)
    gpu = _on_cuda(model, x, y)
    result = landscape(gpu[0], gpu[1:], 2, **options)  # the GPU default: vmap over points
    assert result.meta.extra["vectorized"] and result.settings["bn_folded"]
    loop = landscape(gpu[0], gpu[1:], 2, vectorize=False, **options)  # not folded on CUDA
    assert not loop.meta.extra["vectorized"] and loop.settings["bn_folded"] == []
    for found in (result, loop):
        np.testing.assert_allclose(np.asarray(found.loss), np.asarray(cpu.loss), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(found.accuracy), np.asarray(cpu.accuracy))


def test_the_gpu_default_is_the_loop_when_one_point_fills_the_gpu():
    """ResNet-20 on 1,024 CIFAR-sized images (84 GFLOP per point): vmap ran at 0.84x the
    loop on an H200, so the default is the loop there; a small model's stays vmap."""
    torch.manual_seed(0)
    model = build_model({"name": "resnet20"}, (3, 32, 32), 10).cuda().eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 3, 32, 32, generator=gen).cuda()
    y = torch.randint(0, 10, (1024,), generator=gen).cuda()
    big = landscape(model, (x, y), 2, grid=3)
    flops = big.meta.extra["forward_flops_per_call"]
    assert flops == pytest.approx(1024 * 2 * 40.8e6, rel=0.02)  # 40.8M multiply-adds each
    multiprocessors = torch.cuda.get_device_properties(0).multi_processor_count
    expected = flops <= VMAP_MAX_FLOPS_PER_SM * multiprocessors
    assert big.meta.extra["vectorized"] is expected
    if multiprocessors <= 160:  # H100, H200 (132), A100 (108): the loop
        assert big.meta.extra["vectorized"] is False
    small = landscape(model, (x[:64], y[:64]), 2, grid=3)
    assert small.meta.extra["vectorized"] is True
    # the loop the default picks keeps vmap's settings: a slice resumes on any GPU
    assert big.settings["bn_folded"] == small.settings["bn_folded"] != []
    assert big.settings["input_layers"] == small.settings["input_layers"] == []
    forced = landscape(model, (x, y), 2, grid=3, vectorize=not expected)
    np.testing.assert_allclose(np.asarray(forced.loss), np.asarray(big.loss), rtol=1e-4)


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "sam", "rho": 0.05},
        {"name": "asam", "rho": 0.5},
        {"name": "vasso", "rho": 0.05, "theta": 0.9},
        {"name": "samon", "rho": 0.5},
    ],
    ids=lambda s: s["name"],
)
def test_sharpness_aware_steps_on_cuda_equal_the_cpu_steps(bn_cnn, spec):
    model, x, y = bn_cnn
    base = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    nets = {"cpu": copy.deepcopy(model).train(), "cuda": copy.deepcopy(model).cuda().train()}
    for device, net in nets.items():
        opt = build_optimizer({**spec, "base": base}, net, num_data=len(y))
        for _ in range(3):
            opt.step(BatchClosure(net, nn.functional.cross_entropy, x.to(device), y.to(device)))
    for a, b in zip(nets["cpu"].state_dict().values(), nets["cuda"].state_dict().values()):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    [{"name": "bsam", "lr": 0.05, "rho": 0.01}, {"name": "lets", "rho": 0.05}],
    ids=["bsam", "lets"],
)
def test_stochastic_optimizers_step_on_cuda(bn_cnn, spec):
    model, x, y = bn_cnn
    net = copy.deepcopy(model).cuda().train()
    before = [p.detach().clone() for p in net.parameters()]
    val = [(x[:32].cuda(), y[:32].cuda())]
    opt = build_optimizer(spec, net, num_data=len(y), val_batches=val)
    for _ in range(3):
        opt.step(BatchClosure(net, nn.functional.cross_entropy, x.cuda(), y.cuda()))
    after = list(net.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def _cuda_training(out, **changes):
    cuda = {
        "model": {"name": "cnn1d", "norm": "batch"},
        "optimizer": {"name": "sam", "rho": 0.05, "base": {"name": "sgd", "lr": 0.05}},
        "epochs": 3,
        "device": "cuda",
    }
    return train_config(out, **{**cuda, **changes})


def test_training_on_cuda_resumes_exactly(tmp_path, monkeypatch):
    from sharpscope.io import load_checkpoint

    full, resumed = full_and_resumed_runs(_cuda_training, tmp_path, monkeypatch)
    # cuDNN's weight-gradient kernels are not bitwise deterministic, so two uninterrupted GPU
    # runs already differ in the last bits (an H200 gave 4.4e-7 at most after 3 epochs); a
    # resume that lost the optimizer state, the data order or the RNG state differs by far more
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    # the checkpoint written on the GPU loads on the CPU (weights_only)
    ckpt = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert next(ckpt.model.parameters()).device.type == "cpu"


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_deterministic_training_on_cuda_resumes_bit_identically(tmp_path, monkeypatch, precision):
    """With --deterministic, a GPU run and its resume end with bitwise the same weights;
    in fp16 the GradScaler's scale and growth tracker come back from the checkpoint too."""
    from sharpscope.io import load_checkpoint

    def config_at(out):
        return _cuda_training(
            out,
            dataset={"name": "digits", "samples": 512},
            model={"name": "resnet20", "width": 4},
            deterministic=True,
            augment=False,
            precision=precision,
        )

    full, resumed = full_and_resumed_runs(config_at, tmp_path, monkeypatch)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.are_deterministic_algorithms_enabled()  # restored after training
    states = [
        load_checkpoint(tmp_path / run / "last.pt").raw.get("scaler_state")
        for run in ("full", "cut")
    ]
    if precision == "fp16":
        assert states[0] is not None and states[0] == states[1]
    else:
        assert states == [None, None]


def test_the_per_gradient_hook_runs_on_nccl():
    """Training registers distributed.reduce_each_gradient with --deterministic on a GPU,
    where DDP's backend is NCCL: its futures must chain there as on gloo (tested on CPU with
    3 processes). One GPU allows one rank, whose average is its own gradient."""
    torch.multiprocessing.spawn(_nccl_hook_worker, args=(rendezvous_file(),), nprocs=1, join=True)


def _nccl_hook_worker(rank, rendezvous):
    from sharpscope.distributed import reduce_each_gradient

    torch.cuda.set_device(0)
    with spawned_group(rank, 1, rendezvous, backend="nccl"):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 4)).cuda()
        x, y = torch.randn(20, 12).cuda(), torch.randint(0, 4, (20,)).cuda()
        nn.functional.cross_entropy(net(x), y).backward()
        plain = [p.grad.clone() for p in net.parameters()]
        net.zero_grad(set_to_none=True)
        ddp = nn.parallel.DistributedDataParallel(net, device_ids=[0])
        ddp.register_comm_hook(None, reduce_each_gradient)
        for _ in range(2):  # the first step and the one after DDP rebuilt its buckets
            ddp.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(ddp(x), y).backward()
            for p, g in zip(net.parameters(), plain):
                torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-7)


def _cifar_sized_cnn(n: int, dtype: torch.dtype = torch.float32):
    """The registry's CNN (width 16, no BatchNorm) and n random 3x32x32 images, on CUDA."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=gen, dtype=dtype).cuda()
    y = torch.randint(0, 10, (n,), generator=gen).cuda()
    model = build_model({"name": "cnn", "width": 16}, (3, 32, 32), 10).to(dtype).cuda().eval()
    return model, x, y, gen


def _peak_bytes(compute):
    """``compute()`` and the most CUDA memory it allocated beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = compute()
    return result, torch.cuda.max_memory_allocated() - base


@contextlib.contextmanager
def _gpu_memory_capped(extra_bytes: float):
    """Let PyTorch's CUDA allocator hold only what it holds now plus ``extra_bytes``."""
    torch.cuda.empty_cache()
    cap = torch.cuda.memory_reserved() + extra_bytes
    torch.cuda.set_per_process_memory_fraction(
        cap / torch.cuda.get_device_properties(0).total_memory
    )
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def _relative_error(found: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(found - expected) / torch.linalg.vector_norm(expected))


def test_block_products_shrink_when_the_gpu_runs_out_of_memory():
    """A real CUDA out-of-memory error (the allocator capped) halves the HVP block."""
    model, x, y, gen = _cifar_sized_cnn(512)
    op = HessianOperator(model, (x, y), dtype="float64", hvp_mode="forward", max_block_size=64)
    V = torch.randn(64, op.dim, generator=gen, dtype=F64).cuda()
    expected = torch.stack([op.hvp(v) for v in V[:4]])  # single products: the reference
    _, two = _peak_bytes(lambda: op.hvp_block(V[:2]))
    with (
        _gpu_memory_capped(8 * two / 2),
        pytest.warns(RuntimeWarning, match="Hessian-vector products per call"),
    ):
        HV = op.hvp_block(V)
    assert 1 <= op.max_block_size <= 8
    assert op.hvp_count == 4 + 2 + 64
    assert _relative_error(HV[:4], expected) <= 1e-10  # float64: rows are the single products


def test_a_batch_that_does_not_fit_on_the_gpu_is_halved():
    """A real CUDA out-of-memory error in a single product halves the batches (eval mode)."""
    model, x, y, gen = _cifar_sized_cnn(1024)
    kwargs = {"dtype": "float64", "hvp_mode": "forward", "max_block_size": 1}
    whole = HessianOperator(model, (x, y), **kwargs)
    v = torch.randn(whole.dim, generator=gen, dtype=F64).cuda()
    expected, one_product = _peak_bytes(functools.partial(whole.hvp, v))
    del whole
    with _gpu_memory_capped(0.7 * one_product):
        with pytest.warns(RuntimeWarning, match="does not fit in device memory"):
            op = HessianOperator(model, (x, y), **kwargs)
            Hv = op.hvp(v)
    assert op.batches_halved >= 1
    assert _relative_error(Hv, expected) <= 1e-10


def test_a_landscape_block_that_does_not_fit_on_the_gpu_is_split():
    """A real CUDA out-of-memory error in a vmapped block of grid points splits the block."""
    model, x, y, _ = _cifar_sized_cnn(1024, F64)
    options = {"grid": 5, "seed": 0, "chunk_size": 25, "vectorize": True}  # 25 points a call
    whole, block = _peak_bytes(lambda: landscape(model, (x, y), 2, **options))
    with _gpu_memory_capped(block / 4):
        with pytest.warns(RuntimeWarning, match="grid points per call"):
            split = landscape(model, (x, y), 2, **options)
    assert split.complete
    np.testing.assert_allclose(np.asarray(split.loss), np.asarray(whole.loss), rtol=1e-10)


def test_the_remembered_hvp_mode_names_the_gpu(bn_cnn, tmp_path, monkeypatch):
    """The disk cache of HVP modes keys a CUDA operator by the GPU's name, and a later
    operator on the same configuration (the process's memory cleared) reads its choice."""
    import json

    from sharpscope.curvature import clear_mode_cache
    from sharpscope.curvature.mode_cache import ENV_SWITCH, FILE_NAME

    monkeypatch.setenv("SHARPSCOPE_CACHE", str(tmp_path))
    monkeypatch.delenv(ENV_SWITCH, raising=False)
    model, x, y = _on_cuda(*bn_cnn)
    clear_mode_cache()
    first = HessianOperator(model, (x, y))
    clear_mode_cache()
    later = HessianOperator(model, (x, y))
    clear_mode_cache()
    assert not first.hvp_mode_cached and later.hvp_mode_cached
    assert later.hvp_mode == first.hvp_mode
    (entry,) = json.loads((tmp_path / FILE_NAME).read_text()).values()
    assert entry["configuration"]["device"] == f"cuda {torch.cuda.get_device_name(0)}"
    v = torch.randn(first.dim, dtype=F64, device="cuda")
    torch.testing.assert_close(later.hvp(v), first.hvp(v), rtol=1e-10, atol=1e-12)
