"""Analyses: pure functions from (model, data, loss) to typed, saveable results."""

from .landscape import LandscapeResult, landscape
from .measures import (
    AverageSharpness,
    EpsilonSharpness,
    PacBayesFlatness,
    average_sharpness,
    epsilon_sharpness,
    keskar_sharpness,
    pac_bayes_flatness,
)
from .msharpness import MSharpness, m_sharpness
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
    "AverageSharpness",
    "EpsilonSharpness",
    "LandscapeResult",
    "MSharpness",
    "PacBayesFlatness",
    "average_sharpness",
    "epsilon_sharpness",
    "keskar_sharpness",
    "landscape",
    "m_sharpness",
    "pac_bayes_flatness",
    "Density",
    "Spectrum",
    "TopEigs",
    "Trace",
    "hessian_trace",
    "spectral_density",
    "spectrum",
    "top_eigenvalues",
]
