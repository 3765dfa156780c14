"""m-sharpness and adaptive m-sharpness (analysis.md §5).

SAM paper (Foret et al., 2021, arXiv:2010.01412, §4.1): split the n evaluation
examples, in a fixed order, into n/m disjoint subsets S_j of m examples. With L_j the
mean loss on S_j,

    S_m^ρ(w) = (m/n) Σ_j [ max_{‖ε‖_p ≤ ρ} L_j(w + ε) − L_j(w) ].

Adaptive (ASAM, Kwon et al., 2021, arXiv:2102.11600; measured as in Andriushchenko et
al., 2023, arXiv:2302.07011): the constraint is ‖T_w⁻¹ ε‖_p ≤ ρ with
T_w = diag(|w| + η), η = 0 by default (zero weights get a zero budget).

The inner maxima are approximated by projected normalized gradient ascent from ε = 0,
all subsets at once: ``torch.func.vmap`` over the subsets of ``grad`` of
``functional_call`` with one parameter copy per subset, in chunks that bound memory.

* ``steps = 1`` is SAM's own perturbation ε̂ = ρ d(∇L_j) with the unit-budget direction
  d(g) = g/‖g‖₂ (L2), sign(g) (L∞), T²g/‖Tg‖₂ (adaptive L2), T·sign(g) (adaptive L∞).
* ``steps ≥ 2`` is Auto-PGD (Croce & Hein, 2020, arXiv:2003.01690) as used by
  Andriushchenko et al.: step size 2ρ along d (adaptive L2: |w|⊙∇/‖∇‖, their
  direction, unless ``projection="rescale"``), momentum 0.75 on the iterates, the step
  halved (and the iterate reset to the best one) at checkpoints 22%, then spacings
  shrinking by 3% down to 6% of the steps, when fewer than 75% of the steps since the
  last checkpoint increased the loss, or when the step was not halved at the last
  checkpoint and the best loss has not improved since.
* Projections: the ball (L2), the box ±ρ (L∞, ±ρ|w| adaptive) and, adaptive L2, the
  exact Euclidean projection onto the ellipsoid {δ : ‖δ/T‖₂ ≤ ρ}, solved for the
  Lagrange multiplier by bisection-safeguarded Newton steps (:func:`project_ellipsoid`); ``projection="rescale"`` instead
  projects in the scaled coordinates, which keeps adaptive sharpness invariant under
  node-wise rescaling beyond one step (see :class:`PerturbationSet`).

The best iterate of each subset is kept (ε = 0 is feasible, so every term is ≥ 0); the
loss increase and the 0-1 error increase at that iterate are both reported. Auto-PGD's
first iterate from 0 is SAM's ε̂ except for adaptive L2 with the exact projection, where
ε̂ is evaluated as one more candidate (one forward pass), so ``steps ≥ 2`` never reports
less than ``steps = 1``. A subset whose gradient at ε = 0 vanishes starts Auto-PGD from a
random point of the boundary (there is no ascent direction; one step gives ε̂ = 0).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..curvature.fold import fold_batchnorm
from ..data.batches import as_tensors, class_indices, read_fixed, same_tensors
from ..device_memory import FittingRows
from ..distributed import group_rank_and_size, peers_checked
from ..errors import check, check_autograd, check_integers, check_numbers, check_seed
from ..modes import keeps_model_buffers
from ..precision import ieee_float32
from ..registry import check_model_loss
from ..results import Result, RunMeta
from ._functional import (
    LossFn,
    ParamLayout,
    analysis_meta,
    analysis_mode,
    caller_level,
    chunk_slices,
    class_labels,
    flat_parameters,
    is_classification,
    loss_name,
    model_dtype_device,
    model_errors,
    normalize_logits,
    predicted_classes,
    resolve_loss,
    seeded_generator,
    tensors_swapped,
    vmap_or_loop,
    warn_half_precision,
)

Norm = Literal["l2", "linf"]
NORMS = ("l2", "linf")
Projection = Literal["exact", "rescale"]
PROJECTIONS = ("exact", "rescale")

#: Auto-PGD constants (Croce & Hein 2020, §3): momentum, required fraction of increasing
#: steps, first checkpoint, spacing decrease and minimum spacing (fractions of the steps).
APGD_MOMENTUM = 0.75
APGD_MIN_INCREASE_FRACTION = 0.75
APGD_FIRST_CHECKPOINT = 0.22
APGD_SPACING_DECREASE = 0.03
APGD_MIN_SPACING = 0.06


@dataclass(frozen=True)
class MSharpness(Result):
    """m-sharpness of a model on a data set (analysis.md §5).

    Attributes:
        sharpness: (m/n) Σ_j [max L_j(w+ε) − L_j(w)], the mean over subsets of the
            largest loss increase found.
        error_increase: mean over subsets of the 0-1 error increase at the same
            perturbations (NaN when the targets are not class labels).
        per_subset: ``(n/m,)`` loss increase of each subset, in data order.
        per_subset_error: ``(n/m,)`` 0-1 error increase of each subset.
        clean_loss: mean over subsets of L_j(w) (the loss on the n examples used).
        clean_error: 0-1 error on the n examples used.
        m, rho, adaptive, steps, norm, eta, logit_normalize, random_start, restarts,
            projection: the settings.
        num_samples_used: n, the examples used (the data size rounded down to a
            multiple of m).
        num_subsets: n/m.
        num_gradient_passes: gradient evaluations, in units of full passes over the n
            examples; num_forward_passes likewise for loss-only evaluations.
        loss: the loss used.
        seconds: wall time.
        meta: provenance (seed, dtype, device, mode, ...).
    """

    kind: ClassVar[str] = "msharpness"

    sharpness: float
    error_increase: float
    per_subset: Tensor
    per_subset_error: Tensor
    clean_loss: float
    clean_error: float
    m: int
    rho: float
    adaptive: bool
    steps: int
    norm: str
    eta: float
    logit_normalize: bool
    random_start: bool
    restarts: int
    projection: str
    num_samples_used: int
    num_subsets: int
    num_gradient_passes: float
    num_forward_passes: float
    loss: str
    seconds: float
    meta: RunMeta


def project_ellipsoid(
    z: Tensor, scale: Tensor, rho: float, *, rtol: float = 1e-7, max_iter: int = 100
) -> Tensor:
    """Euclidean projection of each row of ``z`` onto {δ : ‖δ/scale‖₂ ≤ ρ}.

    Minimizing ½‖δ − z‖² subject to Σ δ_i²/s_i² ≤ ρ² gives δ_i = z_i s_i²/(s_i² + μ)
    with μ = 2λ ≥ 0 (λ the Lagrange multiplier) the root of φ(μ) = ‖δ(μ)/s‖ = ρ. φ
    decreases in μ and φ(‖z⊙s‖/ρ) ≤ ρ, so the root lies in [0, ‖z⊙s‖/ρ]. It is found by
    Newton's method on 1/φ(μ) − 1/ρ (nearly linear in μ, exact in one step for a single
    coordinate; Moré & Sorensen 1983), safeguarded by bisection of that bracket, until φ
    is within ``rtol``·ρ of ρ (analysis.md §5 asks 1e-5). A final radial shrink of at
    most ``rtol`` makes the result satisfy the constraint. Entries with s_i = 0 have a zero
    budget and are set to 0. Computed in float64; each row independently.

    Args:
        z: ``(..., P)`` points.
        scale: ``(P,)`` non-negative s = |w| + η.
        rho: radius.
        rtol: relative tolerance on the norm at the solution.
        max_iter: iterations at most.

    Returns:
        The projections, with ``z``'s shape and dtype.

    >>> s = torch.tensor([1.0, 2.0], dtype=torch.float64)
    >>> d = project_ellipsoid(torch.tensor([[3.0, 0.0]], dtype=torch.float64), s, 1.0)
    >>> [round(v, 6) for v in d[0].tolist()]
    [1.0, 0.0]
    """
    zd = z.double()
    s = scale.double()
    s2 = s * s
    active = s2 > 0
    zd = torch.where(active, zd, torch.zeros_like(zd))
    ones = torch.ones_like(s)
    outside = (zd / torch.where(active, s, ones)).norm(dim=-1) > rho
    if not bool(outside.any()):
        return zd.to(z.dtype)
    weight = (zd * s).pow(2)  # z_i² s_i²
    lo = torch.zeros(zd.shape[:-1], dtype=torch.float64, device=zd.device)
    hi = weight.sum(dim=-1).sqrt() / rho
    mu = lo.clone()
    # two reused buffers: fresh multi-megabyte temporaries in every iteration cost more
    # in page faults than the arithmetic
    denom = torch.empty_like(weight)
    ratio = torch.empty_like(weight)
    for _ in range(max_iter):
        torch.add(s2, mu.unsqueeze(-1), out=denom)
        torch.div(weight, denom, out=ratio).div_(denom)  # z²s²/(s²+μ)²
        phi = ratio.sum(dim=-1).sqrt()
        # converged rows are frozen, so a row's result does not depend on its chunk
        done = ((phi - rho).abs() <= rtol * rho) | ~outside
        if bool(done.all()):
            break
        lo = torch.where((phi > rho) & ~done, mu, lo)
        hi = torch.where((phi < rho) & ~done, mu, hi)
        dphi = -ratio.div_(denom).sum(dim=-1) / phi.clamp_min(1e-300)
        newton = mu - (phi / rho) * (phi - rho) / dphi.clamp_max(-1e-300)
        inside = (newton > lo) & (newton < hi)
        mu = torch.where(done, mu, torch.where(inside, newton, 0.5 * (lo + hi)))
    delta = zd * s2 / (s2 + mu.unsqueeze(-1))
    norm = (delta / torch.where(active, s, ones)).norm(dim=-1, keepdim=True)
    delta = delta * torch.clamp(rho / norm.clamp_min(1e-300), max=1.0)
    return torch.where(outside.unsqueeze(-1), delta, zd).to(z.dtype)


@dataclass(frozen=True)
class PerturbationSet:
    """The feasible set of the inner maximization: an L2/L∞ ball, or its adaptive form.

    ``scale`` is T = |w| + η (adaptive) or None (plain). Rows of ``(C, P)`` tensors are
    independent problems. ``projection`` only matters for adaptive L2: "exact" is the
    Euclidean projection onto the ellipsoid with ascent direction T∇/‖∇‖ (analysis.md §5,
    as Andriushchenko et al.); "rescale" steps and projects in the scaled coordinates
    u = δ/T (direction T²∇/‖T∇‖, projection δ·min(1, ρ/‖δ/T‖)), which commutes with
    node-wise rescaling of a ReLU network for any number of steps.
    """

    norm: str
    rho: float
    scale: Tensor | None = None
    projection: str = "exact"

    def constraint(self, delta: Tensor) -> Tensor:
        """‖T⁻¹δ‖_p per row (entries with T = 0 must be 0 and are skipped)."""
        u = delta.double()
        if self.scale is not None:
            s = self.scale.double()
            u = torch.where(s > 0, u / torch.where(s > 0, s, torch.ones_like(s)), 0.0)
        return u.norm(dim=-1) if self.norm == "l2" else u.abs().amax(dim=-1)

    def sam_direction(self, g: Tensor) -> Tensor:
        """d with ρ·d SAM's (ASAM's) perturbation: g/‖g‖, sign(g), T²g/‖Tg‖, T·sign(g)."""
        if self.norm == "linf":
            d = torch.sign(g)
            return d * self.scale if self.scale is not None else d
        tg = g * self.scale if self.scale is not None else g
        unit = _unit_rows(tg)
        return unit * self.scale if self.scale is not None else unit

    @property
    def ascends_off_sam_direction(self) -> bool:
        """Whether Auto-PGD's first step from 0 misses SAM's ε̂ (adaptive L2, "exact")."""
        return self.norm == "l2" and self.scale is not None and self.projection == "exact"

    def direction(self, g: Tensor) -> Tensor:
        """The Auto-PGD ascent direction (unit budget: ρ·d is on the boundary)."""
        if self.norm == "l2" and self.scale is not None and self.projection == "exact":
            return _unit_rows(g) * self.scale
        return self.sam_direction(g)

    def project(self, z: Tensor) -> Tensor:
        """Projection onto the feasible set (Euclidean; scaled for "rescale")."""
        if self.norm == "linf":
            bound = self.rho * (self.scale if self.scale is not None else torch.ones_like(z))
            return torch.maximum(torch.minimum(z, bound), -bound)
        if self.scale is not None and self.projection == "exact":
            return project_ellipsoid(z, self.scale, self.rho)
        norm = self.constraint(z).unsqueeze(-1)
        factor = torch.clamp(self.rho / norm.clamp_min(1e-300), max=1.0).to(z.dtype)
        return z * factor

    def random_point(self, generator: torch.Generator, size: int, like: Tensor) -> Tensor:
        """A random start: uniform direction on the sphere (L2) or uniform in the box (L∞)."""
        if self.norm == "l2":
            u = torch.randn(size, generator=generator, dtype=torch.float64)
            u = self.rho * u / u.norm()
        else:
            u = self.rho * (2 * torch.rand(size, generator=generator, dtype=torch.float64) - 1)
        u = u.to(like.device, like.dtype)
        return u * self.scale if self.scale is not None else u


def _unit_rows(v: Tensor) -> Tensor:
    """Each row divided by its L2 norm (zero rows stay zero)."""
    norm = v.double().norm(dim=-1, keepdim=True)
    return torch.where(norm > 0, v / norm.clamp_min(1e-300).to(v.dtype), torch.zeros_like(v))


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations after which Auto-PGD may halve its step (Croce & Hein 2020, §3.2).

    p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06); checkpoint
    w_j = ⌈p_j · steps⌉.

    >>> apgd_checkpoints(20)
    [5, 9, 12, 14, 16, 18, 19, 20]
    """
    p = [0.0, APGD_FIRST_CHECKPOINT]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - APGD_SPACING_DECREASE, APGD_MIN_SPACING))
    # round before ceil so that 0.22 * 50 = 11.000000000000002 is 11
    return sorted({min(steps, max(1, math.ceil(round(q * steps, 9)))) for q in p[1:]})


