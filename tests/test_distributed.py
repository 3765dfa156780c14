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
    """Inside a (faked) 2-rank group: False gives (0, 1); None and True give (rank 1, size 2)."""
    from sharpscope import distributed

    monkeypatch.setattr(distributed.dist, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "get_world_size", lambda: 2)
    assert distributed.group_rank_and_size(False) == (0, 1)
    assert distributed.group_rank_and_size(None) == (1, 2)
    assert distributed.group_rank_and_size(True) == (1, 2)


def test_gather_to_main_in_one_process_detaches_nested_tensors():
    """One process: [value], with tensors in dicts and lists detached CPU copies of the same values."""
    from sharpscope.distributed import gather_to_main

    weight = torch.ones(3, requires_grad=True)
    (out,) = gather_to_main({"w": weight * 2, "rest": [weight * 3, "label"]})
    assert not out["w"].requires_grad and torch.equal(out["w"], torch.full((3,), 2.0))
    assert not out["rest"][0].requires_grad and out["rest"][1] == "label"


def test_the_data_summary_tells_other_data_and_another_order_apart():
    from sharpscope.distributed import _close, data_summary

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5000, 3, 4, generator=gen), torch.randint(0, 10, (5000,), generator=gen)
    same = data_summary(x, y)
    assert same[0] == 5000 and _close(same, data_summary(x.clone(), y.clone()))
    order = torch.randperm(5000, generator=gen)
    assert not _close(same, data_summary(x[order], y[order]))  # the sums alone would agree
    moved = x.clone()
    moved[4500, 0, 0] += 1e-3  # one value in the second chunk of 4096
    assert not _close(same, data_summary(moved, y))
    labels = y.clone()
    labels[0] = (labels[0] + 1) % 10
    assert not _close(same, data_summary(x, labels))
    assert _close(data_summary(x.to(torch.uint8), y), data_summary(x.to(torch.uint8), y))
