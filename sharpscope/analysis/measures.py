"""Sharpness and flatness measures related to m-sharpness (analysis.md §5, "Related measures").

These are the measures that the flatness-versus-generalization study (§7) correlates
with the generalization gap. Each is oriented so that *sharper is larger*.

* :func:`average_sharpness`: E_δ L_j(w+δ) − L_j(w), δ ~ N(0, ρ²I) or, adaptive,
  N(0, ρ² diag((|w|+η)²)), averaged over subsets of m examples (Andriushchenko et al.,
  2023, arXiv:2302.07011; 20 draws per subset).
* :func:`epsilon_sharpness`: Keskar et al. (2017, arXiv:1609.04836), 100·(max_{z∈C_ε}
  L(w+z) − L(w))/(1 + L(w)), C_ε = {|z_i| ≤ ε(|w_i| + 1)}, maximized by L-BFGS-B (10
  iterations), in full space or a random subspace.
* :func:`pac_bayes_flatness`: Jiang et al. (2020, arXiv:1912.02178, Algorithm 1; as
  re-implemented by Dziugaite et al., 2020, "In search of robust measures of
  generalization", NeurIPS, arXiv:2010.11924): the largest σ whose Gaussian weight noise
  lowers the accuracy by 0.1 ± 0.01, reported as 1/σ²; magnitude-aware with per-weight
  variance σ²w_i² + ε².

All evaluate the model in eval mode and restore its modes afterwards.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from scipy.optimize import minimize
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..data.batches import fixed_batches
from ..device_memory import FittingRows
from ..errors import SharpscopeError, check, check_autograd
from ..modes import keeps_model_buffers
from ..precision import ieee_float32
from ..registry import check_model_loss
from ..results import Result, RunMeta
from ._functional import (
    ParamLayout,
    analysis_meta,
    analysis_mode,
    caller_level,
    evaluate_parameter_sets,
    flat_parameters,
    is_classification,
    loss_name,
    model_dtype_device,
    model_errors,
    resolve_loss,
    seeded_generator,
    vmap_or_loop,
    warn_half_precision,
)
from .msharpness import split_subsets, warn_non_finite_subsets

# --- average-case sharpness -------------------------------------------------------------


@dataclass(frozen=True)
class AverageSharpness(Result):
    """Average-case sharpness (analysis.md §5).

    Attributes:
        sharpness: (m/n) Σ_j mean_s [L_j(w+δ_js) − L_j(w)], the Monte-Carlo estimate of
            E_δ L(w+δ) − L(w) averaged over subsets.
        stderr: its standard error over the draws (subsets fixed).
        error_increase: the same average for the 0-1 error (NaN without class labels).
        per_subset: ``(n/m,)`` mean loss increase of each subset.
        clean_loss: mean over subsets of L_j(w).
        m, rho, adaptive, eta, num_draws: the settings (``num_draws`` per subset).
        num_samples_used, num_subsets: n and n/m.
    """

    kind: ClassVar[str] = "average_sharpness"

    sharpness: float
    stderr: float
    error_increase: float
    per_subset: Tensor
    clean_loss: float
    m: int
    rho: float
    adaptive: bool
    eta: float
    num_draws: int
    num_samples_used: int
    num_subsets: int
    loss: str
    seconds: float
    meta: RunMeta


@vmap_or_loop
@ieee_float32()
@keeps_model_buffers
def average_sharpness(
    model: nn.Module,
    data: Any,
    rho: float,
    *,
    m: int | None = None,
    adaptive: bool = False,
    num_draws: int = 20,
    loss: Any = "cross_entropy",
    seed: int = 0,
    eta: float = 0.0,
    logit_normalize: bool = False,
    chunk_size: int | None = None,
    vectorize: bool | None = None,
    meta: RunMeta | None = None,
) -> AverageSharpness:
    """Average-case sharpness E_δ L(w+δ) − L(w) over subsets of m examples.

    δ ~ N(0, ρ²I) (plain) or N(0, ρ² diag((|w|+η)²)) (adaptive). For each subset S_j
    (fixed order, n rounded down to a multiple of m), ``num_draws`` independent δ; all
    (subset, draw) pairs are evaluated with one ``vmap(functional_call)`` per chunk.
    Andriushchenko et al. (2023) used ρ ∈ {0.05, 0.1, 0.2, 0.4} (ResNet-18, CIFAR-10)
    and 20 draws per batch.

    Args:
        model: the network (left as found; evaluated in eval mode).
        data: a pair of tensors, a Dataset, or an iterable of batches.
        rho: noise scale ρ > 0.
        m: subset size (None: all examples in one subset).
        adaptive: scale the noise by |w| + η.
        num_draws: noise draws per subset (20).
        loss: loss name, factory path or callable (mean loss).
        seed: the draws of subset j come from a generator seeded with (seed, j).
        eta: η of the adaptive scale.
        logit_normalize: normalize the logits before the loss (as :func:`m_sharpness`).
        chunk_size: subsets per vectorized call (default: ≤ 4096 evaluated examples).
        vectorize: False loops over subsets and draws (reference); None (default): vmap,
            or the loop with a warning for a model vmap cannot trace.
        meta: provenance to extend.

    Returns:
        :class:`AverageSharpness`; a subset whose loss is not finite (at w or at a draw)
        has sharpness NaN, and a warning says which and why (as in :func:`m_sharpness`).

    Raises:
        SharpscopeError: ρ ≤ 0, m < 1 or larger than the data, num_draws < 1, η < 0.

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Linear(2, 1, bias=False).double()
    >>> x, y = torch.eye(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    >>> mse = lambda out, t: 0.5 * (out.squeeze(-1) - t).pow(2).mean()
    >>> r = average_sharpness(net, (x, y), rho=0.1, num_draws=4000, loss=mse)
    >>> abs(r.sharpness - 0.5 * 0.1**2 * 1.0) < 4 * r.stderr  # ½ρ² tr(XᵀX/n)
    True
    """
    start = time.perf_counter()
    vectorize = True if vectorize is None else bool(vectorize)  # None: vmap_or_loop's try
    check(rho > 0 and math.isfinite(rho), f"rho must be > 0, got {rho}")
    check(num_draws >= 1, f"num_draws must be >= 1, got {num_draws}")
    check(eta >= 0, f"eta must be >= 0, got {eta}")
    check(
        eta == 0 or adaptive, f"eta = {eta} applies to adaptive sharpness only (the scale |w| + η)"
    )
    sub = split_subsets(model, data, m, loss, logit_normalize, measure="average sharpness")
    xs, ys, num_subsets, n, m = sub.xs, sub.ys, sub.num_subsets, sub.n, sub.n // sub.num_subsets
    classification, layout, theta = sub.classification, sub.layout, sub.theta
    subset_loss, dtype, device = sub.subset_loss, sub.dtype, sub.device
    scale = (theta.abs() + eta).double().cpu() if adaptive else None
    values_only = vmap(subset_loss)
    if chunk_size is None:
        chunk_size = max(1, min(num_subsets, 4096 // (m * num_draws), 2**24 // layout.size))
    increases = torch.empty(num_subsets, num_draws, dtype=torch.float64)
    err_increases = torch.empty(num_subsets, num_draws, dtype=torch.float64)
    clean = torch.empty(num_subsets, dtype=torch.float64)

    def noise(j: int) -> Tensor:
        draws = torch.randn(
            num_draws, layout.size, generator=seeded_generator(seed, j), dtype=torch.float64
        )
        draws = rho * draws * (scale if scale is not None else 1.0)
        return draws.to(device, dtype)

    looped = contextlib.nullcontext() if vectorize else sub.looped()
    with analysis_mode(model, xs[0]) as mode, torch.no_grad(), looped as at:

        def losses(sl: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
            """Clean and perturbed loss and errors of the subsets in ``sl`` (CPU, float64)."""
            rows = sl.stop - sl.start
            deltas = torch.cat([noise(j) for j in range(sl.start, sl.stop)])
            zero = torch.zeros(rows, layout.size, dtype=dtype, device=device)
            if vectorize:
                _, (l0, w0) = values_only(zero, xs[sl], ys[sl])
                x_rep = xs[sl].repeat_interleave(num_draws, dim=0)
                y_rep = ys[sl].repeat_interleave(num_draws, dim=0)
                _, (l1, w1) = values_only(deltas, x_rep, y_rep)
            else:
                j = sl.start
                l0, w0, _ = at(zero[0], xs[j], ys[j], False)
                pairs = [at(d, xs[j], ys[j], False) for d in deltas]
                l1 = torch.stack([p[0] for p in pairs])
                w1 = torch.stack([p[1] for p in pairs])
            return (
                l0.double().cpu().reshape(rows, 1),
                w0.double().cpu().reshape(rows, 1),
                l1.double().cpu().reshape(rows, num_draws),
                w1.double().cpu().reshape(rows, num_draws),
            )

        fitting = FittingRows("subsets", chunk_size if vectorize else 1)  # split if too big
        with model_errors(vectorize):  # one line for a model or loss that does not fit
            parts = fitting.run(losses, 0, num_subsets)
        for sl, (l0, w0, l1, w1) in parts:
            clean[sl] = l0[:, 0]
            increases[sl] = l1 - l0
            err_increases[sl] = (w1 - w0) / m
    per_subset = increases.mean(dim=1)
    warn_non_finite_subsets(
        clean, per_subset, None, "at some of its noise draws", unperturbed="δ = 0"
    )
    # NaN logits still have an argmax: no error increase where the loss is not finite
    err_increases = torch.where(torch.isfinite(increases), err_increases, float("nan"))
    if num_draws > 1:
        stderr = float(increases.var(dim=1).sum().sqrt() / (num_subsets * math.sqrt(num_draws)))
    else:
        stderr = float("nan")
    return AverageSharpness(
        sharpness=float(per_subset.mean()),
        stderr=stderr,
        error_increase=float(err_increases.mean()) if classification else float("nan"),
        per_subset=per_subset,
        clean_loss=float(clean.mean()),
        m=m,
        rho=float(rho),
        adaptive=bool(adaptive),
        eta=float(eta),
        num_draws=int(num_draws),
        num_samples_used=n,
        num_subsets=num_subsets,
        loss=loss_name(loss),
        seconds=time.perf_counter() - start,
        meta=analysis_meta(
            meta,
            data=data,
            num_samples=n,
            seed=seed,
            dtype=dtype,
            device=device,
            mode=mode,
            num_params=layout.size,
            extra={"vectorized": vectorize},
        ),
    )


# --- Keskar epsilon-sharpness ------------------------------------------------------------


@dataclass(frozen=True)
class EpsilonSharpness(Result):
    """Keskar et al. (2017) ε-sharpness, in percent.

    Attributes:
        sharpness: 100·(max_{z∈C_ε} L(w+z) − L(w))/(1 + L(w)) with the maximum found.
        max_loss: the largest loss found (over every point L-BFGS-B evaluated).
        clean_loss: L(w).
        epsilon: ε of the box C_ε = {|z_i| ≤ ε(|w_i| + 1)}.
        subspace_dim: None (full space) or p, the random subspace's dimension.
        iterations: L-BFGS-B iteration limit; num_function_evals: evaluations used.
    """

    kind: ClassVar[str] = "epsilon_sharpness"

    sharpness: float
    max_loss: float
    clean_loss: float
    epsilon: float
    subspace_dim: int | None
    iterations: int
    num_function_evals: int
    num_samples: int
    loss: str
    seconds: float
    meta: RunMeta


def keskar_subspace(num_params: int, dim: int, seed: int) -> Tensor:
    """The random ``(P, p)`` matrix A of the subspace variant: i.i.d. N(0, 1/p) entries.

    Keskar et al. maximize over w + Ay, y in the box |y_i| ≤ ε(|(A⁺w)_i| + 1).
    """
    generator = seeded_generator(seed, dim, 0x5EED)
    return torch.randn(num_params, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)


def _warn_not_finite_at_w(measure: str, loss: float, result: str) -> None:
    """Say that ``measure`` is NaN because the loss at the model's own weights is not
    finite (NaN weights or data), as :func:`warn_non_finite_subsets` says it per subset."""
    warnings.warn(
        f"{measure}: the loss is not finite at the model's own weights ({loss}): check the "
        f"data and the model for NaN or inf; {result} is NaN",
        RuntimeWarning,
        stacklevel=caller_level(),
    )


def leaves_the_start(grad: np.ndarray, bound: np.ndarray, loss: float, dtype: torch.dtype) -> bool:
    """Whether L-BFGS-B started at z = 0 can see its first step.

    Its first step goes to the Cauchy point clip(∇L, ±b) (the initial Hessian
    approximation is I), a predicted gain of Σ|g_i|·min(|g_i|, b_i). At a critical point
    that is 0, and close to one (a trained model: |∇L| ~ 1e-12) it is below the rounding
    of L, so the line search sees no change and the run never leaves z = 0 (ε-sharpness
    0 however curved the loss). Then, as at a critical point, a seeded random point of
    the box is the start instead. The threshold is 100 units of rounding of L in the
    model's dtype.

    >>> b = np.full(3, 1e-3)
    >>> leaves_the_start(np.full(3, 1e-4), b, 0.9, torch.float64)
    True
    >>> leaves_the_start(np.full(3, 1e-12), b, 0.9, torch.float64)
    False
    >>> leaves_the_start(np.zeros(3), b, 0.0, torch.float64)  # a critical point
    False
    """
    g = np.abs(grad)
    gain = float(g @ np.minimum(g, bound))
    return gain > 100 * torch.finfo(dtype).eps * abs(loss)


@ieee_float32()
@keeps_model_buffers
def epsilon_sharpness(
    model: nn.Module,
    data: Any,
    epsilon: float = 1e-3,
    *,
    subspace_dim: int | None = None,
    iterations: int = 10,
    loss: Any = "cross_entropy",
    seed: int = 0,
    batch_size: int | None = None,
    meta: RunMeta | None = None,
) -> EpsilonSharpness:
    """Keskar et al. ε-sharpness: the largest loss in a box around w, in % of 1 + L(w).

    φ_{w,f}(ε) = 100·(max_{z∈C_ε} L(w+z) − L(w))/(1 + L(w)), C_ε = {|z_i| ≤
    ε(|w_i| + 1)} (Keskar et al., 2017, §2.2.1, ε ∈ {1e-3, 5e-4}). The maximum is
    approximated with scipy's L-BFGS-B (``iterations`` iterations, 10 in the paper;
    no tolerance stops it earlier) started at z = 0 (at or near a critical point, where
    its first step is lost in the rounding of L, from a seeded random point of the box:
    :func:`leaves_the_start`), on the full-data loss (each batch weighted n_b/N) in the model's
    dtype with a float64 optimizer state. With ``subspace_dim = p`` the search is over
    z = Ay for the random A of :func:`keskar_subspace` and the box on y uses A⁺w.

    Args:
        model: the network (left as found; eval mode).
        data: a pair of tensors, a Dataset, or an iterable of batches.
        epsilon: box size ε > 0 (1e-3; the paper also used 5e-4).
        subspace_dim: None for the full space, or p ≥ 1 (the paper: 100).
        iterations: L-BFGS-B iterations (10).
        loss: loss name, factory path or callable (mean loss).
        seed: seed of the random subspace and of the random start (see above).
        batch_size: examples per forward pass (None: all).
        meta: provenance to extend.

    Returns:
        :class:`EpsilonSharpness`; its sharpness is NaN, with a warning, when the loss or
        its gradient at w, or the loss somewhere in the box, is not finite.

    Raises:
        SharpscopeError: ε ≤ 0, iterations < 1, subspace_dim < 1, or 1 + L(w) ≤ 0.
    """
    start = time.perf_counter()
    check(epsilon > 0 and math.isfinite(epsilon), f"epsilon must be > 0, got {epsilon}")
    check(iterations >= 1, f"iterations must be >= 1, got {iterations}")
    check(
        subspace_dim is None or subspace_dim >= 1,
        f"subspace_dim must be >= 1 or None, got {subspace_dim}",
    )
    loss_fn = resolve_loss(loss)
    dtype, device = model_dtype_device(model)
    warn_half_precision(dtype, "epsilon-sharpness")
    batches = fixed_batches(
        data, batch_size, device, why=" and epsilon-sharpness maximizes over one fixed data set"
    )
    batches = [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in batches]
    total = sum(len(y) for _, y in batches)
    layout = ParamLayout.of(model)  # refuses mixed dtypes and lazy modules first
    check_model_loss(loss_fn, model, *batches[0], "epsilon-sharpness")
    theta = flat_parameters(model, layout)
    w = theta.double().cpu()
    if subspace_dim is None:
        basis = None
        bound = epsilon * (w.abs() + 1)
    else:
        check(
            subspace_dim <= layout.size,
            f"subspace_dim {subspace_dim} is larger than the model's {layout.size} parameters: "
            "the box on its coordinates would let the step leave the full-space box C_ε; "
            "use subspace_dim=None (the full space)",
        )
        basis = keskar_subspace(layout.size, subspace_dim, seed)
        coords = torch.linalg.lstsq(basis, w.unsqueeze(-1)).solution.squeeze(-1)  # A⁺w
        bound = epsilon * (coords.abs() + 1)
    basis_dev = basis.to(device, dtype) if basis is not None else None
    best = {"loss": -math.inf, "evals": 0}

    def loss_and_grad(v: np.ndarray) -> tuple[float, np.ndarray]:
        y = torch.as_tensor(v, dtype=dtype, device=device)
        z = (basis_dev @ y if basis_dev is not None else y).detach().requires_grad_(True)
        value = 0.0
        grad_z = torch.zeros(layout.size, dtype=torch.float64, device=device)
        for x, t in batches:  # one backward per batch keeps one batch's graph in memory
            params = layout.unflatten(theta + z)
            part = loss_fn(functional_call(model, params, (x,)), t) * (len(t) / total)
            (g,) = torch.autograd.grad(part, z)
            value += float(part.detach())
            grad_z += g.double()
        g_y = basis_dev.double().T @ grad_z if basis_dev is not None else grad_z
        # a loss undefined somewhere in the box makes the maximum NaN (as in m_sharpness),
        # not the largest finite value seen
        best["loss"] = value if math.isnan(value) else max(best["loss"], value)
        best["evals"] += 1
        return -value, -g_y.cpu().numpy()

    check_autograd("epsilon-sharpness's gradients")
    with analysis_mode(model, batches[0][0]) as mode, torch.enable_grad():  # in no_grad too
        with model_errors(False):  # one line for a model or loss that does not fit
            clean_loss, clean_grad = loss_and_grad(np.zeros(len(bound)))
        clean_loss = -clean_loss
        check(
            not math.isfinite(clean_loss) or 1 + clean_loss > 0,  # not finite: said below
            f"epsilon-sharpness divides by 1 + L(w) = {1 + clean_loss:.3g}; it needs L(w) > -1",
        )
        if not math.isfinite(clean_loss):  # NaN weights or data, as m_sharpness says
            _warn_not_finite_at_w("epsilon-sharpness", clean_loss, "the sharpness")
            best["loss"] = math.nan
            message = "not run: the loss at w is not finite"
        elif not np.all(np.isfinite(clean_grad)):
            # an inf input saturated by tanh, say: L-BFGS-B's search on a NaN gradient
            # returned a number (0 or a random point's loss)
            warnings.warn(
                "epsilon-sharpness: the loss is finite but its gradient is not at the model's "
                "own weights: check the data and the model for NaN or inf (an inf input can "
                "leave the loss finite); the sharpness is NaN",
                RuntimeWarning,
                stacklevel=caller_level(),
            )
            best["loss"] = math.nan
            message = "not run: the gradient at w is not finite"
        else:
            b = bound.numpy()
            y0 = np.zeros(len(b))
            if not leaves_the_start(clean_grad, b, clean_loss, dtype):
                y0 = np.random.default_rng(seed).uniform(-b, b)
            result = minimize(
                loss_and_grad,
                y0,
                jac=True,
                method="L-BFGS-B",
                bounds=np.stack([-b, b], axis=1),
                # no tolerance stops it: `iterations` does (scipy's gtol=1e-5 ended the run
                # before its first iteration once every |∂L/∂w_i| < 1e-5, near any minimum)
                options={"maxiter": int(iterations), "gtol": 0.0, "ftol": 0.0},
            )
            message = str(result.message)
            if not math.isfinite(best["loss"]):
                warnings.warn(
                    "epsilon-sharpness: the loss is not finite at some point of the box (an "
                    f"overflow at this epsilon?): the sharpness is {best['loss']}",
                    RuntimeWarning,
                    stacklevel=caller_level(),
                )
    max_loss = best["loss"] if math.isnan(best["loss"]) else max(best["loss"], clean_loss)
    return EpsilonSharpness(
        sharpness=100.0 * (max_loss - clean_loss) / (1.0 + clean_loss),
        max_loss=max_loss,
        clean_loss=clean_loss,
        epsilon=float(epsilon),
        subspace_dim=subspace_dim,
        iterations=int(iterations),
        num_function_evals=int(best["evals"]),
        num_samples=total,
        loss=loss_name(loss),
        seconds=time.perf_counter() - start,
        meta=analysis_meta(
            meta,
            data=data,
            num_samples=total,
            seed=seed,
            dtype=dtype,
            device=device,
            mode=mode,
            num_params=layout.size,
            extra={"optimizer_message": message},
        ),
    )


#: The name the study's measure table also looks up.
keskar_sharpness = epsilon_sharpness


# --- PAC-Bayes flatness ------------------------------------------------------------------


@dataclass(frozen=True)
class PacBayesFlatness(Result):
    """PAC-Bayes flatness (Jiang et al., 2020): 1/σ² at a fixed accuracy drop.

    Attributes:
        flatness: 1/σ² (larger is sharper).
        sigma: the σ found (plain: weight noise N(0, σ²); magnitude-aware: per-weight
            variance σ²w_i² + ε²).
        accuracy: accuracy of the unperturbed model.
        accuracy_drop: the Monte-Carlo accuracy drop at σ.
        converged: |drop − target_drop| ≤ tolerance was reached.
        num_halvings_used: bisection steps taken.
        search: ``[(σ, drop), ...]`` of every bisection step.
        magnitude_aware, target_drop, tolerance, sigma_max, num_draws, epsilon: settings.
    """

    kind: ClassVar[str] = "pac_bayes_flatness"

    flatness: float
    sigma: float
    accuracy: float
    accuracy_drop: float
    converged: bool
    num_halvings_used: int
    search: list
    magnitude_aware: bool
    target_drop: float
    tolerance: float
    sigma_max: float
    num_draws: int
    epsilon: float
    num_samples: int
    seconds: float
    meta: RunMeta


@vmap_or_loop
@ieee_float32()
@keeps_model_buffers
def pac_bayes_flatness(
    model: nn.Module,
    data: Any,
    *,
    magnitude_aware: bool = False,
    target_drop: float = 0.1,
    tolerance: float = 0.01,
    sigma_max: float = 2.0,
    num_halvings: int = 15,
    num_draws: int = 10,
    epsilon: float = 1e-3,
    loss: Any = "cross_entropy",
    seed: int = 0,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    vectorize: bool | None = None,
    meta: RunMeta | None = None,
) -> PacBayesFlatness:
    """PAC-Bayes flatness: 1/σ² for the largest σ with an accuracy drop of 0.1 ± 0.01.

    Binary search on σ ∈ [0, σ_max] (Jiang et al. 2020, Algorithm 1; σ_max = 2, 15
    halvings, 10 Monte-Carlo draws each, as re-implemented by Dziugaite et al. 2020): at
    σ = (lo + hi)/2 the accuracy drop d̂ = acc(w) − mean_k acc(w + ξ_k) is estimated
    with ξ_k ~ N(0, σ²I) (magnitude-aware: N(0, diag(σ²w_i² + ε²)), ε = 1e-3); stop
    when |d̂ − target| ≤ tolerance, else lo = σ if d̂ < target, hi = σ otherwise. The
    draws of each step are evaluated together with ``vmap(functional_call)``.

    Args:
        model: the network (left as found; eval mode).
        data: a pair of tensors, a Dataset, or an iterable of batches, with class labels
            (the training set by convention).
        magnitude_aware: per-weight variance σ²w_i² + ε².
        target_drop: the accuracy drop d (0.1).
        tolerance: accepted |d̂ − d| (0.01).
        sigma_max: upper end of the search (2).
        num_halvings: bisection steps at most (15).
        num_draws: Monte-Carlo draws per step (10).
        epsilon: ε of the magnitude-aware variance (1e-3).
        loss: accepted for a uniform signature (the criterion is the accuracy).
        seed: draws of step i come from a generator seeded with (seed, i).
        batch_size: examples per forward pass (None: all).
        chunk_size: draws per vectorized call (default: all).
        vectorize: False loops over the draws (reference); None (default): vmap, or the
            loop with a warning for a model vmap cannot trace.
        meta: provenance to extend.

    Returns:
        :class:`PacBayesFlatness` (``converged`` False when the tolerance was never met;
        then σ is the last midpoint). A model whose loss at w is NaN has no accuracy to
        drop: flatness and σ are NaN, with a warning, and no draw is spent.

    Raises:
        SharpscopeError: the targets are not class labels, or a setting is out of range.
    """
    start = time.perf_counter()
    check(0 < target_drop < 1, f"target_drop must be in (0, 1), got {target_drop}")
    check(tolerance > 0, f"tolerance must be > 0, got {tolerance}")
    check(sigma_max > 0, f"sigma_max must be > 0, got {sigma_max}")
    vectorize = True if vectorize is None else bool(vectorize)  # None: vmap_or_loop's try
    check(num_halvings >= 1, f"num_halvings must be >= 1, got {num_halvings}")
    check(num_draws >= 1, f"num_draws must be >= 1, got {num_draws}")
    loss_fn = resolve_loss(loss)
    dtype, device = model_dtype_device(model)
    warn_half_precision(dtype, "the PAC-Bayes flatness")
    batches = fixed_batches(
        data, batch_size, device, why=" and PAC-Bayes flatness compares one fixed data set"
    )
    batches = [(x.to(dtype) if x.is_floating_point() else x, y) for x, y in batches]
    if not is_classification(batches[0][1]):
        raise SharpscopeError(
            "PAC-Bayes flatness measures an accuracy drop: it needs class labels (integers "
            "or one-hot rows)"
        )
    total = sum(len(y) for _, y in batches)
    layout = ParamLayout.of(model)  # refuses mixed dtypes and lazy modules first
    check_model_loss(loss_fn, model, *batches[0], "PAC-Bayes flatness")
    theta = flat_parameters(model, layout)
    w2 = theta.double().cpu().pow(2)
    chunk_size = chunk_size or num_draws

    fitting = FittingRows("draws", chunk_size)  # a chunk that does not fit is split

    def accuracies(flat: Tensor) -> Tensor:
        def chunk(sl: slice) -> Tensor:
            return evaluate_parameter_sets(
                model,
                layout,
                flat[sl],
                batches,
                loss_fn,
                classification=True,
                vectorize=vectorize,
            )[1]

        with model_errors(vectorize):  # one line for a model or loss that does not fit
            return torch.cat([part for _, part in fitting.run(chunk, 0, len(flat))])

    search: list[tuple[float, float]] = []
    with analysis_mode(model, batches[0][0]) as mode:
        accuracy = float(accuracies(theta.unsqueeze(0))[0])
        lo, hi = 0.0, float(sigma_max)
        sigma, drop, converged = hi, float("nan"), False
        if math.isnan(accuracy):  # a NaN loss (NaN weights or data): no accuracy to drop
            _warn_not_finite_at_w("PAC-Bayes flatness", math.nan, "the flatness")
            sigma, num_halvings = math.nan, 0  # every drop would be NaN: σ halved 15 times
        for step in range(num_halvings):
            sigma = 0.5 * (lo + hi)
            xi = torch.randn(
                num_draws, layout.size, generator=seeded_generator(seed, step), dtype=torch.float64
            )
            std = (sigma**2 * w2 + epsilon**2).sqrt() if magnitude_aware else sigma
            noisy = theta + (xi * std).to(device, dtype)
            drop = accuracy - float(accuracies(noisy).mean())
            search.append((sigma, drop))
            if abs(drop - target_drop) <= tolerance:
                converged = True
                break
            if drop < target_drop:
                lo = sigma
            else:
                hi = sigma
    return PacBayesFlatness(
        flatness=1.0 / sigma**2,
        sigma=sigma,
        accuracy=accuracy,
        accuracy_drop=drop,
        converged=converged,
        num_halvings_used=len(search),
        search=search,
        magnitude_aware=bool(magnitude_aware),
        target_drop=float(target_drop),
        tolerance=float(tolerance),
        sigma_max=float(sigma_max),
        num_draws=int(num_draws),
        epsilon=float(epsilon),
        num_samples=total,
        seconds=time.perf_counter() - start,
        meta=analysis_meta(
            meta,
            data=data,
            num_samples=total,
            seed=seed,
            dtype=dtype,
            device=device,
            mode=mode,
            num_params=layout.size,
            extra={"vectorized": vectorize},
        ),
    )


__all__ = [
    "AverageSharpness",
    "EpsilonSharpness",
    "PacBayesFlatness",
    "average_sharpness",
    "epsilon_sharpness",
    "keskar_sharpness",
    "keskar_subspace",
    "pac_bayes_flatness",
]
