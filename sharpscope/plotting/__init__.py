"""Figures from results: each function takes a result and returns a matplotlib Figure.

Plotting never touches a model; analyses never plot. Every figure is saved as PDF and
PNG (:func:`save_figure`). Names load lazily, so importing sharpscope stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "plot_spectrum": "spectrum",
    "save_spectrum_plot": "spectrum",
    "plot_landscape": "landscape",
    "plot_landscape_1d": "landscape",
    "plot_landscape_contour": "landscape",
    "plot_landscape_surface": "landscape",
    "save_landscape_plots": "landscape",
    "plot_training_curves": "training",
    "plot_learned_rho": "training",
    "plot_measure_vs_gap": "study",
    "plot_measures_vs_gap": "study",
    "plot_correlations": "study",
    "plot_metric_vs_axis": "study",
    "plot_tau_vs_m": "study",
    "plot_spectral_densities": "study",
    "plot_variants": "study",
    "save_figure": "style",
    "paper_style": "style",
    "optimizer_color": "style",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sharpscope.plotting' has no attribute '{name}'")


def __dir__() -> list[str]:
    return __all__
