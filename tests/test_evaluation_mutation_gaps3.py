"""Exact-answer test for sharpscope.evaluation under torch.distributed that mutation
testing (session 25) found missing: with two gloo ranks and an odd number of examples
(shards of 4 and 3, the shorter one padded for the all-gather) every rank returns the
loss, accuracy, NLL and ECE of the whole split, as one process computes them."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cases import rendezvous_file, spawned_group


# kills E1 (_reduce_metrics divides the summed loss by this rank's count, not the total),
# E2 (the loss sums are not all-reduced: each rank's own loss over N) and
# E3 (the padded rows of the shorter shard are not cut off before the metrics); and the
# NaN loss of an empty shard (session 25, a bug: fixed in evaluate)
def test_two_ranks_evaluate_the_whole_split_exactly_once():
    mp.spawn(_evaluate_worker, args=(2, rendezvous_file()), nprocs=2, join=True)


def _evaluate_worker(rank, world, rendezvous):
    from sharpscope import evaluation
    from sharpscope.distributed import share
    from sharpscope.metrics import class_probabilities, predictive_metrics

    with spawned_group(rank, world, rendezvous):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
        x = torch.randn(7, 4, dtype=torch.float64)
        y = torch.tensor([1, 2, 0, 2, 1, 1, 2])
        assert share(7, rank, 2) == (slice(0, 4) if rank == 0 else slice(4, 7))
        with torch.no_grad():
            logits = net(x)
        expected = predictive_metrics(class_probabilities(logits), y)
        # the training loss is taken on float32 logits (evaluate casts them), the metrics in float64
        expected["loss"] = F.cross_entropy(logits.float(), y).double().item()
        got = evaluation.evaluate(net, x, y, F.cross_entropy, batch_size=3, distributed=True)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            rel = 1e-6 if key == "loss" else 1e-12  # float32 batch losses, weighted n_b/N
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-15), (rank, key)
        # one example on two ranks: rank 1's shard is empty. Its one empty chunk gave a NaN
        # loss that the all-reduce spread to every rank, and training stopped as diverged
        one = evaluation.evaluate(net, x[:1], y[:1], F.cross_entropy, distributed=True)
        assert share(1, rank, 2) == (slice(0, 1) if rank == 0 else slice(1, 1))
        expected = predictive_metrics(class_probabilities(logits[:1]), y[:1])
        expected["loss"] = F.cross_entropy(logits[:1].float(), y[:1]).double().item()
        for key, value in expected.items():
            assert one[key] == pytest.approx(value, rel=1e-6, abs=1e-15), (rank, key, one)
