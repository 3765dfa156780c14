"""Hessian spectrum of a trained model: top eigenvalues, trace and spectral density.

analysis.md §0-4 and §9; names, keys and flags from interface.md. The three quantities
are PyHessian's (Yao, Gholami, Keutzer, Mahoney, 2020, arXiv:1912.07145); the density is
stochastic Lanczos quadrature (SLQ: Ghorbani, Krishnan, Xiao, ICML 2019,
arXiv:1901.10159). Every function is
pure: it prints nothing, writes no result, restores the model's modes and never
updates a buffer (the one file it may touch is the cache of the faster HVP mode,
``$SHARPSCOPE_CACHE/hvp_modes.json``, which ``SHARPSCOPE_HVP_MODE_CACHE=0`` turns
off; see :mod:`sharpscope.curvature.mode_cache`). The model runs in ``eval()`` mode by default (BatchNorm on running
statistics), so the Hessian is that of the mean loss over the data, independent of
batching.

Typical use::

    spec = sharpscope.spectrum(model, (x, y))       # top-5, trace, density
    spec.lambda_max, spec.ratio, spec.trace, spec.trace_stderr
    spec.save("spectrum.json")
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..curvature.lanczos import (
    EigenPairs,
    Which,
    block_lanczos_top_k,
    check_tol,
    lanczos_top_k,
    products_dtype,
)
from ..curvature.operator import HessianOperator
from ..curvature.slq import (
    Kernel,
    quadrature_negative_mass,
    quadrature_trace,
    slq,
    smooth_density,
)
from ..curvature.thick_restart import thick_restart_lanczos_top_k
from ..curvature.trace import TraceEstimate, check_trace_budget, hutchinson, hutchpp
from ..errors import SharpscopeError, check_integers, check_seed
from ..modes import keeps_model_buffers
from ..precision import ieee_float32
from ..results import Result, RunMeta
from ._functional import analysis_meta

BACKENDS = ("sharpscope", "pyhessian")
TRACE_METHODS = ("hutchpp", "hutchinson")

#: relative accuracy of float32 HVPs (analysis.md §2): a tighter tol is warned about
FLOAT32_NOISE_FLOOR = 1e-6

# Seeds of the three parts of spectrum(): top-k, trace and density draw independently.
TRACE_SEED_OFFSET = 1
DENSITY_SEED_OFFSET = 2


def _float_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ----------------------------------------------------------------------------- results
@dataclass(frozen=True)
class TopEigs(Result):
    """Top-k Hessian eigenvalues (analysis.md §2).

    Attributes:
        eigenvalues: ``(k,)`` float64, sorted algebraically, descending, for every
            ``which`` (the k of largest magnitude for "LM", the smallest for "SA").
        residuals: Ritz residual estimates ``β_m |s_{m,i}|`` (true residuals for the
            pyhessian backend).
        converged: per pair, residual <= tol · max |θ|.
        which: "LA", "SA" or "LM".
        tol: the residual tolerance.
        num_lanczos_steps: Lanczos steps taken (power-iteration products for pyhessian).
        hvp_count: Hessian-vector products over the whole data, in full passes.
        seconds: wall time, including the pre-flight check and the mode timing.
        eigenvectors: ``(k, P)`` float64 Ritz vectors, flattened over the trainable
            parameters in ``model.parameters()`` order (layout in ``meta.extra``), or None.
        true_residuals: ``||Hy - θy||`` of the eigenvectors, or None.
        backend: "sharpscope" or "pyhessian".
        meta: provenance (data, seed, dtype, device, mode, HVP mode, ...).
    """

    kind: ClassVar[str] = "top_eigs"

    eigenvalues: Tensor
    residuals: Tensor
    converged: list[bool]
    which: str = "LA"
    tol: float = 1e-5
    num_lanczos_steps: int = 0
    hvp_count: float = 0.0
    seconds: float = 0.0
    eigenvectors: Tensor | None = None
    true_residuals: Tensor | None = None
    backend: str = "sharpscope"
    meta: RunMeta = field(default_factory=RunMeta)

    @property
    def k(self) -> int:
        """Number of eigenvalues."""
        return int(self.eigenvalues.numel())

    def _largest(self, i: int) -> float | None:
        """The (i+1)-th largest eigenvalue, or None when this result does not hold it.

        PyHessian's power iteration returns the k of largest |λ| (sorted descending): of
        those, only the non-negative ones are certainly the largest algebraic.
        """
        if self.which != "LA" or self.k <= i:
            return None
        value = float(self.eigenvalues[i])
        return None if self.backend == "pyhessian" and value < 0 else value

    @property
    def lambda_max(self) -> float | None:
        """λ1 (None unless which="LA")."""
        return self._largest(0)

    @property
    def lambda_5(self) -> float | None:
        """λ5 (None when k < 5 or which != "LA"; with the pyhessian backend, None when
        its fifth value is negative: then it need not be λ5)."""
        return self._largest(4)

    @property
    def ratio(self) -> float | None:
        """λ1/λ5, the SAM paper's outlier measure (None without λ5, or when λ5 is 0 to
        within its residual or the tolerance: its sign and size are then rounding)."""
        if self.lambda_5 is None or self.lambda_max is None:
            return None
        floor = max(float(self.residuals[4]), self.tol * abs(self.lambda_max))
        if abs(self.lambda_5) <= floor:
            return None
        return self.lambda_max / self.lambda_5  # type: ignore[operator]


@dataclass(frozen=True)
class Trace(Result):
    """Hessian trace estimate (analysis.md §3).

    Attributes:
        trace: the estimate of tr(H).
        stderr: its standard error (of the Hutchinson term for Hutch++).
        method: "hutchpp", "hutchinson" or "pyhessian-hutchinson".
        num_probes: probes of the Hutchinson term.
        hvp_count: Hessian-vector products, in full passes.
        seconds: wall time.
        samples: per-probe quadratic forms of the Hutchinson term.
        low_rank_part: tr(QᵀHQ) of Hutch++ (0 otherwise).
        frobenius_sq: estimate of tr(H²) (Hutchinson only; None otherwise).
        backend: "sharpscope" or "pyhessian".
        meta: provenance.
    """

    kind: ClassVar[str] = "trace"

    trace: float
    stderr: float
    method: str = "hutchpp"
    num_probes: int = 0
    hvp_count: float = 0.0
    seconds: float = 0.0
    samples: Tensor | None = None
    low_rank_part: float = 0.0
    frobenius_sq: float | None = None
    backend: str = "sharpscope"
    meta: RunMeta = field(default_factory=RunMeta)


@dataclass(frozen=True)
class Density(Result):
    """Smoothed spectral density by SLQ, with its raw quadrature (analysis.md §4).

    Attributes:
        grid, values: the smoothed density φ_σ on a grid (unit mass on the grid).
        nodes, weights: ``(n_v, m)`` raw Ritz values and squared first components per
            probe; :meth:`resmooth` re-smooths them with no new product.
        kernel, sigma: the smoothing convention and the Gaussian's standard deviation.
        units: "eigenvalue" or "log(|eigenvalue| + 1e-5)".
        trace, trace_stderr: P · mean_l Σ_k τ²θ (+ deflated eigenvalues) and its stderr.
        negative_mass: ∫_{t<0} φ from the quadrature.
        deflated: eigenvalues removed before SLQ (reported apart), or empty.
        deflated_converged: their Lanczos ``converged`` flags (analysis.md §2).
        bulk_fraction: (P - deflated)/P, the share of the spectrum the density
            describes (the smoothed density itself has unit mass).
        num_probes, num_lanczos_steps: n_v and m.
        hvp_count, seconds: cost.
        meta: provenance.
    """

    kind: ClassVar[str] = "density"

    grid: Tensor
    values: Tensor
    nodes: Tensor
    weights: Tensor
    kernel: str = "ghorbani"
    sigma: float = 0.0
    units: str = "eigenvalue"
    trace: float = 0.0
    trace_stderr: float | None = None
    negative_mass: float = 0.0
    deflated: Tensor | None = None
    deflated_converged: list[bool] = field(default_factory=list)
    bulk_fraction: float = 1.0
    num_probes: int = 0
    num_lanczos_steps: int = 0
    hvp_count: float = 0.0
    seconds: float = 0.0
    meta: RunMeta = field(default_factory=RunMeta)

    def resmooth(
        self,
        kernel: Kernel | None = None,
        *,
        num_points: int | None = None,
        sigma: float | None = None,
        kappa: float | None = None,
    ) -> Density:
        """The same quadrature smoothed again (another kernel, width or grid); no HVP.

        Raises:
            SharpscopeError: an unknown kernel, ``num_points`` < 2, ``sigma`` not finite
                and > 0, or ``kappa`` not finite and > 1 (:func:`smooth_density`).

        >>> d = Density.from_quadrature(np.array([[0.0, 2.0]]), np.array([[0.5, 0.5]]), dim=2)
        >>> d.resmooth("papyan").kernel, len(d.resmooth(num_points=100).grid)
        ('papyan', 100)
        """
        grid, values, info = smooth_density(
            self.nodes.numpy(),
            self.weights.numpy(),
            kernel=kernel or self.kernel,  # type: ignore[arg-type]
            num_points=num_points,
            sigma=sigma,
            kappa=kappa,
        )
        return dataclasses.replace(
            self,
            grid=torch.from_numpy(grid),
            values=torch.from_numpy(values),
            kernel=info["kernel"],
            sigma=float(info["sigma"]),
            units=info["units"],
        )

    @classmethod
    def from_quadrature(
        cls,
        nodes: np.ndarray,
        weights: np.ndarray,
        *,
        dim: int,
        kernel: Kernel = "ghorbani",
        deflated: Tensor | None = None,
        **fields: Any,
    ) -> Density:
        """Build from raw SLQ nodes/weights of an operator of size ``dim`` (bulk size)."""
        nodes = np.atleast_2d(np.asarray(nodes, dtype=np.float64))
        weights = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        grid, values, info = smooth_density(nodes, weights, kernel=kernel)
        trace, stderr = quadrature_trace(nodes, weights, dim)
        extra = 0.0 if deflated is None else float(deflated.sum())
        total = dim + (0 if deflated is None else int(deflated.numel()))
        return cls(
            grid=torch.from_numpy(grid),
            values=torch.from_numpy(values),
            nodes=torch.from_numpy(nodes),
            weights=torch.from_numpy(weights),
            kernel=info["kernel"],
            sigma=float(info["sigma"]),
            units=info["units"],
            trace=trace + extra,
            trace_stderr=stderr if math.isfinite(stderr) else None,  # None: one probe
            negative_mass=(
                quadrature_negative_mass(nodes, weights) * dim
                + (0 if deflated is None else int((deflated < 0).sum()))
            )
            / total,
            deflated=deflated if deflated is not None else torch.zeros(0, dtype=torch.float64),
            bulk_fraction=dim / total,
            num_probes=int(nodes.shape[0]),
            num_lanczos_steps=int(nodes.shape[1]),
            **fields,
        )


@dataclass(frozen=True)
class Spectrum(Result):
    """Top eigenvalues, trace and density of one Hessian (``sharpscope spectrum``).

    ``to_dict()``/``to_json()`` give the interface.md keys (``eigenvalues``,
    ``lambda_max``, ``lambda_5``, ``ratio``, ``trace``, ``trace_stderr``,
    ``density{grid, values}``, ``hvp_count``, ``seconds``, ``meta``) plus the parts in
    full (``top``, ``trace_detail``, ``density`` with nodes and weights). Eigenvectors are
    left out of the JSON (``P`` floats each); save them with ``spectrum.top.save("x.npz")``.
    A part skipped (``spectrum(..., skip=...)``) is None here and null in the JSON.
    """

    kind: ClassVar[str] = "spectrum"

    top: TopEigs
    trace_estimate: Trace | None = None
    density: Density | None = None
    hvp_count: float = 0.0
    seconds: float = 0.0
    meta: RunMeta = field(default_factory=RunMeta)

    @property
    def eigenvalues(self) -> Tensor:
        """Top-k eigenvalues, descending."""
        return self.top.eigenvalues

    @property
    def residuals(self) -> Tensor:
        """Their Ritz residuals (as in the JSON; :attr:`TopEigs.residuals`)."""
        return self.top.residuals

    @property
    def converged(self) -> list[bool]:
        """Per eigenvalue, residual <= tol · max |θ| (:attr:`TopEigs.converged`)."""
        return self.top.converged

    @property
    def lambda_max(self) -> float | None:
        """λ1."""
        return self.top.lambda_max

    @property
    def lambda_5(self) -> float | None:
        """λ5 (None when k < 5)."""
        return self.top.lambda_5

    @property
    def ratio(self) -> float | None:
        """λ1/λ5."""
        return self.top.ratio

    @property
    def parts(self) -> tuple[str, ...]:
        """The parts computed, of ("top", "trace", "density")."""
        return ("top",) + tuple(
            name
            for name, part in (("trace", self.trace_estimate), ("density", self.density))
            if part is not None
        )

    @property
    def trace(self) -> float | None:
        """Estimated tr(H) (None when skipped)."""
        return None if self.trace_estimate is None else self.trace_estimate.trace

    @property
    def stderr(self) -> float | None:
        """Standard error of the trace (None when skipped)."""
        return None if self.trace_estimate is None else self.trace_estimate.stderr

    trace_stderr = stderr

    @property
    def grid(self) -> Tensor | None:
        """Grid of the smoothed density (None when skipped)."""
        return None if self.density is None else self.density.grid

    @property
    def values(self) -> Tensor | None:
        """Values of the smoothed density (None when skipped)."""
        return None if self.density is None else self.density.values

    def to_dict(self) -> dict[str, Any]:
        """interface.md keys first, then the parts in full (a skipped part: null)."""
        from ..results import to_jsonable

        top = self.top.to_dict()
        trace = None if self.trace_estimate is None else self.trace_estimate.to_dict()
        density = None if self.density is None else self.density.to_dict()
        for part in (top, trace, density):
            if part is not None:
                part.pop("meta", None)
        top.pop("eigenvectors", None)  # (k, P): saved apart, as NPZ (TopEigs.save)
        return {
            "eigenvalues": to_jsonable(self.eigenvalues),
            "lambda_max": _float_or_none(self.lambda_max),
            "lambda_5": _float_or_none(self.lambda_5),
            "ratio": _float_or_none(self.ratio),
            "trace": _float_or_none(self.trace),
            "trace_stderr": _float_or_none(self.trace_stderr),
            "density": density,
            "hvp_count": float(self.hvp_count),
            "seconds": float(self.seconds),
            "meta": to_jsonable(self.meta),
            "residuals": top.get("residuals"),
            "converged": top.get("converged"),
            "which": self.top.which,
            "parts": list(self.parts),
            "trace_method": None if self.trace_estimate is None else self.trace_estimate.method,
            "top": top,
            "trace_detail": trace,
            "kind": self.kind,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Spectrum:
        """Rebuild from :meth:`to_dict` output (or an ``.npz`` save)."""
        meta = data.get("meta")
        meta = RunMeta(**meta) if isinstance(meta, dict) else (meta or RunMeta())
        top = data["top"]
        trace = data.get("trace_detail", data.get("trace_estimate"))
        density = data.get("density")
        return cls(
            top=TopEigs.from_dict({**top, "meta": meta}),  # type: ignore[arg-type]
            trace_estimate=None if trace is None else Trace.from_dict({**trace, "meta": meta}),  # type: ignore[arg-type]
            density=None if density is None else Density.from_dict({**density, "meta": meta}),  # type: ignore[arg-type]
            hvp_count=float(data.get("hvp_count", 0.0)),
            seconds=float(data.get("seconds", 0.0)),
            meta=meta,
        )


# --------------------------------------------------------------------------- plumbing
def build_operator(
    model: nn.Module | HessianOperator,
    data: Any,
    loss: Any = "cross_entropy",
    *,
    batch_size: int | None = None,
    device: Any = None,
    dtype: Any = None,
    **operator_options: Any,
) -> HessianOperator:
    """A :class:`HessianOperator` (returned as is when ``model`` already is one)."""
    if isinstance(model, HessianOperator):
        return model
    if data is None:
        raise SharpscopeError("no data given: pass (inputs, targets), a Dataset or batches")
    try:
        return HessianOperator(
            model,
            data,
            loss,
            batch_size=batch_size,
            device=device,
            dtype=dtype,
            **operator_options,
        )
    except TypeError as exc:
        if "unexpected keyword" in str(exc):
            raise SharpscopeError(_unknown_option(exc)) from exc
        raise


def _unknown_option(exc: TypeError) -> str:
    """``unknown option 'probes'; did you mean 'num_probes'?`` for an option that neither
    the spectrum functions nor :class:`HessianOperator` take.

    >>> _unknown_option(TypeError("__init__() got an unexpected keyword argument 'probes'"))
    "unknown option 'probes'; did you mean 'num_probes'?"
    """
    import difflib
    import inspect
    import re

    found = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    if found is None:
        return f"unknown option: {exc}"
    name = found.group(1)
    known = {
        p
        for function in (HessianOperator.__init__, top_eigenvalues, hessian_trace, spectrum)
        for p in inspect.signature(function).parameters
    } - {"self", "operator_options"}
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f"unknown option '{name}'" + (f"; did you mean '{close[0]}'?" if close else "")


def _meta(op: HessianOperator, meta: RunMeta | None, seed: int, data: Any, **extra: Any) -> RunMeta:
    return analysis_meta(
        meta,
        data=data,
        num_samples=op.num_examples,
        seed=seed,
        dtype=products_dtype(op),  # a mixed-dtype model's least precise (mixed_dtypes)
        device=op.device,
        mode=op.bn_mode,
        num_params=op.dim,
        extra={
            **op.describe(),
            "param_names": op.param_names,
            "param_shapes": [list(s) for s in op.param_shapes],
            **extra,
        },
    )


def _check_backend(backend: str, which: str = "LA") -> None:
    if backend not in BACKENDS:
        raise SharpscopeError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "pyhessian" and which != "LA":
        raise SharpscopeError(
            f"the pyhessian backend takes only which LA, the default, not {which} (its power "
            "iteration returns the eigenvalues of largest |λ|, as PyHessian does); use the "
            "sharpscope backend for SA or LM"
        )


def check_spectrum_choices(
    *,
    which: str | None = None,
    trace_method: str | None = None,
    kernel: str | None = None,
    backend: str | None = None,
) -> None:
    """Refuse an unknown ``which``, trace method, density kernel or backend (or the
    pyhessian backend with a ``which`` it does not take) before any product is spent."""
    from ..curvature.lanczos import WHICH
    from ..curvature.slq import KERNELS

    if backend is not None:
        _check_backend(backend, which or "LA")

    for name, value, choices in (
        ("which", which, WHICH),
        ("trace method", trace_method, TRACE_METHODS),
        ("kernel", kernel, KERNELS),
    ):
        if value is not None and value not in choices:
            raise SharpscopeError(f"unknown {name} '{value}'; choose one of {', '.join(choices)}")


SKIPPABLE = ("trace", "density")


def check_skip(skip: Iterable[str], *, deflate: int = 0) -> frozenset[str]:
    """The parts of :func:`spectrum` to skip, checked: of "trace" and "density" only.

    >>> sorted(check_skip(["density", "trace"]))
    ['density', 'trace']
    >>> check_skip(["top"])
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: cannot skip 'top': choose from trace, density (the \
top-k always runs)
    """
    if isinstance(skip, str):
        skip = [skip]
    skipped = frozenset(skip)
    for part in sorted(skipped - set(SKIPPABLE)):
        raise SharpscopeError(
            f"cannot skip '{part}': choose from {', '.join(SKIPPABLE)} (the top-k always runs)"
        )
    if "density" in skipped and deflate:
        raise SharpscopeError(
            f"deflate {deflate} applies to the density, which is skipped: drop one of them"
        )
    return skipped


def check_deflate(deflate: int, dim: int) -> None:
    """Refuse a deflation that leaves SLQ no direction: ``0 <= deflate < P``.

    >>> check_deflate(17, 17)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: deflate=17 must be < the number of parameters (17): \
