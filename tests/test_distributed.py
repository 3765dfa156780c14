"""Device choice (distributed.pick_device): auto, cpu, cuda, cuda:N and nothing else."""

from __future__ import annotations

import pytest
import torch

from sharpscope.distributed import pick_device
from sharpscope.errors import SharpscopeError


@pytest.mark.parametrize("name", ["cpu", "CPU", "cpu:0", torch.device("cpu")])
def test_cpu_names(name):
    assert pick_device(name) == torch.device("cpu")


def test_auto_without_cuda_is_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_device(None) == torch.device("cpu")


@pytest.mark.parametrize("name", ["foo", "mps", "xla", "meta", "cuda:x", "cuda:", "gpu", "cpu:1"])
def test_unknown_device_is_one_line_not_a_torch_runtime_error(name):
    # torch.device("foo") raised "RuntimeError: Expected one of cpu, cuda, ... device
    # string: foo", a traceback on the command line; mps/meta failed later.
    with pytest.raises(SharpscopeError, match=f"unknown device '{name}'") as info:
        pick_device(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_says_so(monkeypatch, name):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SharpscopeError, match=f"device '{name}' requested but no CUDA GPU"):
        pick_device(name)


def test_cuda_index_is_checked_against_the_gpus_present(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device("cuda") == torch.device("cuda")
    assert pick_device("auto", local_rank=3) == torch.device("cuda", 1)
    with pytest.raises(SharpscopeError, match=r"'cuda:2' does not exist: .* 2 CUDA GPUs"):
        pick_device("cuda:2")


def test_device_names_are_checked_by_form_without_a_gpu(monkeypatch):
    from sharpscope.distributed import check_device_name

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device_name("cuda:3") == ("cuda", 3)  # a study's jobs may run elsewhere
    assert check_device_name("CPU") == ("cpu", None)
    with pytest.raises(SharpscopeError, match="unknown device 'xla'"):
        check_device_name("xla")


def test_group_rank_and_size_stays_single_only_when_asked(monkeypatch):
    """Inside a (faked) 2-rank group: False and the default give (0, 1), so an analysis
    called on rank 0 alone does not wait for the others; True gives (rank 1, size 2)."""
    from sharpscope import distributed

    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    assert distributed.group_rank_and_size(False) == (0, 1)
    assert distributed.group_rank_and_size() == (0, 1)
    assert distributed.group_rank_and_size(True) == (1, 2)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    with pytest.raises(SharpscopeError, match="distributed=True needs an initialised"):
        distributed.group_rank_and_size(True)


def test_gather_to_main_in_one_process_detaches_nested_tensors():
    """One process: [value], with tensors in dicts and lists detached CPU copies of the same values."""
    from sharpscope.distributed import gather_to_main

    weight = torch.ones(3, requires_grad=True)
    (out,) = gather_to_main({"w": weight * 2, "rest": [weight * 3, "label"]})
    assert not out["w"].requires_grad and torch.equal(out["w"], torch.full((3,), 2.0))
    assert not out["rest"][0].requires_grad and out["rest"][1] == "label"


def _rank_zero_alone_worker(rank: int, rendezvous: str, out_dir: str) -> None:
    """Rank 0 analyses and evaluates by itself, as a training script's "evaluate on rank
    0" does, while rank 1 waits at the barrier; each call must finish in one process."""
    import os

    import torch.distributed as dist
    from torch import nn
    from torch.nn import functional as F

    from sharpscope import evaluate, landscape, m_sharpness, top_eigenvalues

    from cases import spawned_group

    with spawned_group(rank, 2, rendezvous):
        if rank == 0:
            torch.manual_seed(0)
            net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
            x, y = torch.randn(24, 4, dtype=torch.float64), torch.arange(24) % 3
            done = {
                "eigen": top_eigenvalues(net, (x, y), k=2).meta.extra["world_size"],
                "msharp": m_sharpness(net, (x, y), m=8, rho=0.1).meta.extra["processes"],
                "landscape": landscape(net, (x, y), 1, grid=3).meta.extra["processes"],
                "evaluate": evaluate(net, x, y, F.cross_entropy)["acc"] >= 0,
            }
            torch.save(done, os.path.join(out_dir, "done.pt"))
        dist.barrier()


def test_an_analysis_on_rank_0_alone_does_not_wait_for_the_other_processes(tmp_path):
    """Session 28: the Python API joined any initialised group by default, so an analysis
    called on rank 0 alone waited forever for rank 1 (here: until the group's timeout)."""
    import torch.multiprocessing as mp

    from cases import rendezvous_file

    mp.spawn(_rank_zero_alone_worker, args=(rendezvous_file(), str(tmp_path)), nprocs=2)
    done = torch.load(tmp_path / "done.pt", weights_only=True)
    assert done == {"eigen": 1, "msharp": 1, "landscape": 1, "evaluate": True}
