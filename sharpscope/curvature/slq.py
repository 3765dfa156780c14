r"""Spectral density by stochastic Lanczos quadrature (analysis.md §4).

For a unit start vector v, :math:`v^T g_\sigma(tI - A) v` is the Gauss quadrature
:math:`\sum_k \tau_k^2 g_\sigma(t - \theta_k)` of the Lanczos tridiagonal
:math:`T_m = Y \Theta Y^T` (nodes :math:`\theta_k`, weights :math:`\tau_k` = first
component of eigenvector k). Averaging over random starts estimates
:math:`\phi_\sigma(t) = \frac1P \sum_i g_\sigma(t - \lambda_i)`.

The raw nodes and weights of every probe are kept, so :func:`smooth_density` can
re-smooth with another kernel or width without a single new product.

References:
    G. H. Golub and G. Meurant (1994/2010), *Matrices, Moments and Quadrature*.
    S. Ubaru, J. Chen, Y. Saad (2017), SIAM J. Matrix Anal. Appl. 38(4).
    B. Ghorbani, S. Krishnan, Y. Xiao (2019), "An investigation into neural net
    optimization via Hessian eigenvalue density", ICML, arXiv:1901.10159.
    V. Papyan (2019), "Measurements of three-level hierarchical structure in the
    outliers in the spectrum of deepnet Hessians", ICML, arXiv:1901.08244.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
import scipy.special
import torch
from torch import Tensor

from ..errors import SharpscopeError, check_integers, check_numbers
from ._linear import F64, as_operator, random_vector
from .lanczos import LanczosProcess

Kernel = Literal["ghorbani", "papyan", "log"]
KERNELS = get_args(Kernel)
LOG_EPS = 1e-5
#: basis entries (probes x steps x P) that SLQ's lockstep probes may hold at once
PROBE_BASIS_BUDGET = 2**27


@dataclass(frozen=True)
class Quadrature:
    """Raw SLQ output.

    Attributes:
        nodes: ``(n_v, m)`` Ritz values per probe (a probe whose Krylov space was
            exhausted after fewer steps is padded with its last node and weight 0).
        weights: ``(n_v, m)`` squared first components; each row sums to 1.
        num_steps: Lanczos steps per probe.
        num_matvecs: operator applications.
        dim: P, the operator's size (deflated directions excluded).
    """

    nodes: np.ndarray
    weights: np.ndarray
    num_steps: list[int]
    num_matvecs: int
    dim: int

    @property
    def trace(self) -> float:
        r"""tr ≈ P · mean over probes of :math:`\sum_k \tau_k^2 \theta_k`."""
        return quadrature_trace(self.nodes, self.weights, self.dim)[0]

    @property
    def trace_stderr(self) -> float:
        """Standard error of :attr:`trace` over probes (inf for one probe)."""
        return quadrature_trace(self.nodes, self.weights, self.dim)[1]

    @property
    def negative_mass(self) -> float:
        r""":math:`\int_{t<0}\phi`, the quadrature mass on negative nodes."""
        return quadrature_negative_mass(self.nodes, self.weights)


def quadrature_trace(nodes: np.ndarray, weights: np.ndarray, dim: int) -> tuple[float, float]:
    r"""The trace :math:`P \cdot` mean over probes of :math:`\sum_k \tau_k^2 \theta_k`
    and its standard error over the probes (std with ddof 1 over √n; inf for one probe)."""
    per_probe = dim * np.sum(np.atleast_2d(weights) * np.atleast_2d(nodes), axis=1)
    n = len(per_probe)
    stderr = float(np.std(per_probe, ddof=1) / math.sqrt(n)) if n > 1 else math.inf
    return float(per_probe.mean()), stderr


def quadrature_negative_mass(nodes: np.ndarray, weights: np.ndarray) -> float:
    """The quadrature's mass on negative nodes (beyond rounding: :func:`negative_nodes`)."""
    weights = np.atleast_2d(weights)
    return float(np.mean(np.sum(np.where(negative_nodes(nodes), weights, 0.0), axis=1)))