the density needs at least one direction left
    """
    if deflate < 0:
        raise SharpscopeError(f"deflate must be >= 0 (0: no deflation), got {deflate}")
    if deflate >= dim:
        raise SharpscopeError(
            f"deflate={deflate} must be < the number of parameters ({dim}): the density "
            "needs at least one direction left"
        )


def check_sizes_fit(
    num_params: int,
    *,
    k: int,
    block_size: int | None = None,
    deflate: int = 0,
    option: Callable[[str], str] = str,
    where: str = "",
) -> None:
    """Refuse, in one line and before any gradient pass, a spectrum that asks more
    directions of the model than it has parameters P: ``k <= P``, ``block_size <= P``
    and ``deflate < P``. ``option`` names an option as the caller's user wrote it
    (``--block-size``, ``analysis.spectrum.block_size``); ``where`` names the model.

    >>> check_sizes_fit(610, k=5, deflate=610, option=lambda name: "--" + name)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: --deflate 610 must be fewer than the number of \
parameters (610)
    """
    for name, value in (("k", k), ("block_size", block_size)):
        if value is not None and value > num_params:
            raise SharpscopeError(
                f"{option(name)} {value} is larger than the number of parameters "
                f"({num_params}){where}; use {option(name)} <= {num_params}"
            )
    if deflate >= num_params:
        raise SharpscopeError(
            f"{option('deflate')} {deflate} must be fewer than the number of parameters "
            f"({num_params}){where}"
        )


def check_block_options(
    block_size: int, backend: str, restart_size: int | None, return_eigenvectors: bool
) -> None:
    """Block Lanczos takes none of the options it has no use for."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise SharpscopeError(f"block_size must be an integer >= 1, got {block_size!r}")
    for given, name in (
        (backend != "sharpscope", f"backend '{backend}'"),
        (restart_size is not None, "restart_size"),
        (return_eigenvectors, "eigenvectors"),
    ):
        if given:
            raise SharpscopeError(f"block_size (block Lanczos) does not take {name}")


