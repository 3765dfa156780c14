"""Exact-answer tests for sharpscope.distributed that mutation testing (session 25) found
missing: the per-gradient DDP hook with two ranks (mean, not sum), gather_to_main keeping
a tuple a tuple, and which rank is the main one."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp
from torch import nn

from sharpscope.distributed import DistInfo, gather_to_main

from cases import rendezvous_file, spawned_group


# kills D1: reduce_each_gradient leaves the all-reduced SUM of the ranks' gradients
# (buffer.div_(world) dropped); the existing check spawns 3 ranks, this one 2 with exact
# dyadic numbers
def test_the_per_gradient_hook_gives_the_mean_with_two_ranks():
    mp.spawn(_mean_worker, args=(2, rendezvous_file()), nprocs=2, join=True)


def _mean_worker(rank, world, rendezvous):
    from sharpscope.distributed import reduce_each_gradient

    with spawned_group(rank, world, rendezvous):
        net = nn.Linear(2, 1, bias=True).double()
        with torch.no_grad():
            net.weight.zero_()
            net.bias.zero_()
        ddp = nn.parallel.DistributedDataParallel(net)
        ddp.register_comm_hook(None, reduce_each_gradient)
        for _ in range(2):  # the initial bucket layout, then the rebuilt one
            net.zero_grad()
            # loss = sum(out) on input [r+1, 2(r+1)]: grad w = [r+1, 2(r+1)], grad b = 1
            x = torch.tensor([[rank + 1.0, 2.0 * (rank + 1)]], dtype=torch.float64)
            ddp(x).sum().backward()
            # mean over ranks 0 and 1: w [1.5, 3.0], b 1.0 (the sum would be [3, 6] and 2)
            assert net.weight.grad.tolist() == [[1.5, 3.0]]
            assert net.bias.grad.tolist() == [1.0]


# kills D2: _to_cpu turns every tuple into a list
def test_gather_to_main_keeps_tuples_and_lists_as_they_were():
    (out,) = gather_to_main({"pair": (torch.ones(2), 3), "list": [1, (2, 3)]})
    assert type(out["pair"]) is tuple and type(out["list"]) is list
    assert type(out["list"][1]) is tuple and out["list"][1] == (2, 3)


# kills D3: is_main is rank 1 (rank 0 prints and writes files)
def test_rank_zero_is_the_main_process_and_one_rank_is_not_distributed():
    assert DistInfo().is_main and not DistInfo().enabled
    assert DistInfo(rank=0, world_size=2).is_main and DistInfo(rank=0, world_size=2).enabled
    assert not DistInfo(rank=1, world_size=2).is_main
