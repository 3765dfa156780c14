"""DistributedDataParallel with 2 CPU processes (gloo) equals one process with the same
per-rank sub-batches: local perturbation is m-sharpness with m = per-rank batch."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp

from sharpscope.optim import BSAM, LETS, SAM, BatchClosure, VaSSO

from cases import rendezvous_file, spawned_group
from optim_helpers import CE, mlp, mlp_batches, through_file

WORLD = 2
STEPS = 3
PER_RANK = 4


def _run_scenarios(rank: int) -> dict:
    lo, hi = rank * PER_RANK, (rank + 1) * PER_RANK
    batches = mlp_batches(STEPS, size=WORLD * PER_RANK)
    results = {}
    scenarios = {
        "sam-local": lambda net, ddp: SAM(
            net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=ddp
        ),
        "sam-global": lambda net, ddp: SAM(
            net.parameters(),
            torch.optim.SGD,
            rho=0.1,
            lr=0.1,
            momentum=0.9,
            model=ddp,
            perturbation="global",
        ),
        "vasso-global": lambda net, ddp: VaSSO(
            net.parameters(), torch.optim.SGD, rho=0.1, theta=0.5, lr=0.1, model=ddp
        ),
        "bsam-local": lambda net, ddp: BSAM(net.parameters(), num_data=50, lr=0.1, model=ddp),
        "lets-local": lambda net, ddp: LETS(
            net.parameters(),
            torch.optim.SGD,
            rho_lr=1.0,
            lr=0.1,
            model=ddp,
            val_batches=mlp_batches(2, seed=rank + 10),
        ),
    }
    for name, make in scenarios.items():
        net = mlp()
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = make(net, ddp)
        for x, y in batches:
            opt.step(BatchClosure(ddp, CE, x[lo:hi], y[lo:hi]))
        results[name] = {
            "params": [p.detach().clone() for p in net.parameters()],
            "state": through_file(opt.state_dict()),
        }
    return results


def _worker(rank: int, rendezvous: str, out: str, scenarios=_run_scenarios) -> None:
    """One gloo rank: ``scenarios(rank)``'s results saved to ``out.RANK``."""
    with spawned_group(rank, WORLD, rendezvous):
        torch.save(scenarios(rank), f"{out}.{rank}")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp") / "result")
    mp.spawn(_worker, args=(rendezvous_file(), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]


def _per_rank_reference():
    """SAM where rank r perturbs with its own sub-batch gradient; g~ averaged (by hand)."""
    net = mlp()
    params = list(net.parameters())
    buffers = None
    for x, y in mlp_batches(STEPS, size=WORLD * PER_RANK):
        mean = [torch.zeros_like(p) for p in params]
        for r in range(WORLD):
            xs, ys = x[r * PER_RANK : (r + 1) * PER_RANK], y[r * PER_RANK : (r + 1) * PER_RANK]
            local = copy.deepcopy(net)
            lp = list(local.parameters())
            g = torch.autograd.grad(CE(local(xs), ys), lp)
            norm = torch.linalg.vector_norm(torch.stack([t.norm() for t in g]))
            with torch.no_grad():
                for p, t in zip(lp, g):
                    p.add_(t * (0.1 / (norm + 1e-12)))
            gt = torch.autograd.grad(CE(local(xs), ys), lp)
            for acc, t in zip(mean, gt):
                acc += t / WORLD
        with torch.no_grad():
            buffers = mean if buffers is None else [0.9 * b + m for b, m in zip(buffers, mean)]
            for p, b in zip(params, buffers):
                p.sub_(0.1 * b)
    return params


def test_local_perturbation_equals_per_rank_sub_batches(ddp_results):
    want = _per_rank_reference()
    for rank in range(WORLD):
        for got, ref in zip(ddp_results[rank]["sam-local"]["params"], want):
            torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)
    # and equals single-process m-sharpness with m = per-rank batch
    net = mlp()
    opt = SAM(net, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, m=PER_RANK)
    for x, y in mlp_batches(STEPS, size=WORLD * PER_RANK):
        opt.step(BatchClosure(net, CE, x, y))
    for got, ref in zip(ddp_results[0]["sam-local"]["params"], net.parameters()):
        torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["sam-global", "vasso-global"])
def test_global_perturbation_equals_the_full_batch_step(ddp_results, name):
    net = mlp()
    if name == "sam-global":
        opt = SAM(net, torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9)
    else:
        opt = VaSSO(net, torch.optim.SGD, rho=0.1, theta=0.5, lr=0.1)
    for x, y in mlp_batches(STEPS, size=WORLD * PER_RANK):
        opt.step(BatchClosure(net, CE, x, y))
    for rank in range(WORLD):
        for got, ref in zip(ddp_results[rank][name]["params"], net.parameters()):
            torch.testing.assert_close(got, ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["bsam-local", "lets-local"])
