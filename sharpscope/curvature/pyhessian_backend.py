"""PyHessian's own routines on sharpscope's model and data, for cross-checks.

``--backend pyhessian`` runs ``pyhessian.hessian(...).eigenvalues(top_n=k)`` (deflated
power iteration, Gaussian start, stop on a relative change of the Rayleigh quotient
below ``tol`` = 1e-3, at most ``maxIter`` = 100 products per eigenvalue) and
``.trace()`` (Hutchinson with Rademacher probes, at most 100, stopping when two
successive running means agree to 1e-3) on the same model, loss and data, so numbers
can be compared with published PyHessian results (Yao et al., 2020,
arXiv:1912.07145; ``pip install pyhessian==0.1``).

How PyHessian 0.1 differs from sharpscope, documented rather than corrected:

* data: with one batch it builds the gradient graph once (``data=`` mode); with
  several it recomputes the graph per product (``dataloader=`` mode) and weights
  each batch's product by n_b/N (``THv += Hv * n_b; THv /= N``), which matches
  sharpscope's weighting of the mean loss. Both modes accumulate in float32 (the
  model's dtype), not float64. It draws its random vectors from torch's global RNG (seeded
  here in a forked RNG state, so the caller's RNG is untouched);
* it puts the model in ``eval()`` and leaves it there, and writes ``.grad`` of every
  parameter; both are restored here;
* it always uses every parameter with ``requires_grad`` (no name filter, no weight
  decay term, no batch-statistics mode) and needs ``cuda=False`` on the CPU;
* its ``normalization`` divides by ``||v|| + 1e-6``, its power iteration returns the
  eigenvalues in the order found (largest |λ| first, possibly negative), and its
  trace can stop after two probes (its rule lacks an absolute value, analysis.md §3);
* its released ``density()`` calls ``torch.eig``, removed from PyTorch, so the density
  always comes from sharpscope's SLQ.
"""

from __future__ import annotations

import importlib
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import numpy as np
import torch

from ..errors import SharpscopeError
from ._linear import check_finite_products
from .lanczos import EigenPairs
from .operator import HessianOperator
from .trace import TraceEstimate


def import_pyhessian() -> Any:
    try:
        # The package re-exports the class under the submodule's name; get the module.
        module = importlib.import_module("pyhessian.hessian")
    except ImportError as exc:
        raise SharpscopeError(
            "the pyhessian backend needs PyHessian: pip install pyhessian==0.1"
        ) from exc
    return module


@dataclass
class _Counter:
    count: int = 0


def _check_supported(op: HessianOperator) -> None:
    if op.world_size > 1:
        raise SharpscopeError("the pyhessian backend runs in one process; drop torchrun")
    if op.bn_mode != "eval":
        raise SharpscopeError("the pyhessian backend supports only bn_mode='eval'")
    if op.weight_decay:
        raise SharpscopeError("the pyhessian backend has no weight-decay term; use weight_decay=0")
    trainable = [n for n, p in op.module.named_parameters() if p.requires_grad]
    if trainable != op.param_names:
        raise SharpscopeError(
            "the pyhessian backend uses every trainable parameter; drop the parameter filter"
        )


@contextmanager
def _session(op: HessianOperator, seed: int) -> Iterator[tuple[Any, _Counter]]:
    """A ``pyhessian.hessian`` on the operator's model and data; the model restored after."""
    module = import_pyhessian()
    _check_supported(op)
    model = op.module
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.grad) for p in model.parameters()]
    counter = _Counter()
    devices = [op.device] if op.device.type == "cuda" else []
    real_hvp = module.hessian_vector_product

    def counted_hvp(*args: Any, **kwargs: Any) -> Any:
        counter.count += 1
        return real_hvp(*args, **kwargs)

    try:
        with (
            torch.random.fork_rng(devices=devices),
            mock.patch.object(module, "hessian_vector_product", counted_hvp),
            warnings.catch_warnings(),
        ):
            # PyHessian calls backward(create_graph=True); the .grad cycle is broken below.
            warnings.simplefilter("ignore", UserWarning)
            torch.manual_seed(int(seed))
            for p in model.parameters():
                p.grad = None
            cuda = op.device.type == "cuda"
            if len(op._batches) == 1:
                hess = module.hessian(model, op.loss_fn, data=op._batches[0], cuda=cuda)
            else:
                hess = module.hessian(model, op.loss_fn, dataloader=op._batches, cuda=cuda)
                real_loader_hvp = hess.dataloader_hv_product

                def counted_loader_hvp(v: Any) -> Any:
                    counter.count += 1
                    return real_loader_hvp(v)

                hess.dataloader_hv_product = counted_loader_hvp
            yield hess, counter
    finally:
        for m, mode in modes:
            m.training = mode
        for p, g in grads:
            p.grad = g


def pyhessian_top_k(
    op: HessianOperator, k: int = 5, *, tol: float = 1e-3, max_iter: int = 100, seed: int = 0
) -> tuple[EigenPairs, dict[str, Any]]:
    """``hessian.eigenvalues(top_n=k)`` of PyHessian on the operator's model and data.

    The eigenvalues are returned sorted descending (the order found is in the info);
    true residuals ``||Hv - λv||`` of PyHessian's vectors are computed with the
    sharpscope operator (k extra products, counted apart in the info).

    Returns:
        ``(pairs, info)`` where ``info`` has the PyHessian product count, the order
        found and the wall time of PyHessian's own call.
    """
    if k > op.dim:
        raise SharpscopeError(f"k={k} is larger than the number of parameters ({op.dim})")
    start = time.perf_counter()
    with _session(op, seed) as (hess, counter):
        values, vectors = hess.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
        flat = torch.stack(
            [torch.cat([t.detach().reshape(-1) for t in vec]).to(torch.float64) for vec in vectors]
        )
    seconds = time.perf_counter() - start
    check_finite_products(np.asarray(values, dtype=np.float64))
    order = np.argsort(-np.asarray(values), kind="stable")
    lam = torch.tensor(np.asarray(values, dtype=np.float64)[order])
    flat = flat[torch.from_numpy(order)].to(op.device)
    flat = flat / torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    HV = op.hvp_block(flat)
    residuals = torch.linalg.vector_norm(HV - lam.to(op.device).unsqueeze(1) * flat, dim=1).cpu()
    pairs = EigenPairs(
        eigenvalues=lam,
        residuals=residuals,
        converged=[False] * k,  # set by the caller against its own tolerance
        num_matvecs=counter.count + k,
        num_steps=counter.count,
        eigenvectors=flat.cpu(),
        true_residuals=residuals,
    )
    info = {
        "pyhessian_hvps": counter.count,
        "residual_hvps": k,
        "order_found": [float(v) for v in values],
        "pyhessian_seconds": seconds,
        "pyhessian_tol": tol,
        "pyhessian_max_iter": max_iter,
        "pyhessian_data_mode": "data" if len(op._batches) == 1 else "dataloader",
    }
    return pairs, info


def pyhessian_trace(
    op: HessianOperator, *, tol: float = 1e-3, max_iter: int = 100, seed: int = 0
) -> TraceEstimate:
    """``hessian.trace()`` of PyHessian: Hutchinson with its own stopping rule."""
    with _session(op, seed) as (hess, counter):
        samples = np.asarray(hess.trace(maxIter=max_iter, tol=tol), dtype=np.float64)
    check_finite_products(samples)
    n = len(samples)
    return TraceEstimate(
        trace=float(samples.mean()),
        stderr=float(samples.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf,
        num_matvecs=counter.count,
        num_probes=n,
        samples=samples,
        method="pyhessian-hutchinson",
    )