#: Lanczos steps for the top k when ``max_steps`` is not given: 100 (ample for k = 5), and
#: for many eigenvalues 2k + 10, the basis the thick restarts keep
DEFAULT_MAX_STEPS = 100


def default_max_steps(k: int) -> int:
    """``max_steps`` when not given: ``max(100, 2k + 10)``.

    >>> default_max_steps(5), default_max_steps(150)
    (100, 310)
    """
    return max(DEFAULT_MAX_STEPS, 2 * k + 10)


def _top_from_op(
    op: HessianOperator,
    k: int,
    *,
    which: Which,
    tol: float,
    max_steps: int | None,
    seed: int,
    return_eigenvectors: bool,
    basis_device: Any,
    backend: str,
    restart_size: int | None = None,
    true_residuals: bool | None = None,
    block_size: int | None = None,
) -> tuple[EigenPairs, dict[str, Any]]:
    if k > op.dim:
        raise SharpscopeError(
            f"k={k} is larger than the number of parameters ({op.dim}); use k <= {op.dim}"
        )
    if max_steps is None:
        max_steps = default_max_steps(k)
    check_tol(tol)  # the pyhessian backend too; "1e-3" is one line, before any warning
    if (
        products_dtype(op) == torch.float32 and 0 < tol < FLOAT32_NOISE_FLOOR
    ):  # a bad tol: one error
        warnings.warn(
            f"tol {tol:g} is below the noise floor of float32 Hessian-vector products (about "
            f"{FLOAT32_NOISE_FLOOR:g} relative): the converged flags then vouch for the Lanczos "
            "recurrence, not for the eigenvalues to that accuracy; for a tighter tol analyse "
            "a float64 model (model.double(); --dtype float64 on the command line)",
            RuntimeWarning,
            stacklevel=3,
        )
    if block_size is not None:  # its options checked by the callers, before the operator
        pairs = block_lanczos_top_k(
            op, k, block_size=block_size, which=which, tol=tol, max_steps=max_steps, seed=seed
        )
        return pairs, {"block_size": int(block_size)}
    if backend == "pyhessian":
        from ..curvature.pyhessian_backend import pyhessian_top_k

        _check_backend(backend, which)
        pairs, info = pyhessian_top_k(op, k, seed=seed)
        scale = float(pairs.eigenvalues.abs().max())
        pairs = dataclasses.replace(
            pairs,
            converged=[bool(r <= tol * scale) for r in pairs.residuals],
            eigenvectors=pairs.eigenvectors if return_eigenvectors else None,
        )
        # which stays "LA" (what was asked), but power iteration finds the largest |λ|
        info["eigenvalues_by"] = "largest magnitude (PyHessian power iteration), sorted by value"
        return pairs, info
    if restart_size is not None:
        pairs = thick_restart_lanczos_top_k(
            op,
            k,
            which=which,
            tol=tol,
            max_steps=max_steps,
            restart_size=restart_size,
            seed=seed,
            return_eigenvectors=return_eigenvectors,
            true_residuals=true_residuals,
            basis_device=basis_device,
        )
        return pairs, {"restart_size": min(int(restart_size), op.dim)}
    pairs = lanczos_top_k(
        op,
        k,
        which=which,
        tol=tol,
        max_steps=min(max_steps, op.dim),
        seed=seed,
        return_eigenvectors=return_eigenvectors,
        true_residuals=true_residuals,
        basis_device=basis_device,
    )
    return pairs, {}


