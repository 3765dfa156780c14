"""Gaps found by a mutation audit of ``sharpscope/curvature/mode_cache.py`` and the keys
that ``HessianOperator`` gives it (session 25): every field of a configuration keeps two
configurations apart, in the process and in the file, and the file and the process keep
their newest entries when full."""

from __future__ import annotations

import json

import torch
from torch import nn

from sharpscope.curvature import HessianOperator, clear_mode_cache, mode_cache
from sharpscope.curvature.mode_cache import ENV_SWITCH


def _data(samples: int = 16):
    torch.manual_seed(0)
    return torch.randn(samples, 4, dtype=torch.float64), torch.randint(0, 3, (samples,))


def _model(activation=nn.Tanh):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), activation(), nn.Linear(6, 3)).double()


# K1 operator.py _mode_description: the "threads" field dropped (a choice timed with one
# CPU thread was reused with several, where the faster mode may differ)
def test_another_cpu_thread_count_is_another_entry(cache):
    model, data = _model(), _data()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        HessianOperator(model, data)
        clear_mode_cache()
        torch.set_num_threads(2)
        assert not HessianOperator(model, data).hvp_mode_cached
    finally:
        torch.set_num_threads(threads)
    assert sorted(
        e["configuration"]["threads"] for e in json.loads(cache.read_text()).values()
    ) == [1, 2]


# K2 operator.py _mode_description: the "architecture" field dropped (two models of one
# class and parameter shapes, Tanh vs ReLU, shared an entry)
def test_another_architecture_with_the_same_shapes_is_another_entry(cache):
    data = _data()
    HessianOperator(_model(nn.Tanh), data)
    clear_mode_cache()
    assert not HessianOperator(_model(nn.ReLU), data).hvp_mode_cached
    assert len(json.loads(cache.read_text())) == 2


# K3 operator.py _mode_description: the "loss" field dropped (mse read cross-entropy's choice)
def test_another_named_loss_is_another_entry(cache):
    model, data = _model(), _data()
    HessianOperator(model, data, loss="cross_entropy")
    clear_mode_cache()
    assert not HessianOperator(model, data, loss="mse").hvp_mode_cached
    losses = sorted(e["configuration"]["loss"] for e in json.loads(cache.read_text()).values())
    assert losses == ["cross_entropy", "mse"]


# K4 operator.py _mode_key: the input shape dropped from the in-process key (a second
# operator on more examples, in the same process, took the first one's choice)
# K5 operator.py _mode_key: the loss dropped from the in-process key
def test_in_one_process_another_input_shape_or_loss_is_timed_again(cache, monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")  # the process's memory alone
    model = _model()
    assert not HessianOperator(model, _data(16)).hvp_mode_cached
    assert not HessianOperator(model, _data(32)).hvp_mode_cached
    assert HessianOperator(model, _data(32)).hvp_mode_cached
    assert not HessianOperator(model, _data(32), loss="mse").hvp_mode_cached
    assert HessianOperator(model, _data(32), loss="mse").hvp_mode_cached


# M6 mode_cache.py remember: `entries.pop(on_disk, None)` dropped (a rewritten entry kept
#    its old place and went first when the file was full)
# M7 remember: the newest entries dropped instead of the oldest
# M8 remember: one entry too many dropped (the file held DISK_SIZE - 1)
def test_a_full_file_drops_its_oldest_entries_and_a_rewrite_is_newest(cache, monkeypatch):
    monkeypatch.setattr(mode_cache, "DISK_SIZE", 3)
    for key in ("a", "b", "c", "a", "d"):
        mode_cache.remember(None, key, ("forward", {"forward": 1.0}, {}))
    assert list(json.loads(cache.read_text())) == ["c", "a", "d"]


# M9 mode_cache.py _keep: a full memory cleared instead of dropping its oldest choice
def test_the_process_keeps_its_newest_choices(cache, monkeypatch):
    monkeypatch.setattr(mode_cache, "MEMORY_SIZE", 2)
    monkeypatch.setenv(ENV_SWITCH, "0")
    for key in ("a", "b", "c"):
        mode_cache.remember((key,), None, ("reverse", {"reverse": float(ord(key))}, {}))
    assert mode_cache.lookup(("a",), None) is None
    assert mode_cache.lookup(("b",), None) == (("reverse", {"reverse": 98.0}, {}), False)
    assert mode_cache.lookup(("c",), None) == (("reverse", {"reverse": 99.0}, {}), False)


# K6 operator.py _mode_description: the "bn_mode" field dropped (BatchNorm on running
# statistics and on batch statistics, unfolded, shared an entry)
def test_another_batchnorm_mode_is_another_entry(cache):
    from cases import bn_conv1d

    model = bn_conv1d(2, 6)
    torch.manual_seed(0)
    data = (torch.randn(16, 12, dtype=torch.float64), torch.randint(0, 3, (16,)))
    HessianOperator(model, data, bn_mode="eval", fold_bn=False)
    clear_mode_cache()
    assert not HessianOperator(model, data, bn_mode="batch", fold_bn=False).hvp_mode_cached
    modes = sorted(e["configuration"]["bn_mode"] for e in json.loads(cache.read_text()).values())
    assert modes == ["batch", "eval"]