#: Nodes within this fraction of the largest |node| of their probe count as zero, not
#: negative: a zero eigenvalue's Ritz value is ±rounding (1e-14 in float64, 1e-7 relative
#: in float32), and half of a rank-deficient spectrum's zeros would count as negative mass.
NEGATIVE_RTOL = 1e-6


def negative_nodes(nodes: np.ndarray) -> np.ndarray:
    """Which nodes are negative beyond rounding (``< -NEGATIVE_RTOL · max|node|`` per probe)."""
    nodes = np.atleast_2d(nodes)
    scale = np.abs(nodes).max(axis=1, keepdims=True)
    return nodes < -NEGATIVE_RTOL * scale


def slq(
    A: Any,
    num_probes: int = 10,
    num_steps: int = 90,
    *,
    seed: int = 0,
    locked: Tensor | None = None,
    dim: int | None = None,
    basis_device: torch.device | str | None = None,
    probe_block: int | None = None,
) -> Quadrature:
    """Nodes and weights of stochastic Lanczos quadrature.

    For each probe: a Rademacher start normalized to 1, ``num_steps`` Lanczos steps with
    full reorthogonalization (float64 scalars), a symmetric tridiagonal eigensolve,
    and (θ, τ²) kept. Defaults m = 90 steps (Ghorbani et al. used 80-90), n_v = 10 probes
    (their default; PyHessian's is 1): 900 products. An exhausted Krylov space ends a
    probe early: its quadrature is then exact.

    The probes run in lockstep, ``probe_block`` at a time: each step applies the operator
    to a block of vectors at once (a HessianOperator vmaps it; analysis.md §1), which is
    where a GPU gains. Each probe keeps its own basis, so the default block is as many
    probes as fit in 2^27 basis entries (all 10 for P up to ~150k at m = 90; one for a
    ResNet-18). The answer does not depend on the block (same probes, same steps).

    Args:
        A: symmetric operator (dense, HessianOperator, or callable with ``dim``).
        num_probes: n_v.
        num_steps: m.
        seed: seed of the probes.
        locked: orthonormal rows to deflate: the run stays in their orthogonal
            complement, so the density is that of the rest of the spectrum.
        dim: vector length when ``A`` is a callable.
        basis_device: where the Lanczos basis lives.
        probe_block: probes run together (default: by the 2^27-entry basis budget).

    >>> A = torch.diag(torch.tensor([1.0, 1.0, 2.0, 4.0], dtype=torch.float64))
    >>> q = slq(A, num_probes=2, num_steps=10)
    >>> np.round(q.nodes[0], 8).tolist(), np.round(q.weights.sum(1), 12).tolist()
    ([1.0, 2.0, 4.0], [1.0, 1.0])
    """
    op = as_operator(A, dim)
    if num_probes < 1 or num_steps < 1:
        raise SharpscopeError(
            f"SLQ needs >= 1 probe and >= 1 step, got {num_probes} and {num_steps}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    if locked is not None:
        locked = locked.to(op.device, F64)
    free = op.dim - (0 if locked is None else locked.shape[0])
    starts = [random_vector(op.dim, gen, "rademacher") for _ in range(num_probes)]
    if probe_block is None:
        probe_block = PROBE_BASIS_BUDGET // max(1, min(num_steps, free) * op.dim)
    probe_block = int(max(1, min(num_probes, probe_block)))
    nodes: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    steps: list[int] = []
    matvecs = 0
    for first in range(0, num_probes, probe_block):
        runs = [
            LanczosProcess(
                op,
                num_steps,
                start=v,
                generator=gen,
                restart=False,
                locked=locked,
                basis_device=basis_device,
            )
            for v in starts[first : first + probe_block]
        ]
        while active := [run for run in runs if not run.done]:
            products = op.mm(torch.stack([run.vector() for run in active]))
            for run, w in zip(active, products):
                run.advance(w)
        for process in runs:
            run = process.result(return_basis=False)
            theta, Y = run.ritz()
            nodes.append(theta)
            weights.append(Y[0, :] ** 2)
            steps.append(run.num_steps)
            matvecs += run.num_matvecs
    width = max(len(t) for t in nodes)
    pad_nodes = np.array([np.pad(t, (0, width - len(t)), mode="edge") for t in nodes])
    pad_weights = np.array([np.pad(w, (0, width - len(w))) for w in weights])
    return Quadrature(pad_nodes, pad_weights, steps, matvecs, free)


def _gaussian(
    t: np.ndarray, nodes: np.ndarray, weights: np.ndarray, var: float, cell: float = 0.0
) -> np.ndarray:
    """Probe-averaged sum of weighted unit-mass Gaussians of variance ``var`` on ``t``.

    With ``cell`` > 0 each value is the Gaussians' mean over the grid cell
    ``[t - cell/2, t + cell/2]`` (erf differences): the same as the point values when the
    Gaussian is wide against the cell, but a node between two grid points keeps its mass
    when it is not (a wide spectrum on 10,000 points gives σ < cell).
    """
    out = np.zeros_like(t)
    flat_nodes, flat_weights = nodes.reshape(-1), weights.reshape(-1) / nodes.shape[0]
    keep = flat_weights > 0
    flat_nodes, flat_weights = flat_nodes[keep], flat_weights[keep]
    norm = 1.0 / math.sqrt(2 * math.pi * var)
    scale = math.sqrt(2 * var)
    for start in range(0, len(flat_nodes), 64):  # bounded memory: 64 x grid at once
        diff = t[None, :] - flat_nodes[start : start + 64, None]
        if cell > 0:
            mass = 0.5 * (
                scipy.special.erf((diff + cell / 2) / scale)
                - scipy.special.erf((diff - cell / 2) / scale)
            )
            out += flat_weights[start : start + 64] @ mass / cell / norm
        else:
            out += flat_weights[start : start + 64] @ np.exp(-(diff**2) / (2 * var))
    return out * norm


def check_smoothing(num_points: Any, sigma: Any, kappa: Any) -> None:
    """Refuse, in one line, a grid of fewer than 2 points, a width σ that is not a finite
    number > 0, or a κ that is not a finite number > 1 (``None``: the kernel's default).

    >>> check_smoothing(None, None, 3.0)
    >>> check_smoothing(1, None, None)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: num_points must be >= 2 (a grid needs a spacing), got 1
    """
    check_integers(num_points=num_points)
    if num_points is not None and num_points < 2:
        raise SharpscopeError(f"num_points must be >= 2 (a grid needs a spacing), got {num_points}")
    widths = (
        ("sigma", sigma, 0, "the Gaussian's standard deviation"),
        ("kappa", kappa, 1, "Papyan's width 2/((m-1)·sqrt(8 ln κ)) needs ln κ > 0"),
    )
    for name, value, low, meaning in widths:
        if value is None:
            continue
        check_numbers(**{name: value})
        if not (math.isfinite(value) and value > low):
            raise SharpscopeError(
                f"{name} must be a finite number > {low} ({meaning}), got {value}"
            )


def smooth_density(
    nodes: np.ndarray,
    weights: np.ndarray,
    *,
    kernel: Kernel = "ghorbani",
    num_points: int | None = None,
    sigma: float | None = None,
    kappa: float | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    r"""Smooth SLQ nodes and weights into a density on a grid (no operator needed).

    Kernels (analysis.md §4):

    * ``"ghorbani"`` (default; Ghorbani et al.'s reference code and PyHessian):
      variance :math:`\sigma^2 = 10^{-5}\max(1, t_{hi} - t_{lo})`, 10,000 points from the
      probe-averaged smallest node − 0.01 to the probe-averaged largest node + 0.01,
      renormalized to unit mass on the grid.
    * ``"papyan"``: the spectrum rescaled to [−1, 1] with bounds widened by 5%, a
      Gaussian of width :math:`2/((m-1)\sqrt{8\ln\kappa})` in those units, κ = 3,
      1,024 points.
    * ``"log"``: the same on :math:`\log(|\lambda| + 10^{-5})`, κ = 1.04; the grid is in
      log units.

    For both, the grid extends 3 Gaussian widths past the widened bounds, so the
    density keeps unit mass (to about 0.3%) however wide the kernel is.

    Args:
        nodes, weights: ``(n_v, m)`` from :func:`slq`.
        kernel: one of the above.
        num_points: grid size (kernel default when None).
        sigma: Gaussian standard deviation in the grid's units (kernel default when None).
        kappa: Papyan's κ (kernel default when None).

    Returns:
        ``(grid, values, info)``; ``info`` records the kernel, σ and the grid's units.

    Raises:
        SharpscopeError: an unknown kernel, ``num_points`` < 2 (the grid spacing needs
            two points), ``sigma`` not finite and > 0, or ``kappa`` not finite and > 1
            (the width divides by :math:`\sqrt{8\ln\kappa}`).

    >>> g, v, _ = smooth_density(np.array([[0.0, 1.0]]), np.array([[0.5, 0.5]]))
    >>> round(float(np.sum(v) * (g[1] - g[0])), 10)
    1.0
    """
    nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
    weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if kernel not in KERNELS:
        raise SharpscopeError(f"unknown kernel '{kernel}'; choose one of {', '.join(KERNELS)}")
    check_smoothing(num_points, sigma, kappa)
    if kernel == "ghorbani":
        lo = float(np.mean(nodes.min(axis=1))) - 0.01
        hi = float(np.mean(nodes.max(axis=1))) + 0.01
        var = 1e-5 * max(1.0, hi - lo) if sigma is None else float(sigma) ** 2
        grid = np.linspace(lo, hi, 10_000 if num_points is None else int(num_points))
        values = _gaussian(grid, nodes, weights, var, cell=float(grid[1] - grid[0]))
        mass = float(np.sum(values) * (grid[1] - grid[0]))
        values = values / mass if mass > 0 else values
        return grid, values, {"kernel": kernel, "sigma": math.sqrt(var), "units": "eigenvalue"}
    log = kernel == "log"
    points = nodes if not log else np.log(np.abs(nodes) + LOG_EPS)
    kappa = (1.04 if log else 3.0) if kappa is None else float(kappa)
    lo, hi = float(points.min()), float(points.max())
    # a floor relative to the values too: with one distinct node (an identity-like or zero
    # Hessian) an absolute 1e-12 puts the grid spacing below the values' rounding unit
    margin = 0.05 * max(hi - lo, 1e-6 * max(abs(hi), abs(lo)), 1e-12)
    lo, hi = lo - margin, hi + margin
    center, half = (hi + lo) / 2, (hi - lo) / 2
    m = nodes.shape[1]
    width = 2.0 / (max(m - 1, 1) * math.sqrt(8 * math.log(kappa)))
    if sigma is not None:
        width = float(sigma) / half
    # the grid reaches 3 widths past the widened bounds, so the Gaussians of the extreme
    # nodes are not cut off (with few Lanczos steps and κ = 1.04 they are wide)
    reach = 1.0 + 3.0 * width
    grid_unit = np.linspace(-reach, reach, 1024 if num_points is None else int(num_points))
    values = _gaussian(grid_unit, (points - center) / half, weights, width**2) / half
    info = {
        "kernel": kernel,
        "sigma": width * half,
        "kappa": kappa,
        "units": "log(|eigenvalue| + 1e-5)" if log else "eigenvalue",
    }
    return center + half * grid_unit, values, info