def _top_result(
    pairs: EigenPairs,
    info: dict[str, Any],
    *,
    which: str,
    tol: float,
    hvps: float,
    seconds: float,
    backend: str,
    meta: RunMeta,
) -> TopEigs:
    return TopEigs(
        eigenvalues=pairs.eigenvalues.to(torch.float64),
        residuals=pairs.residuals.to(torch.float64),
        converged=list(pairs.converged),
        which=which,
        tol=float(tol),
        num_lanczos_steps=int(pairs.num_steps),
        hvp_count=float(hvps),
        seconds=float(seconds),
        eigenvectors=pairs.eigenvectors,
        true_residuals=pairs.true_residuals,
        backend=backend,
        meta=dataclasses.replace(meta, extra={**meta.extra, **info, "restarts": pairs.restarts}),
    )


# -------------------------------------------------------------------------- analyses
@ieee_float32()
@keeps_model_buffers
def top_eigenvalues(
    model: nn.Module | HessianOperator,
    data: Any = None,
    k: int = 5,
    loss: Any = "cross_entropy",
    *,
    which: Which = "LA",
    tol: float = 1e-5,
    max_steps: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    dtype: Any = None,
    device: Any = None,
    return_eigenvectors: bool = False,
    basis_device: Any = None,
    restart_size: int | None = None,
    block_size: int | None = None,
    backend: str = "sharpscope",
    meta: RunMeta | None = None,
    **operator_options: Any,
) -> TopEigs:
    """The top-k Hessian eigenvalues of the mean loss, by Lanczos (analysis.md §2).

    Lanczos with full reorthogonalization from a seeded Gaussian start; stops when the
    k wanted Ritz residuals are <= ``tol`` · max|θ| or after ``max_steps``; unconverged
    pairs are flagged. Typical cost 15-60 HVPs (+k for true residuals with
    eigenvectors). A single start vector finds one copy of an exactly repeated
    eigenvalue; fresh restarts find the others when its Krylov space runs out (few
    distinct eigenvalues), not beside a bulk (see
    :func:`sharpscope.curvature.block_lanczos_top_k`).

    Args:
        model: the network (left as found), or a prebuilt
            :class:`~sharpscope.curvature.HessianOperator` (then ``data``, ``loss`` and
            the operator options are ignored).
        data: a pair of tensors, a Dataset, or an iterable of ``(inputs, targets)``.
        k: number of eigenvalues (5 gives λ1/λ5).
        loss: "cross_entropy", "mse", a factory path, or a callable (mean loss).
        which: "LA" largest algebraic (default), "SA" most negative, "LM" largest |λ|.
        tol: relative Ritz-residual tolerance (1e-5; 1e-8 in float64 validation). Below
            1e-6 in float32 a RuntimeWarning says the products are not that accurate.
        max_steps: m_max, the most Lanczos steps (default ``max(100, 2k + 10)``, as
            :func:`default_max_steps`; capped at P).
        batch_size: examples per forward pass (None: all at once).
        seed: seed of the start vector.
        dtype: None (the model's) or "float64" (validation mode, on a float64 copy).
        device: None (the model's), "auto" (CUDA when present), or a device.
        return_eigenvectors: also return the ``(k, P)`` Ritz vectors and their true
            residuals (k extra HVPs).
        basis_device: keep the Lanczos basis there (e.g. "cpu" for large models).
        restart_size: thick restarts (Wu and Simon, 2000): keep at most this many basis
            vectors, restarting from the k wanted Ritz vectors (2k + 10 is the spec's
            choice); ``max_steps`` then counts all steps. None: plain Lanczos, whose
            basis grows to ``max_steps`` vectors.
        block_size: block Lanczos with blocks of this many start vectors
            (:func:`~sharpscope.curvature.block_lanczos_top_k`): it finds eigenvalues of
            multiplicity up to ``block_size`` with their multiplicity, which single-vector
            Lanczos misses beside a bulk (a mean-MSE Hessian I_C ⊗ XᵀX repeats each value C
            times: ``block_size=C``), and more where its block Krylov space runs out (it
            goes on from fresh blocks, as single-vector Lanczos does). ``max_steps`` then
            counts products (blocks x size; the last block takes what is left, so k
            values come back); no eigenvectors, no thick restarts.
        backend: "sharpscope" (default) or "pyhessian" (its power iteration).
        meta: provenance to extend (the CLI passes the checkpoint and data spec).
        **operator_options: ``hvp_mode``, ``bn_mode``, ``weight_decay``,
            ``param_filter``, ``check``, ``max_block_size``, ``distributed``
            (see :class:`~sharpscope.curvature.HessianOperator`).

    Returns:
        :class:`TopEigs`.

    Raises:
        SharpscopeError: bad options, k > P, no trainable parameters, non-finite loss or
            gradient, or data/model randomness caught by the pre-flight check.
    """
    _check_backend(backend, which)
    check_spectrum_choices(which=which)
    check_integers(k=k, max_steps=max_steps, restart_size=restart_size, block_size=block_size)
    check_seed("seed", seed)
    check_tol(tol)  # before the pre-flight passes
    if block_size is not None:  # before the operator's pre-flight passes
        check_block_options(block_size, backend, restart_size, return_eigenvectors)
    start = time.perf_counter()
    op = build_operator(
        model, data, loss, batch_size=batch_size, device=device, dtype=dtype, **operator_options
    )
    before = op.hvp_count
    pairs, info = _top_from_op(
        op,
        k,
        which=which,
        tol=tol,
        max_steps=max_steps,
        seed=seed,
        return_eigenvectors=return_eigenvectors,
        basis_device=basis_device,
        backend=backend,
        restart_size=restart_size,
        block_size=block_size,
    )
    hvps = op.hvp_count - before + info.get("pyhessian_hvps", 0)
    return _top_result(
        pairs,
        info,
        which=which,
        tol=tol,
        hvps=hvps,
        seconds=time.perf_counter() - start,
        backend=backend,
        meta=_meta(op, meta, seed, data),
    )