# An oracle evaluates C subsets at C perturbations: (loss (C,) float64, grad (C, P) or
# None, number of misclassified examples (C,) float64).
Oracle = Callable[[Tensor, bool], tuple[Tensor, Tensor | None, Tensor]]


@dataclass
class _Ascent:
    clean_loss: Tensor
    clean_wrong: Tensor
    best_loss: Tensor
    best_wrong: Tensor
    grad_calls: int
    value_calls: int
    one_step_best: Tensor  # 1.0 where SAM's ε̂, a candidate beside the ascent, beat it
    bad_gradient: Tensor  # 1.0 where the gradient at the start of an ascent is not finite


def _ascend(
    oracle: Oracle,
    rows: int,
    size: int,
    like: Tensor,
    pset: PerturbationSet,
    steps: int,
    *,
    random_start: bool,
    restarts: int,
    seeds: list[tuple[int, ...]],
) -> _Ascent:
    """Maximize ``rows`` subset losses over ``pset`` (one-step SAM or Auto-PGD)."""
    zeros = torch.zeros(rows, size, dtype=like.dtype, device=like.device)
    clean_loss, clean_grad, clean_wrong = oracle(zeros, not random_start)
    grad_calls, value_calls = (0, 1) if random_start else (1, 0)
    best_loss, best_wrong = clean_loss.clone(), clean_wrong.clone()
    one_step_best = torch.zeros_like(clean_loss)
    bad_gradient = torch.zeros_like(clean_loss)
    for restart in range(restarts):
        if random_start:
            x0 = torch.stack(
                [pset.random_point(seeded_generator(*key, restart), size, like) for key in seeds]
            )
            f0, g0, w0 = oracle(x0, True)
            grad_calls += 1
        else:
            x0, f0, g0, w0 = zeros, clean_loss, clean_grad, clean_wrong
            assert g0 is not None
            # at a critical point (∇ = 0) no ascent direction exists: such rows start
            # from a random point of the boundary instead (steps = 1 stays SAM's ε̂ = 0)
            critical = g0.double().norm(dim=-1) == 0
            if steps == 1 and bool(critical.any()):
                warnings.warn(
                    "a subset's loss gradient is exactly zero (a critical point): SAM's "
                    "one-step perturbation, and so its sharpness, is 0 there; steps >= 2 "
                    "searches the ball from a random start",
                    RuntimeWarning,
                    stacklevel=2,
                )
            elif bool(critical.any()):
                start = torch.stack(
                    [
                        pset.random_point(seeded_generator(*key, restart), size, like)
                        for key in seeds
                    ]
                )
                x0 = torch.where(critical.unsqueeze(-1), start, zeros)
                f0, g0, w0 = oracle(x0, True)
                grad_calls += 1
        assert g0 is not None
        # an inf input saturated by tanh, say: a finite loss, a NaN ∇ and so a zero
        # direction (_unit_rows), which read as sharpness 0
        bad = ~torch.isfinite(g0).all(dim=-1)
        bad_gradient = torch.maximum(bad_gradient, bad.to(bad_gradient.dtype))
        run_loss, run_wrong = f0.clone(), w0.clone()
        if steps == 1:
            step = pset.rho * pset.sam_direction(g0)
            x1 = step if not random_start else pset.project(x0 + step)
            f1, _, w1 = oracle(x1, False)
            value_calls += 1
            better = _higher(f1, run_loss)
            run_loss = torch.where(better, f1, run_loss)
            run_wrong = torch.where(better, w1, run_wrong)
        else:
            run_loss, run_wrong, g_calls, v_calls = _apgd(oracle, x0, f0, g0, w0, pset, steps)
            grad_calls += g_calls
            value_calls += v_calls
            if not random_start and pset.ascends_off_sam_direction:
                # ASAM's own ε̂ is feasible but not on this ascent path: a candidate too,
                # so more steps never report less than one
                assert clean_grad is not None
                f1, _, w1 = oracle(pset.rho * pset.sam_direction(clean_grad), False)
                value_calls += 1
                better = _higher(f1, run_loss)
                one_step_best = better.to(one_step_best.dtype)
                run_loss = torch.where(better, f1, run_loss)
                run_wrong = torch.where(better, w1, run_wrong)
        better = _higher(run_loss, best_loss)
        best_loss = torch.where(better, run_loss, best_loss)
        best_wrong = torch.where(better, run_wrong, best_wrong)
    return _Ascent(
        clean_loss,
        clean_wrong,
        best_loss,
        best_wrong,
        grad_calls,
        value_calls,
        one_step_best,
        bad_gradient,
    )


