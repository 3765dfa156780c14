"""The measures a study computes on a checkpoint, as columns of ``results.csv``.

Each measure of ``[analysis]`` maps to one function here that calls the public analysis
API and returns ``(columns, payload)``: ``columns`` are the numbers that go into the
table, ``payload`` the full JSON result saved beside it. Column names
(all oriented so that *sharper is larger*):

==================== ==========================================================
spectrum             ``lambda_max``, ``lambda_5``, ``ratio`` (λ1/λ5), ``trace``,
                     ``trace_stderr``; ``spectrum_unconverged`` (top-k values above
                     the residual tolerance; not a measure)
m_sharpness          ``msharp_m{m}_rho{ρ}`` (loss increase), ``msharp_err_m{m}_rho{ρ}``
                     (0-1 error increase); ``m_sharpness`` = the first (m, ρ)
adaptive_sharpness   ``asharp_m{m}_rho{ρ}``, ``asharp_err_m{m}_rho{ρ}``;
                     ``adaptive_sharpness`` = the first (m, ρ)
average_sharpness    ``avgsharp_rho{ρ}`` and ``avgsharp_ada_rho{ρ}`` (adaptive, over
                     ``adaptive_rho``), each with its Monte Carlo ``..._stderr``
keskar               ``keskar_eps{ε}``
pac_bayes            ``pac_bayes`` (1/σ²) and ``pac_bayes_mag`` (magnitude-aware);
                     ``pac_bayes_unconverged`` (searches that never met the drop)
(always)             ``weight_norm`` (‖θ‖₂, the classic norm baseline)
==================== ==========================================================
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..results import to_jsonable
from .sweep import format_value

Data = tuple[Tensor, Tensor]
MeasureFn = Callable[..., tuple[dict[str, float | None], dict[str, Any]]]


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _to_payload(result: Any) -> dict[str, Any]:
    if hasattr(result, "to_dict"):
        return result.to_dict()
    return to_jsonable(result)


def weight_norm(model: nn.Module) -> float:
    """‖θ‖₂ over the trainable parameters.

    >>> round(weight_norm(nn.Linear(2, 1, bias=False).requires_grad_(False)), 3)
    0.0
    """
    squares = [p.detach().double().pow(2).sum() for p in model.parameters() if p.requires_grad]
    return float(torch.stack(squares).sum().sqrt()) if squares else 0.0


def measure_spectrum(
    model: nn.Module, data: Data, loss: str, options: Mapping[str, Any], common: Mapping[str, Any]
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """λ1, λ5, λ1/λ5 and the trace (and the density, in the payload)."""
    from ..analysis.spectrum import spectrum

    kwargs = {"seed": common["seed"], "batch_size": common["batch_size"], **options}
    result = spectrum(model, data, loss=loss, **kwargs)
    columns = {
        "lambda_max": _finite(result.lambda_max),
        "lambda_5": _finite(result.lambda_5),
        "ratio": _finite(result.ratio),
        "trace": _finite(result.trace),
        "trace_stderr": _finite(result.trace_stderr),
        # Ritz values above the residual tolerance (0: every top-k eigenvalue converged);
        # the CLI warns about them, a study records them so the report can say so
        "spectrum_unconverged": sum(not c for c in (getattr(result.top, "converged", None) or [])),
    }
    return columns, _to_payload(result)


def _m_sharpness_grid(
    model: nn.Module,
    data: Data,
    loss: str,
    options: Mapping[str, Any],
    common: Mapping[str, Any],
    *,
    adaptive: bool,
    prefix: str,
    primary: str,
) -> tuple[dict[str, float | None], dict[str, Any]]:
    from ..analysis.msharpness import m_sharpness

    columns: dict[str, float | None] = {}
    results = []
    n = len(data[1])
    for m in options["m"]:
        for rho in options["rho"]:
            result = m_sharpness(
                model,
                data,
                m=min(int(m), n),
                rho=float(rho),
                adaptive=adaptive,
                steps=int(options.get("steps", 20)),  # the study default (config.py)
                norm=options.get("norm", "l2"),
                projection=options.get("projection", "exact"),
                loss=loss,
                seed=int(options.get("seed", common["seed"])),
            )
            tag = f"m{format_value(m)}_rho{format_value(rho)}"
            columns[f"{prefix}_{tag}"] = _finite(result.sharpness)
            columns[f"{prefix}_err_{tag}"] = _finite(getattr(result, "error_increase", None))
            if primary not in columns:
                columns[primary] = columns[f"{prefix}_{tag}"]
            results.append({"m": m, "rho": rho, **_to_payload(result)})
    return columns, {"results": results}


def measure_m_sharpness(model, data, loss, options, common):
    """Worst-case m-sharpness (SAM paper §4.1) over the (m, ρ) grid."""
    return _m_sharpness_grid(
        model, data, loss, options, common, adaptive=False, prefix="msharp", primary="m_sharpness"
    )


def measure_adaptive_sharpness(model, data, loss, options, common):
    """Adaptive worst-case m-sharpness (ASAM; Andriushchenko et al. 2023)."""
    return _m_sharpness_grid(
        model,
        data,
        loss,
        options,
        common,
        adaptive=True,
        prefix="asharp",
        primary="adaptive_sharpness",
    )


def measure_average_sharpness(model, data, loss, options, common):
    """Average-case sharpness E_δ L(w+δ) − L(w), δ ~ N(0, ρ²I) or N(0, ρ² diag(w²))."""
    from ..analysis.measures import average_sharpness

    columns: dict[str, float | None] = {}
    results = []
    extra = {k: options[k] for k in ("num_draws", "m") if k in options}
    for adaptive in options["adaptive"]:
        for rho in options["adaptive_rho"] if adaptive else options["rho"]:
            result = average_sharpness(
                model,
                data,
                float(rho),
                adaptive=bool(adaptive),
                loss=loss,
                seed=int(options.get("seed", common["seed"])),
                **extra,
            )
            name = f"avgsharp_{'ada_' if adaptive else ''}rho{format_value(rho)}"
            columns[name] = _finite(result.sharpness)
            columns[f"{name}_stderr"] = _finite(result.stderr)  # Monte Carlo, over the draws
            results.append({"rho": rho, "adaptive": adaptive, **_to_payload(result)})
    return columns, {"results": results}


def measure_keskar(model, data, loss, options, common):
    """Keskar et al. (2017) ε-sharpness, in percent of 1 + L."""
    from ..analysis.measures import epsilon_sharpness

    columns: dict[str, float | None] = {}
    results = []
    extra = {k: options[k] for k in ("iterations", "subspace_dim") if k in options}
    for eps in options["epsilon"]:
        result = epsilon_sharpness(
            model,
            data,
            float(eps),
            loss=loss,
            seed=int(options.get("seed", common["seed"])),
            batch_size=common["batch_size"],
            **extra,
        )
        columns[f"keskar_eps{format_value(eps)}"] = _finite(result.sharpness)
        results.append({"epsilon": eps, **_to_payload(result)})
    return columns, {"results": results}


def measure_pac_bayes(model, data, loss, options, common):
    """PAC-Bayes flatness 1/σ² (Jiang et al. 2020), plain and magnitude-aware."""
    from ..analysis.measures import pac_bayes_flatness

    columns: dict[str, float | int | None] = {"pac_bayes_unconverged": 0}
    unconverged = 0
    results = []
    extra = {
        k: options[k]
        for k in ("target_drop", "num_draws", "tolerance", "num_halvings")
        if k in options
    }
    for magnitude_aware in options["magnitude_aware"]:
        result = pac_bayes_flatness(
            model,
            data,
            magnitude_aware=bool(magnitude_aware),
            loss=loss,
            seed=int(options.get("seed", common["seed"])),
            batch_size=common["batch_size"],
            **extra,
        )
        name = "pac_bayes_mag" if magnitude_aware else "pac_bayes"
        columns[name] = _finite(result.flatness)
        # a search that never met the accuracy drop (a model at chance: σ runs to sigma_max)
        # gives a censored 1/σ²; counted so the report names the run
        unconverged += not result.converged
        results.append({"magnitude_aware": magnitude_aware, **_to_payload(result)})
    columns["pac_bayes_unconverged"] = unconverged
    return columns, {"results": results}


MEASURE_FUNCTIONS: dict[str, MeasureFn] = {
    "spectrum": measure_spectrum,
    "m_sharpness": measure_m_sharpness,
    "adaptive_sharpness": measure_adaptive_sharpness,
    "average_sharpness": measure_average_sharpness,
    "keskar": measure_keskar,
    "pac_bayes": measure_pac_bayes,
}

# Column prefixes that are measures (for the report); hyperparameters and metrics are not.
MEASURE_PREFIXES = (
    "lambda_max",
    "lambda_5",
    "ratio",
    "trace",
    "m_sharpness",
    "msharp_",
    "adaptive_sharpness",
    "asharp_",
    "avgsharp_",
    "keskar_",
    "pac_bayes",
    "weight_norm",
)


def is_measure_column(name: str) -> bool:
    """Whether a results.csv column is a flatness/sharpness measure.

    >>> is_measure_column("msharp_m16_rho0.05"), is_measure_column("test_acc")
    (True, False)
    """
    if name.endswith(("_stderr", "_unconverged")) or name.startswith(
        ("msharp_err_", "asharp_err_")
    ):
        return False
    return name.startswith(MEASURE_PREFIXES)


def run_measure(
    name: str,
    model: nn.Module,
    data: Data,
    loss: str,
    options: Mapping[str, Any],
    common: Mapping[str, Any],
) -> dict[str, Any]:
    """Run one measure; return the JSON record stored per checkpoint."""
    started = time.perf_counter()
    columns, payload = MEASURE_FUNCTIONS[name](model, data, loss, dict(options), common)
    return {
        "measure": name,
        "columns": columns,
        "result": payload,
        "seconds": time.perf_counter() - started,
    }