def _trace_from_op(
    op: HessianOperator,
    *,
    method: str,
    num_probes: int | None,
    distribution: str,
    seed: int,
    backend: str,
) -> TraceEstimate:
    if backend == "pyhessian":
        from ..curvature.pyhessian_backend import pyhessian_trace

        return pyhessian_trace(op, seed=seed)
    if method not in TRACE_METHODS:
        raise SharpscopeError(
            f"unknown trace method '{method}'; choose one of {', '.join(TRACE_METHODS)}"
        )
    block = op.max_block_size
    if method == "hutchpp":
        return hutchpp(
            op,
            99 if num_probes is None else num_probes,
            distribution=distribution,  # type: ignore[arg-type]
            seed=seed,
            block_size=block,
        )
    return hutchinson(
        op,
        100 if num_probes is None else num_probes,
        distribution=distribution,  # type: ignore[arg-type]
        seed=seed,
        block_size=block,
    )


def _trace_result(
    est: TraceEstimate, *, hvps: float, seconds: float, backend: str, meta: RunMeta
) -> Trace:
    return Trace(
        trace=est.trace,
        stderr=est.stderr,
        method=est.method,
        num_probes=est.num_probes,
        hvp_count=float(hvps),
        seconds=float(seconds),
        samples=torch.from_numpy(np.asarray(est.samples, dtype=np.float64)),
        low_rank_part=est.low_rank_part,
        frobenius_sq=_float_or_none(est.frobenius_sq),
        backend=backend,
        meta=meta,
    )