def warn_non_finite_subsets(
    clean_loss: Tensor,
    per_subset: Tensor,
    gradless: Tensor | None,
    perturbed: str,
    start: str = "",
    unperturbed: str = "ε = 0",
) -> None:
    """Say which subsets' sharpness is not finite, and why (m-sharpness and average-case
    sharpness): a loss not finite at the model's own weights (the data or the model, not
    ρ, are the cause), a finite loss whose gradient is not (``gradless``, at ``start``:
    the ascent has no direction there, so their sharpness is NaN, not 0), or a loss not
    finite at a perturbed point (``perturbed`` says where)."""
    total = len(per_subset)
    clean = torch.isfinite(clean_loss)
    unclean = int((~clean).sum())
    no_gradient = 0 if gradless is None else int(gradless.sum())
    at_perturbed = ~torch.isfinite(per_subset) & clean
    if gradless is not None:
        at_perturbed &= ~gradless
    undefined = int(at_perturbed.sum())
    if unclean:
        warnings.warn(
            f"{unclean} of {total} subsets have a loss that is not finite at the model's "
            f"own weights ({unperturbed}): check the data and the model for NaN or inf; "
            "their sharpness is NaN",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
    if no_gradient:
        warnings.warn(
            f"{no_gradient} of {total} subsets have a finite loss but a gradient that is "
            f"not finite {start}: check the data and the model for NaN or inf (an inf "
            "input can leave the loss finite); their sharpness is NaN",
            RuntimeWarning,
            stacklevel=caller_level(),
        )
    if undefined:
        warnings.warn(
            f"{undefined} of {total} subsets have a loss that is not finite {perturbed}: "
            "their sharpness is "
            f"{'NaN' if bool(per_subset[at_perturbed].isnan().any()) else 'infinite'}",
            RuntimeWarning,
            stacklevel=caller_level(),
        )


def _warn_one_step_best(one_step_best: Tensor, pset: PerturbationSet, steps: int) -> None:
    """Say when Auto-PGD with the exact ellipsoid projection lost to SAM's one-step ε̂ in at
    least half the subsets: the value is then mostly the one-step value, at ``steps``
    times its cost (on trained networks it lost in every subset)."""
    won, total = int(one_step_best.sum()), len(one_step_best)
    if steps >= 2 and pset.ascends_off_sam_direction and 2 * won >= total > 0:
        warnings.warn(
            f"Auto-PGD with the exact ellipsoid projection found no higher loss than SAM's "
            f"one-step perturbation in {won} of {total} subsets, so the sharpness there is "
            "the steps=1 value; projection='rescale' (--projection rescale) ascends in the "
            "scaled coordinates and reaches the maximum",
            RuntimeWarning,
            stacklevel=3,
        )


def _higher(new: Tensor, old: Tensor) -> Tensor:
    """Where ``new`` replaces ``old`` in a maximization: it is larger, or NaN (a loss
    undefined somewhere in the ball, e.g. an overflow, makes the maximum NaN, not the
    largest finite value seen)."""
    return (new > old) | torch.isnan(new)


def _apgd(
    oracle: Oracle,
    x0: Tensor,
    f0: Tensor,
    g0: Tensor,
    w0: Tensor,
    pset: PerturbationSet,
    steps: int,
) -> tuple[Tensor, Tensor, int, int]:
    """Auto-PGD on each row; returns the best loss, its error count and the call counts."""
    rows = x0.shape[0]
    checkpoints = set(apgd_checkpoints(steps))
    x, x_prev, f, g = x0, x0, f0, g0
    best_x, best_f, best_w, best_g = x0.clone(), f0.clone(), w0.clone(), g0.clone()
    step_size = torch.full((rows, 1), 2.0 * pset.rho, dtype=torch.float64, device=x0.device)
    increases = torch.zeros(rows, dtype=torch.float64, device=x0.device)
    reduced_last = torch.zeros(rows, dtype=torch.bool, device=x0.device)
    best_f_last = best_f.clone()
    last_checkpoint = 0
    grad_calls = value_calls = 0
    for k in range(steps):
        z = pset.project(x + step_size.to(x.dtype) * pset.direction(g))
        if k > 0:
            z = pset.project(x + APGD_MOMENTUM * (z - x) + (1 - APGD_MOMENTUM) * (x - x_prev))
        x_prev, x = x, z
        need_grad = k < steps - 1
        f_new, g_new, w_new = oracle(x, need_grad)
        grad_calls += need_grad
        value_calls += not need_grad
        increases += (f_new > f).double()
        f = f_new
        better = _higher(f, best_f)
        best_f = torch.where(better, f, best_f)
        best_w = torch.where(better, w_new, best_w)
        if need_grad:
            assert g_new is not None
            g = g_new
            best_x = torch.where(better.unsqueeze(-1), x, best_x)
            best_g = torch.where(better.unsqueeze(-1), g, best_g)
        if (k + 1) in checkpoints and need_grad:
            interval = k + 1 - last_checkpoint
            oscillating = increases < APGD_MIN_INCREASE_FRACTION * interval
            stalled = ~reduced_last & (best_f <= best_f_last)
            reduce = oscillating | stalled
            step_size = torch.where(reduce.unsqueeze(-1), step_size / 2, step_size)
            # restart from the best point, without momentum out of it
            x = torch.where(reduce.unsqueeze(-1), best_x, x)
            x_prev = torch.where(reduce.unsqueeze(-1), best_x, x_prev)
            g = torch.where(reduce.unsqueeze(-1), best_g, g)
            f = torch.where(reduce, best_f, f)
            reduced_last = reduce
            best_f_last = best_f.clone()
            increases.zero_()
            last_checkpoint = k + 1
    return best_f, best_w, grad_calls, value_calls


Score = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _scorer(loss_fn: LossFn, logit_normalize: bool, classification: bool) -> Score:
    """(outputs, targets) -> (mean loss, number misclassified)."""

    def score(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if logit_normalize:
            out = normalize_logits(out)
        wrong = (
            (predicted_classes(out) != class_labels(y)).sum() if classification else out.sum() * 0
        )
        return loss_fn(out, y), wrong

    return score


def _subset_loss_fn(
    model: nn.Module, layout: ParamLayout, theta: Tensor, score: Score
) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, tuple[Tensor, Tensor]]]:
    """f(δ, x, y) = L(θ + δ; x, y), with (loss, number misclassified) as auxiliary output."""

    def subset_loss(delta: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        loss, wrong = score(functional_call(model, layout.unflatten(theta + delta), (x,)), y)
        return loss, (loss.detach(), wrong.detach())

    return subset_loss


@dataclass
class Subsets:
    """The evaluation set cut into ``num_subsets`` disjoint subsets of ``m`` examples
    (fixed order, the last ``n_total - n`` examples dropped), with the flat parameters
    and the per-subset loss ``subset_loss(delta, x, y) -> (loss, (loss, wrong))`` (for
    ``vmap``); :meth:`looped` gives the same values one subset at a time."""

    xs: Tensor
    ys: Tensor
    num_subsets: int
    n: int
    n_total: int
    classification: bool
    layout: ParamLayout
    theta: Tensor
    subset_loss: Any
    dtype: torch.dtype
    device: torch.device
    bn_folded: list[str]
    evaluator: nn.Module
    score: Score

    @contextlib.contextmanager
    def looped(self) -> Iterator[Callable[..., tuple[Tensor, Tensor, Tensor | None]]]:
        """The straightforward per-subset reference: yields ``at(delta, x, y, need_grad)
        -> (loss, wrong, gradient or None)``, which sets the model's own parameters to
        θ + δ (:func:`~sharpscope.analysis._functional.tensors_swapped`, restored on exit)
        and differentiates with plain autograd, as a hand-written SAM loop would."""
        named = dict(self.evaluator.named_parameters())
        params = [named[name] for name in self.layout.names]
        with tensors_swapped(self.evaluator, self.layout.names) as load:

            def at(
                delta: Tensor, x: Tensor, y: Tensor, need_grad: bool
            ) -> tuple[Tensor, Tensor, Tensor | None]:
                load(self.layout.unflatten((self.theta + delta).detach()))
                with torch.set_grad_enabled(need_grad):
                    loss, wrong = self.score(self.evaluator(x), y)
                if not need_grad:
                    return loss, wrong, None
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                # an unused parameter's gradient is 0; not materialize_grads=True, whose zeros
                # require grad in torch 2.4 to 2.7 at least (the projection's out= then fails)
                flat = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
                return loss.detach(), wrong, torch.cat([g.reshape(-1) for g in flat])

            yield at


def check_subset_size(m: Any, n_total: int) -> None:
    """Refuse, in one line, a subset size that is not a positive integer or exceeds the data.

    >>> check_subset_size(100000, 1437)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: m = 100000 is larger than the 1437 examples of the \
data; choose m <= 1437
    """
    check(isinstance(m, int) and m >= 1, f"m must be a positive integer, got {m}")
    check(
        m <= n_total,
        f"m = {m} is larger than the {n_total} examples of the data; choose m <= {n_total}",
    )


def split_subsets(
    model: nn.Module,
    data: Any,
    m: int | None,
    loss: Any,
    logit_normalize: bool,
    fold_bn: bool = True,
    measure: str = "m-sharpness",
) -> Subsets:
    """Cut ``data`` into subsets of ``m`` examples (``None``: one subset of all).

    With ``fold_bn`` the subset loss runs a copy of the model with eval-mode BatchNorm
    folded into the layer before it (the same function; analysis.md §5 allows it), checked
    on the first 64 examples (:func:`sharpscope.curvature.fold.fold_batchnorm`).

    Raises:
        SharpscopeError: m < 1 or larger than the data.
    """
    inputs, targets = read_fixed(
        data,
        as_tensors,
        same_tensors,
        why=f" and {measure} cuts its subsets in the data's order",
    )
    targets = class_indices(targets)
    n_total = len(targets)
    check(n_total > 0, f"the data is empty: {measure} needs at least one example")
    m = n_total if m is None else m
    check_subset_size(m, n_total)
    loss_fn = resolve_loss(loss)
    dtype, device = model_dtype_device(model)
    warn_half_precision(dtype, "the sharpness")
    num_subsets = n_total // m
    n = num_subsets * m
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    xs = inputs[:n].to(device).reshape(num_subsets, m, *inputs.shape[1:])
    ys = targets[:n].to(device).reshape(num_subsets, m, *targets.shape[1:])
    classification = is_classification(targets)
    layout = ParamLayout.of(model)  # refuses mixed dtypes and lazy modules first
    check_model_loss(loss_fn, model, xs[0], ys[0], measure)  # one that reads the weights
    theta = flat_parameters(model, layout)
    evaluator, pairs = (
        fold_batchnorm(model, inputs[:64].to(device), check=True) if fold_bn else (model, [])
    )
    score = _scorer(loss_fn, logit_normalize, classification)
    subset_loss = _subset_loss_fn(evaluator, layout, theta, score)
    return Subsets(
        xs,
        ys,
        num_subsets,
        n,
        n_total,
        classification,
        layout,
        theta,
        subset_loss,
        dtype,
        device,
        [norm for _, norm in pairs],
        evaluator,
        score,
    )


def _vmap_oracle(subset_loss: Callable, xs: Tensor, ys: Tensor) -> Oracle:
    """All subsets of a chunk at once: vmap over (δ_j, x_j, y_j) of grad of f."""
    with_grad = vmap(grad(subset_loss, has_aux=True))
    value_only = vmap(subset_loss)

    def oracle(delta: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        if need_grad:
            g, (loss, wrong) = with_grad(delta, xs, ys)
            return loss.double(), g.detach(), wrong.double()
        with torch.no_grad():
            _, (loss, wrong) = value_only(delta, xs, ys)
        return loss.double(), None, wrong.double()

    return oracle


def _loop_oracle(at: Callable[..., Any], x: Tensor, y: Tensor) -> Oracle:
    """One subset with plain autograd (:meth:`Subsets.looped`): the reference."""

    def oracle(delta: Tensor, need_grad: bool) -> tuple[Tensor, Tensor | None, Tensor]:
        loss, wrong, g = at(delta[0], x, y, need_grad)
        g = g.unsqueeze(0) if g is not None else None
        return loss.double().reshape(1), g, wrong.double().reshape(1)

    return oracle


def default_subset_chunk(
    num_subsets: int, m: int, num_params: int, device: torch.device | None = None
) -> int:
    """Subsets per vectorized call: at most 4096 examples and 2^24 parameter entries,
    and at most 64 subsets on CPU (512 on a GPU).

    On CPU, vmapped convolutions become grouped convolutions whose speed drops with many
    groups (bench msharpness: m = 1 over 1024 examples runs ~6x faster in chunks of 64
    subsets than in one call of 1024).
    """
    on_cpu = device is None or torch.device(device).type == "cpu"
    cap = 64 if on_cpu else 512
    # On CPU the ascent's elementwise work on (chunk, P) arrays is memory-bound once they
    # leave the cache: 2^21 entries (8 MB) per call there (MLP 512: 4-6x faster than 2^24).
    entries = 2**21 if on_cpu else 2**24
    return int(max(1, min(num_subsets, cap, 4096 // m, entries // max(1, num_params))))


@vmap_or_loop
@ieee_float32()
@keeps_model_buffers
def m_sharpness(
    model: nn.Module,
    data: Any,
    m: int,
    rho: float,
    adaptive: bool = False,
    steps: int = 1,
    *,
    norm: Norm = "l2",
    loss: Any = "cross_entropy",
    seed: int = 0,
    logit_normalize: bool = False,
    eta: float = 0.0,
    random_start: bool = False,
    restarts: int = 1,
    projection: Projection = "exact",
    chunk_size: int | None = None,
    vectorize: bool | None = None,
    fold_bn: bool = True,
    distributed: bool = False,
    meta: RunMeta | None = None,
    progress: Callable[[int], None] | None = None,
) -> MSharpness:
    """m-sharpness (SAM paper §4.1), plain or adaptive, L2 or L∞ (analysis.md §5).

    S_m^ρ(w) = (m/n) Σ_j [max_{ε ∈ C} L_j(w+ε) − L_j(w)], C = {‖ε‖_p ≤ ρ} or, adaptive,
    {‖ε/(|w|+η)‖_p ≤ ρ}; see the module docstring for the ascent. The model is
    evaluated in eval mode (BatchNorm running statistics) and its modes are restored.

    Args:
        model: the network (left as found).
        data: a pair of tensors, a Dataset, or an iterable of ``(inputs, targets)``
            batches; the examples are used in this fixed order.
        m: subset size (interface default 128; the SAM paper's sweep 1, 4, 16, 64, 256).
            The data size is rounded down to a multiple of m.
        rho: radius ρ > 0 (SAM trains with 0.05 on CIFAR-10; use a grid of ρ).
        adaptive: ASAM's scale-invariant constraint with T_w = diag(|w| + η).
        steps: ascent steps; 1 is SAM's own perturbation, ≥ 2 Auto-PGD (20 for studies,
            Andriushchenko et al. 2023).
        norm: "l2" or "linf".
        loss: "cross_entropy", "mse", a factory path, or a callable returning the mean.
        seed: seed of the random starts (only used with ``random_start``).
        logit_normalize: subtract the mean logit and divide by the logits' L2 norm before
            the loss.
        eta: η of the adaptive scale (0 for measurement, as Andriushchenko et al.).
        random_start: start each ascent from a random point of the boundary (L2) or of the
            box (L∞) instead of ε = 0.
        restarts: independent ascents per subset (with ``random_start``); the best is kept.
        projection: adaptive L2 with steps ≥ 2 only. "exact" (analysis.md §5;
            Andriushchenko et al.): direction |w|⊙∇/‖∇‖ and the exact Euclidean
            projection onto the ellipsoid. It is not invariant under rescaling ReLU
            layers beyond one step (a Euclidean projection depends on the
            parametrization), and it can stall below the maximum: its fixed points
            satisfy ∇L ∝ T⁻³δ, not the optimality condition ∇L ∝ T⁻²δ. On quadratics it
            reached 99.7–99.99% of the ellipsoid maximum away from a minimum, but at a
            minimum 91–98%, depending on the start (there the gradient is rounding noise),
            and 100 steps found no more than 20; on networks (the ``cnn1d`` benchmark
            model, trained MLPs and CNNs) it often finds nothing above SAM's one-step
            ε̂, which a warning then says. "rescale": ascent and projection in the
            scaled coordinates δ/|w|, invariant for any number of steps, and reaches the
            maximum (≥ 99% in 20 steps on the same quadratics).
        chunk_size: subsets per vectorized call (default: :func:`default_subset_chunk`).
        vectorize: True: vmap over subsets; False: the same ascent in a Python loop over
            subsets (the reference). None (default): vmap, or the loop with a warning for
            a model ``torch.func.vmap`` cannot trace (``nn.LSTM``, ``nn.GRU``).
        fold_bn: evaluate a copy with eval-mode BatchNorm folded into the layer before
            it (same function, cheaper; the folded layers are in ``meta.extra``).
        distributed: True splits the subsets across the processes of an initialized
            ``torch.distributed`` group (every rank must call, with the same data, and
            returns the full result, equal to one process's, since each subset's random
            start is seeded by its index). False (default): this process alone, even
            inside a group (e.g. on rank 0 only).
        meta: provenance to extend (the CLI passes the checkpoint and data spec).
        progress: called with the number of subsets finished after each chunk (e.g. a
            progress bar's ``update``).

    Returns:
        :class:`MSharpness`.

    Raises:
        SharpscopeError: m < 1 or larger than the data, ρ ≤ 0, steps < 1, an unknown norm,
            restarts < 1 (or > 1 without ``random_start``), or η < 0.

    >>> _ = torch.manual_seed(0)
    >>> net = nn.Linear(3, 1, bias=False)
    >>> x, y = torch.randn(8, 3), torch.randn(8)
    >>> mse = lambda out, t: 0.5 * (out.squeeze(-1) - t).pow(2).mean()
    >>> r = m_sharpness(net, (x, y), m=8, rho=0.1, loss=mse)
    >>> w = net.weight.detach().clone().requires_grad_()
    >>> g = torch.autograd.grad(mse(x @ w.T, y), w)[0]
    >>> exact = mse(x @ (w + 0.1 * g / g.norm()).T, y) - mse(x @ w.T, y)
    >>> abs(r.sharpness - exact.item()) < 1e-6
    True
    """
    start = time.perf_counter()
    check_autograd("the ascent's gradients")
    vectorize = True if vectorize is None else bool(vectorize)  # None: vmap_or_loop's try
    check(norm in NORMS, f"unknown norm '{norm}'; choose one of {', '.join(NORMS)}")
    check(
        projection in PROJECTIONS,
        f"unknown projection '{projection}'; choose one of {', '.join(PROJECTIONS)}",
    )
    check_integers(m=m, steps=steps, restarts=restarts, chunk_size=chunk_size)
    check_numbers(rho=rho, eta=eta)
    check_seed("seed", seed)
    m, steps, restarts = int(m), int(steps), int(restarts)  # NumPy integers too
    check(m >= 1, f"m must be a positive integer, got {m}")
    check(rho > 0 and math.isfinite(rho), f"rho must be > 0, got {rho}")
    check(steps >= 1, f"steps must be >= 1, got {steps}")
    check(restarts >= 1, f"restarts must be >= 1, got {restarts}")
    check(
        restarts == 1 or random_start,
        f"restarts = {restarts} needs random_start: every ascent from ε = 0 is the same",
    )
    check(eta >= 0, f"eta must be >= 0, got {eta}")
    check(
        eta == 0 or adaptive, f"eta = {eta} applies to adaptive sharpness only (the scale |w| + η)"
    )
    check(chunk_size is None or chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
    sub = split_subsets(model, data, m, loss, logit_normalize, fold_bn)
    xs, ys, num_subsets, n, n_total = sub.xs, sub.ys, sub.num_subsets, sub.n, sub.n_total
    classification, layout, theta = sub.classification, sub.layout, sub.theta
    subset_loss, dtype, device = sub.subset_loss, sub.dtype, sub.device
    scale = theta.abs() + eta if adaptive else None
    pset = PerturbationSet(norm, float(rho), scale, projection)
    rank, world = group_rank_and_size(distributed)
    if chunk_size is None:
        chunk_size = default_subset_chunk(num_subsets, m, layout.size, device)
        chunk_size = min(chunk_size, -(-num_subsets // world))  # work for every rank
    if not vectorize:
        chunk_size = 1
    clean_loss = torch.empty(num_subsets, dtype=torch.float64)
    clean_wrong = torch.empty(num_subsets, dtype=torch.float64)
    best_loss = torch.empty(num_subsets, dtype=torch.float64)
    best_wrong = torch.empty(num_subsets, dtype=torch.float64)
    one_step_best = torch.zeros(num_subsets, dtype=torch.float64)
    bad_gradient = torch.zeros(num_subsets, dtype=torch.float64)
    grad_passes = value_passes = 0.0
    chunks = list(chunk_slices(num_subsets, chunk_size))[rank::world]  # round robin
    looped = contextlib.nullcontext() if vectorize else sub.looped()
    with analysis_mode(model, xs[0]) as mode, looped as at:

        def maximize(sl: slice) -> _Ascent:
            """The maximizations of the subsets in ``sl``, vectorized (or one subset)."""
            if vectorize:
                oracle = _vmap_oracle(subset_loss, xs[sl], ys[sl])
            else:
                oracle = _loop_oracle(at, xs[sl.start], ys[sl.start])
            return _ascend(
                oracle,
                sl.stop - sl.start,
                layout.size,
                theta,
                pset,
                steps,
                random_start=random_start,
                restarts=restarts,
                seeds=[(seed, j) for j in range(sl.start, sl.stop)],
            )

        fitting = FittingRows("subsets")  # a chunk that does not fit is split
        for chunk in chunks:
            with model_errors(vectorize):
                done = list(fitting.run(maximize, chunk.start, chunk.stop))
            for sl, result in done:
                rows = sl.stop - sl.start
                clean_loss[sl] = result.clean_loss.cpu()
                clean_wrong[sl] = result.clean_wrong.cpu()
                best_loss[sl] = result.best_loss.cpu()
                best_wrong[sl] = result.best_wrong.cpu()
                one_step_best[sl] = result.one_step_best.cpu()
                bad_gradient[sl] = result.bad_gradient.cpu()
                grad_passes += result.grad_calls * rows / num_subsets
                value_passes += result.value_calls * rows / num_subsets
                if progress is not None:
                    progress(rows)
    if world > 1:
        arrays = (clean_loss, clean_wrong, best_loss, best_wrong, one_step_best, bad_gradient)
        mine = torch.tensor(
            [j for sl in chunks for j in range(sl.start, sl.stop)], dtype=torch.long
        )
        part = (mine, [a[mine] for a in arrays], grad_passes, value_passes)
        parts: list[Any] = [None] * world
        with peers_checked():
            dist.all_gather_object(parts, part)
        grad_passes = value_passes = 0.0
        for other, (index, values, grads, evals) in enumerate(parts):
            for array, value in zip(arrays, values):
                array[index] = value
            grad_passes, value_passes = grad_passes + grads, value_passes + evals
            if progress is not None and other != rank:
                progress(len(index))
    per_subset = best_loss - clean_loss
    gradless = (bad_gradient > 0) & torch.isfinite(clean_loss)
    per_subset[gradless] = float("nan")
    warn_non_finite_subsets(
        clean_loss,
        per_subset,
        gradless,
        "at some point of the ball (an overflow at this rho?)",
        "at the random start of the ascent"
        if random_start
        else "at the model's own weights (ε = 0)",
    )
    _warn_one_step_best(one_step_best, pset, steps)
    nan = torch.full_like(per_subset, float("nan"))
    per_subset_error = (best_wrong - clean_wrong) / m if classification else nan
    # NaN logits still have an argmax: a subset whose loss is not finite (at ε = 0 or at
    # its worst point) has no error increase either (it read 0.0 beside a NaN sharpness)
    per_subset_error = torch.where(torch.isfinite(per_subset), per_subset_error, nan)
    result_meta = analysis_meta(
        meta,
        data=data,
        num_samples=n,
        seed=seed,
        dtype=dtype,
        device=device,
        mode=mode,
        num_params=layout.size,
        extra={
            "num_examples_given": n_total,
            "vectorized": vectorize,
            "bn_folded": sub.bn_folded,
            "processes": world,
        },
    )
    return MSharpness(
        sharpness=float(per_subset.mean()),
        error_increase=float(per_subset_error.mean()),
        per_subset=per_subset,
        per_subset_error=per_subset_error,
        clean_loss=float(clean_loss.mean()),
        clean_error=(
            float(clean_wrong.sum() / n)
            if classification and bool(torch.isfinite(clean_loss).all())
            else float("nan")
        ),
        m=m,
        rho=float(rho),
        adaptive=bool(adaptive),
        steps=steps,
        norm=norm,
        eta=float(eta),
        logit_normalize=bool(logit_normalize),
        random_start=bool(random_start),
        restarts=int(restarts),
        projection=projection,
        num_samples_used=n,
        num_subsets=num_subsets,
        num_gradient_passes=grad_passes,
        num_forward_passes=value_passes,
        loss=loss_name(loss),
        seconds=time.perf_counter() - start,
        meta=result_meta,
    )


__all__ = [
    "MSharpness",
    "PerturbationSet",
    "apgd_checkpoints",
    "m_sharpness",
    "project_ellipsoid",
]
