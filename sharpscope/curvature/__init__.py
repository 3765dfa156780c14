"""Curvature engine: the Hessian as a matrix-free operator and the Krylov kernels on it.

Everything here works on a :class:`HessianOperator` (a model's mean loss over a data set)
and equally on a dense symmetric matrix or a matvec callable, which is how the kernels
are tested against exact answers (analysis.md §1-4).
"""

from ._linear import LinearOperator, as_operator
from .dense import dense_hessian
from .fold import fold_batchnorm
from .lanczos import (
    EigenPairs,
    LanczosRun,
    block_lanczos_top_k,
    lanczos,
    lanczos_top_k,
    tridiagonal_eigh,
)
from .mode_cache import clear_mode_cache
from .operator import HessianOperator
from .power import power_iteration_top_k
from .slq import Quadrature, slq, smooth_density
from .trace import TraceEstimate, hutchinson, hutchpp

__all__ = [
    "EigenPairs",
    "HessianOperator",
    "LanczosRun",
    "LinearOperator",
    "Quadrature",
    "TraceEstimate",
    "as_operator",
    "block_lanczos_top_k",
    "clear_mode_cache",
    "dense_hessian",
    "fold_batchnorm",
    "hutchinson",
    "hutchpp",
    "lanczos",
    "lanczos_top_k",
    "power_iteration_top_k",
    "slq",
    "smooth_density",
    "tridiagonal_eigh",
]