@ieee_float32()
@keeps_model_buffers
def hessian_trace(
    model: nn.Module | HessianOperator,
    data: Any = None,
    loss: Any = "cross_entropy",
    *,
    method: str = "hutchpp",
    num_probes: int | None = None,
    distribution: str = "rademacher",
    batch_size: int | None = None,
    seed: int = 0,
    dtype: Any = None,
    device: Any = None,
    backend: str = "sharpscope",
    meta: RunMeta | None = None,
    **operator_options: Any,
) -> Trace:
    """tr(H) of the mean loss by Hutch++ (default) or Hutchinson (analysis.md §3).

    Args:
        model, data, loss, batch_size, seed, dtype, device, meta, **operator_options: as
            in :func:`top_eigenvalues`.
        method: "hutchpp" (Meyer et al., 2021; error ~1/s when a few eigenvalues
            dominate) or "hutchinson" (error ~1/√s).
        num_probes: budget s of HVPs; default 99 for Hutch++ (a multiple of 3) and 100
            for Hutchinson (analysis.md §3).
        distribution: "rademacher" (default) or "gaussian" probes.
        backend: "sharpscope" or "pyhessian" (its Hutchinson with its own stopping rule).

    Returns:
        :class:`Trace` with ``.trace`` and ``.stderr``.
    """
    _check_backend(backend)
    if backend == "sharpscope":
        check_spectrum_choices(trace_method=method)
    check_integers(num_probes=num_probes)
    check_seed("seed", seed)
    start = time.perf_counter()
    op = build_operator(
        model, data, loss, batch_size=batch_size, device=device, dtype=dtype, **operator_options
    )
    before = op.hvp_count
    est = _trace_from_op(
        op,
        method=method,
        num_probes=num_probes,
        distribution=distribution,
        seed=seed,
        backend=backend,
    )
    hvps = op.hvp_count - before + (est.num_matvecs if backend == "pyhessian" else 0)
    return _trace_result(
        est,
        hvps=hvps,
        seconds=time.perf_counter() - start,
        backend=backend,
        meta=_meta(op, meta, seed, data, trace_distribution=distribution),
    )


