"""Two gloo processes give the single-process answer (issue 4, item 5)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from sharpscope.analysis import hessian_trace, spectral_density, top_eigenvalues
from sharpscope.curvature import HessianOperator

from cases import rendezvous_file, spawned_group

F64 = torch.float64


def _analyses(model, data, batch_size, distributed=False):
    v = torch.linspace(-1, 1, sum(p.numel() for p in model.parameters()), dtype=F64)
    op = HessianOperator(model, data, batch_size=batch_size, distributed=distributed)
    top = top_eigenvalues(op, k=5)
    trace = hessian_trace(op, num_probes=12)
    density = spectral_density(op, num_probes=2, num_lanczos_steps=12)
    return {
        "hv": op.hvp(v),
        "loss": op.loss_and_gradient()[0],
        "eigenvalues": top.eigenvalues,
        "trace": trace.trace,
        "density_trace": density.trace,
        "world_size": op.world_size,
        "num_examples": op.num_examples,
        "local_batches": len(op._batches),
        "batches_halved": op.batches_halved,
    }


class RankZeroMemoryHolds10(nn.Module):
    """``model``, where rank 0 cannot allocate the memory of more than 10 examples at a time
    (a real allocation failure: 2^50 bytes); the other ranks hold everything."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.net = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if dist.get_rank() == 0 and x.shape[0] > 10:
            torch.empty(2**50, dtype=torch.uint8)
        return self.net(x)


BATCH_SIZES = (None, 7)  # one batch split in halves; 9 batches sharded 5 + 4


def _worker(rank: int, rendezvous: str, model, data, out_dir: str) -> None:
    with spawned_group(rank, 2, rendezvous):
        results = [_analyses(model, data, b, distributed=True) for b in BATCH_SIZES]
        results.append(_analyses(RankZeroMemoryHolds10(model).eval(), data, None, True))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(mlp_case, tmp_path_factory):
    """Results of both ranks of one 2-process gloo run (spawned once: it is slow)."""
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(
        _worker,
        args=(rendezvous_file(), mlp_case.model, mlp_case.data, str(out)),
        nprocs=2,
        join=True,
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("index", range(len(BATCH_SIZES)))
def test_two_processes_match_one(mlp_case, two_ranks, index):
    batch_size = BATCH_SIZES[index]
    single = _analyses(mlp_case.model, mlp_case.data, batch_size)
    ranks = [results[index] for results in two_ranks]
    for result in ranks:
        assert result["world_size"] == 2 and result["num_examples"] == 60
        hv_err = torch.linalg.vector_norm(result["hv"] - single["hv"]) / single["hv"].norm()
        assert float(hv_err) <= 1e-4
        torch.testing.assert_close(result["eigenvalues"], single["eigenvalues"], rtol=1e-4, atol=0)
        for key in ("loss", "trace", "density_trace"):
            assert result[key] == pytest.approx(single[key], rel=1e-4), key
    # Each rank took its own contiguous shard: one half each, or 5 + 4 of 9 batches.
    expected = [1, 1] if batch_size is None else [5, 4]
    assert [r["local_batches"] for r in ranks] == expected


def test_a_rank_that_halves_its_batches_alone_still_agrees(mlp_case, two_ranks):
    """Rank 0 reads its 30 examples in batches of 15, then 8; rank 1 keeps one batch."""
    single = _analyses(mlp_case.model, mlp_case.data, None)
    ranks = [results[-1] for results in two_ranks]
    assert [r["batches_halved"] for r in ranks] == [2, 0]
    assert [r["local_batches"] for r in ranks] == [4, 1]
    for result in ranks:
        hv_err = torch.linalg.vector_norm(result["hv"] - single["hv"]) / single["hv"].norm()
        assert float(hv_err) <= 1e-4
        torch.testing.assert_close(result["eigenvalues"], single["eigenvalues"], rtol=1e-4, atol=0)
        for key in ("loss", "trace", "density_trace"):
            assert result[key] == pytest.approx(single[key], rel=1e-4), key