def test_ranks_keep_identical_weights_and_optimizer_state(ddp_results, name):
    a, b = ddp_results[0][name], ddp_results[1][name]
    for p, q in zip(a["params"], b["params"]):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    if name == "bsam-local":  # h is all-reduced by hand, so s agrees although noise differs
        for sa, sb in zip(
            a["state"]["base"]["state"].values(), b["state"]["base"]["state"].values()
        ):
            torch.testing.assert_close(sa["s"], sb["s"], rtol=1e-6, atol=1e-7)
        assert not torch.equal(a["state"]["rng"], b["state"]["rng"])
    else:  # h is averaged over ranks, so rho agrees although validation batches differ
        assert torch.equal(a["state"]["rho"], b["state"]["rho"])
        assert float(a["state"]["rho"]) != 0.05


def _least_squares(outputs, targets):
    return 0.5 * ((outputs - targets) ** 2).sum(1).mean()


def _lets_fd_step(rank: int) -> dict:
    """One LETS step with hypergrad="fd" and local perturbation on a least-squares model."""
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(8, 3, generator=generator, dtype=torch.float64)
    y = torch.randn(8, 2, generator=generator, dtype=torch.float64)
    val = torch.Generator().manual_seed(9)
    xv = torch.randn(8, 3, generator=val, dtype=torch.float64)
    yv = torch.randn(8, 2, generator=val, dtype=torch.float64)
    torch.manual_seed(1)
    net = torch.nn.Linear(3, 2).double()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = LETS(
        ddp.parameters(),
        torch.optim.SGD,
        model=ddp,
        lr=0.1,
        rho=0.2,
        rho_lr=0.0,
        hypergrad="fd",
        val_batches=(xv, yv),
        loss_fn=_least_squares,
    )
    opt.step(BatchClosure(ddp, _least_squares, x, y))
    v = [opt.state[p]["v"].detach().clone() for p in net.parameters()]
    return {"x": x, "u": [t.clone() for t in opt._u], "v": v}


def test_lets_finite_difference_under_ddp_is_the_all_reduced_hessian_product(tmp_path):
    """H~u by finite differences of all-reduced gradients: with a quadratic loss it is exactly
    the mean over ranks of H_r u_r (a rank-local FD pass against the all-reduced g~ was off
    by the ranks' gradient difference / r, ~1e3 times |Hu|)."""
    out = str(tmp_path / "lets")
    mp.spawn(_worker, args=(rendezvous_file(), out, _lets_fd_step), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]

    def hessian_product(x, u):  # of 0.5 mean ||W x + b - y||^2 along u = (dW, db)
        moved = x @ u[0].T + u[1]
        return [moved.T @ x / len(x), moved.sum(0) / len(x)]

    products = [hessian_product(r["x"], r["u"]) for r in ranks]
    mean = [sum(parts) / WORLD for parts in zip(*products)]
    for rank in ranks:
        for got, want in zip(rank["v"], mean):  # v = lr * H~u for plain SGD
            torch.testing.assert_close(got / 0.1, want, rtol=1e-6, atol=1e-9)


def _overflow_on_one_rank(rank: int) -> dict:
    """SAM, local perturbation, an fp16-style GradScaler: rank 1's pass 1 of step 2 gives
    an inf loss, rank 0's does not."""
    torch.manual_seed(0)
    net = mlp()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = SAM(net.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=ddp, scaler=scaler)
    lo, hi = rank * PER_RANK, (rank + 1) * PER_RANK
    calls = []
    for step, (x, y) in enumerate(mlp_batches(STEPS, size=WORLD * PER_RANK)):

        def closure(x=x, y=y, step=step):
            calls.append(step)
            loss = CE(ddp(x[lo:hi]), y[lo:hi])
            if rank == 1 and step == 1 and calls.count(step) == 1:
                loss = loss * float("inf")
            scaler.scale(loss).backward()
            return loss

        opt.step(closure)
    return {
        "params": [p.detach().clone() for p in net.parameters()],
        "scale": scaler.get_scale(),
        "passes": len(calls),
    }


def test_a_pass_one_overflow_on_one_rank_is_skipped_by_every_rank(tmp_path):
    """ampfix (session 31): with perturbation="local" each rank decided a pass-1 overflow
    on its own gradients: the rank that overflowed skipped pass 2, whose all-reduce the
    other rank ran, so it met that rank's next pass-2 all-reduce (wrong gradients) or
    waited for ever. The ranks now agree: both skip that step and back off."""
    out = str(tmp_path / "overflow")
    mp.spawn(_worker, args=(rendezvous_file(), out, _overflow_on_one_rank), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(WORLD)]
    for a, b in zip(ranks[0]["params"], ranks[1]["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [r["scale"] for r in ranks] == [512.0, 512.0]  # one back-off, on both
    assert [r["passes"] for r in ranks] == [5, 5]  # 2 + 1 (skipped) + 2