def _density_from_op(
    op: HessianOperator,
    *,
    num_probes: int,
    num_lanczos_steps: int,
    kernel: Kernel,
    deflate: int | EigenPairs,
    seed: int,
    basis_device: Any,
) -> Density:
    locked = deflated = None
    converged: list[bool] = []
    if isinstance(deflate, EigenPairs) or deflate:
        if isinstance(deflate, EigenPairs):
            pairs = deflate
        else:
            check_deflate(deflate, op.dim)
            pairs = lanczos_top_k(
                op,
                int(deflate),
                seed=seed,
                max_steps=min(default_max_steps(int(deflate)), op.dim),
                return_eigenvectors=True,
                true_residuals=False,
            )
        assert pairs.eigenvectors is not None
        locked, deflated = pairs.eigenvectors, pairs.eigenvalues
        converged = list(pairs.converged)
    quad = slq(
        op,
        num_probes,
        num_lanczos_steps,
        seed=seed,
        locked=locked,
        basis_device=basis_device,
    )
    return Density.from_quadrature(
        quad.nodes,
        quad.weights,
        dim=quad.dim,
        kernel=kernel,
        deflated=deflated,
        deflated_converged=converged,
    )


@ieee_float32()
@keeps_model_buffers
def spectral_density(
    model: nn.Module | HessianOperator,
    data: Any = None,
    loss: Any = "cross_entropy",
    *,
    num_probes: int = 10,
    num_lanczos_steps: int = 90,
    kernel: Kernel = "ghorbani",
    deflate: int = 0,
    batch_size: int | None = None,
    seed: int = 0,
    dtype: Any = None,
    device: Any = None,
    basis_device: Any = None,
    meta: RunMeta | None = None,
    **operator_options: Any,
) -> Density:
    """The Hessian's spectral density by stochastic Lanczos quadrature (analysis.md §4).

    n_v Rademacher probes, m Lanczos steps each with full reorthogonalization; the raw
    nodes and weights are kept (``Density.resmooth`` re-smooths without new HVPs).
    Defaults m = 90, n_v = 10 (Ghorbani et al., 2019): 900 HVPs.

    Args:
        model, data, loss, batch_size, seed, dtype, device, basis_device, meta,
            **operator_options: as in :func:`top_eigenvalues`.
        num_probes: n_v.
        num_lanczos_steps: m.
        kernel: "ghorbani" (default), "papyan" or "log" (see
            :func:`sharpscope.curvature.smooth_density`).
        deflate: remove the top-``deflate`` eigenpairs first (found by Lanczos) to resolve
            the bulk; they are reported apart in ``.deflated``.

    Returns:
        :class:`Density`.
    """
    check_spectrum_choices(kernel=kernel)
    check_integers(num_probes=num_probes, num_lanczos_steps=num_lanczos_steps, deflate=deflate)
    check_seed("seed", seed)
    start = time.perf_counter()
    op = build_operator(
        model, data, loss, batch_size=batch_size, device=device, dtype=dtype, **operator_options
    )
    before = op.hvp_count
    density = _density_from_op(
        op,
        num_probes=num_probes,
        num_lanczos_steps=num_lanczos_steps,
        kernel=kernel,
        deflate=deflate,
        seed=seed,
        basis_device=basis_device,
    )
    return dataclasses.replace(
        density,
        hvp_count=float(op.hvp_count - before),
        seconds=time.perf_counter() - start,
        meta=_meta(op, meta, seed, data, deflate=int(deflate)),
    )


