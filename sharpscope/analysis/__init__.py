"""Analyses: pure functions from (model, data, loss) to typed, saveable results."""

from .spectrum import (
    Density,
    Spectrum,
    TopEigs,
    Trace,
    hessian_trace,
    spectral_density,
    spectrum,
    top_eigenvalues,
)

__all__ = [
    "Density",
    "Spectrum",
    "TopEigs",
    "Trace",
    "hessian_trace",
    "spectral_density",
    "spectrum",
    "top_eigenvalues",
]
