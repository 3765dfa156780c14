"""sharpscope: sharpness-aware training and loss-geometry analysis for PyTorch.

The public API (interface.md, "Python API") is importable from the top level::

    import sharpscope as ss
    ckpt = ss.load_checkpoint("runs/sam/last.pt")
    result = ss.spectrum(ckpt.model, ss.load_data("mnist1d", samples=1024))

Names are loaded lazily, so ``import sharpscope`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "SharpscopeError": "sharpscope.errors",
    "load_checkpoint": "sharpscope.io",
    "save_checkpoint": "sharpscope.io",
    "Checkpoint": "sharpscope.io",
    "load_data": "sharpscope.data",
    "DataSplit": "sharpscope.data",
    "build_model": "sharpscope.registry",
    "get_loss": "sharpscope.registry",
    "train": "sharpscope.trainer",
    "TrainConfig": "sharpscope.trainer",
    "evaluate": "sharpscope.evaluation",
    "predictive_metrics": "sharpscope.metrics",
    "top_eigenvalues": "sharpscope.analysis.spectrum",
    "hessian_trace": "sharpscope.analysis.spectrum",
    "spectral_density": "sharpscope.analysis.spectrum",
    "spectrum": "sharpscope.analysis.spectrum",
    "TopEigs": "sharpscope.analysis.spectrum",
    "Trace": "sharpscope.analysis.spectrum",
    "Density": "sharpscope.analysis.spectrum",
    "Spectrum": "sharpscope.analysis.spectrum",
    "HessianOperator": "sharpscope.curvature",
    "m_sharpness": "sharpscope.analysis.msharpness",
    "MSharpness": "sharpscope.analysis.msharpness",
    "average_sharpness": "sharpscope.analysis.measures",
    "epsilon_sharpness": "sharpscope.analysis.measures",
    "pac_bayes_flatness": "sharpscope.analysis.measures",
    "LandscapeResult": "sharpscope.analysis.landscape",
    "landscape": "sharpscope.analysis.landscape",
    "kendall_tau": "sharpscope.analysis.correlation",
    "granulated_kendall": "sharpscope.analysis.correlation",
    "correlate": "sharpscope.analysis.correlation",
}
_SUBMODULES = ("optim", "analysis", "curvature", "plotting", "data", "models", "study")

__all__ = sorted([*_EXPORTS, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"sharpscope.{name}")
    raise AttributeError(f"module 'sharpscope' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