@ieee_float32()
@keeps_model_buffers
def spectrum(
    model: nn.Module | HessianOperator,
    data: Any = None,
    k: int = 5,
    loss: Any = "cross_entropy",
    *,
    which: Which = "LA",
    tol: float = 1e-5,
    max_steps: int | None = None,
    trace_method: str = "hutchpp",
    trace_probes: int | None = None,
    num_probes: int = 10,
    num_lanczos_steps: int = 90,
    kernel: Kernel = "ghorbani",
    deflate: int = 0,
    return_eigenvectors: bool = False,
    batch_size: int | None = None,
    seed: int = 0,
    dtype: Any = None,
    device: Any = None,
    basis_device: Any = None,
    restart_size: int | None = None,
    block_size: int | None = None,
    backend: str = "sharpscope",
    skip: Iterable[str] = (),
    meta: RunMeta | None = None,
    **operator_options: Any,
) -> Spectrum:
    """Top-k eigenvalues, trace and spectral density of one Hessian, on one operator.

    One pre-flight check and one HVP-mode choice serve all three parts. The parts draw
    independent random numbers: the top-k uses ``seed``, the trace ``seed + 1`` and the
    density ``seed + 2``. With ``backend="pyhessian"`` the top-k and the trace come from
    PyHessian's routines and the density from sharpscope's SLQ (PyHessian's released
    ``density()`` no longer runs on current PyTorch).

    Args:
        model, data, k, loss, which, tol, max_steps, return_eigenvectors, batch_size,
            seed, dtype, device, basis_device, restart_size, block_size, backend, meta,
            **operator_options: as in :func:`top_eigenvalues`.
        trace_method, trace_probes: as ``method``/``num_probes`` of :func:`hessian_trace`.
        num_probes, num_lanczos_steps, kernel: as in :func:`spectral_density`. Note: here
            ``num_probes`` are the density's SLQ probes (each ``num_lanczos_steps``
            products), not the trace's, which are ``trace_probes``.
        deflate: deflate the top-``deflate`` eigenpairs (reuses the top-k ones when
            ``deflate <= k`` and which="LA").
        skip: parts not to compute, of "trace" and "density" (the top-k always runs). By
            default the density costs the most: ``num_probes * num_lanczos_steps`` HVPs
            (900) against the top-5's ~13 and Hutch++'s 99; ``skip=("trace", "density")``
            gives λ1..λk alone. A skipped part is None in the result, null in its JSON.

    Returns:
        :class:`Spectrum`; ``.to_json()`` has the interface.md keys.

    Raises:
        KeyboardInterrupt: as it came (Ctrl-C, or SIGTERM under the CLI); stopped in the
            trace or the density it carries ``partial_result``, a :class:`Spectrum` of the
            parts finished before (the rest None, ``meta.extra["interrupted_in"]`` naming
            the part), which ``sharpscope spectrum --json`` writes.
    """
    _check_backend(backend, which)
    check_spectrum_choices(which=which, trace_method=trace_method, kernel=kernel)
    check_integers(
        k=k,
        max_steps=max_steps,
        trace_probes=trace_probes,
        num_probes=num_probes,
        num_lanczos_steps=num_lanczos_steps,
        deflate=deflate,
        restart_size=restart_size,
        block_size=block_size,
    )
    check_seed("seed", seed)
    check_tol(tol)  # before the pre-flight passes
    skipped = check_skip(skip, deflate=deflate)
    if block_size is not None:  # before the operator's pre-flight passes
        check_block_options(block_size, backend, restart_size, return_eigenvectors)
    if "trace" not in skipped and backend != "pyhessian" and trace_probes is not None:
        check_trace_budget(trace_method, trace_probes)  # not after the top-k's products
    start = time.perf_counter()
    op = build_operator(
        model, data, loss, batch_size=batch_size, device=device, dtype=dtype, **operator_options
    )
    if "density" not in skipped:  # before the top-k's products, not after them
        check_deflate(deflate, op.dim)
    meta = _meta(op, meta, seed, data, backend=backend)
    counts: dict[str, float] = {}

    t0, h0 = time.perf_counter(), op.hvp_count
    # deflating reuses the top-k's vectors (block Lanczos keeps none)
    reuse = bool(deflate) and deflate <= k and which == "LA" and block_size is None
    pairs, info = _top_from_op(
        op,
        k,
        which=which,
        tol=tol,
        max_steps=max_steps,
        seed=seed,
        return_eigenvectors=return_eigenvectors or reuse,
        basis_device=basis_device,
        backend=backend,
        restart_size=restart_size,
        block_size=block_size,
        true_residuals=return_eigenvectors,  # not for vectors kept only to deflate
    )
    counts["top"] = op.hvp_count - h0 + info.get("pyhessian_hvps", 0)
    meta = dataclasses.replace(meta, extra={**meta.extra, **info})
    top = _top_result(
        pairs
        if return_eigenvectors
        else dataclasses.replace(pairs, eigenvectors=None, true_residuals=None),
        info,
        which=which,
        tol=tol,
        hvps=counts["top"],
        seconds=time.perf_counter() - t0,
        backend=backend,
        meta=meta,
    )

    def finished(trace: Trace | None, density: Density | None, stopped_in: str) -> Spectrum:
        """What is done when an interrupt stops the part ``stopped_in``: its own and the
        later parts are None (null in the JSON, as skipped parts are)."""
        extra = {**meta.extra, "hvp_count_parts": dict(counts), "interrupted_in": stopped_in}
        return Spectrum(
            top=top,
            trace_estimate=trace,
            density=density,
            hvp_count=float(op.hvp_count),
            seconds=time.perf_counter() - start,
            meta=dataclasses.replace(meta, extra=extra),
        )

    trace = None
    if "trace" not in skipped:
        t0, h0 = time.perf_counter(), op.hvp_count
        try:
            est = _trace_from_op(
                op,
                method=trace_method,
                num_probes=trace_probes,
                distribution="rademacher",
                seed=seed + TRACE_SEED_OFFSET,
                backend=backend,
            )
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: hand over what is finished
            exc.partial_result = finished(None, None, "trace")  # type: ignore[attr-defined]
            raise
        counts["trace"] = op.hvp_count - h0 + (est.num_matvecs if backend == "pyhessian" else 0)
        trace = _trace_result(
            est, hvps=counts["trace"], seconds=time.perf_counter() - t0, backend=backend, meta=meta
        )

    density = None
    if "density" not in skipped:
        t0, h0 = time.perf_counter(), op.hvp_count
        if reuse:
            assert pairs.eigenvectors is not None
            deflation: int | EigenPairs = dataclasses.replace(
                pairs,
                eigenvalues=pairs.eigenvalues[:deflate],
                eigenvectors=pairs.eigenvectors[:deflate],
                converged=pairs.converged[:deflate],
            )
        else:
            deflation = deflate
        try:
            density = _density_from_op(
                op,
                num_probes=num_probes,
                num_lanczos_steps=num_lanczos_steps,
                kernel=kernel,
                deflate=deflation,
                seed=seed + DENSITY_SEED_OFFSET,
                basis_device=basis_device,
            )
        except KeyboardInterrupt as exc:
            exc.partial_result = finished(trace, None, "density")  # type: ignore[attr-defined]
            raise
        counts["density"] = op.hvp_count - h0
        density = dataclasses.replace(
            density, hvp_count=counts["density"], seconds=time.perf_counter() - t0, meta=meta
        )
    total = sum(counts.values())
    meta = dataclasses.replace(
        meta,
        extra={
            **meta.extra,
            "hvp_count_parts": counts,
            "grad_passes": op.grad_count,
            "seeds": {
                "top": seed,
                "trace": seed + TRACE_SEED_OFFSET,
                "density": seed + DENSITY_SEED_OFFSET,
            },
        },
    )
    return Spectrum(
        top=top,
        trace_estimate=trace,
        density=density,
        hvp_count=float(total),
        seconds=time.perf_counter() - start,
        meta=meta,
    )
