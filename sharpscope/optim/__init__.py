"""Sharpness-aware optimizers (optimizers.md): SAM, ASAM, VaSSO, LETS, SAM-ON, bSAM.

Each is a ``torch.optim.Optimizer`` used through one call per batch,
``loss = opt.step(closure)``, where the closure zeroes the gradients, runs forward and
backward and returns the loss (or is a :class:`BatchClosure`)::

    opt = SAM(model.parameters(), base=torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9,
              model=model)
    loss = opt.step(BatchClosure(model, loss_fn, x, y))

:func:`build_optimizer` builds any of them, and plain SGD/Adam/AdamW behind the same
interface, from a spec dict (see :mod:`sharpscope.optim.factory`).
"""

from ._base import SharpnessAware, SinglePass, batchnorm_buffers, frozen_bn
from .asam import ASAM
from .bsam import BSAM
from .closure import BatchClosure
from .factory import (
    BASE_NAMES,
    OPTIMIZER_NAMES,
    base_options,
    build_optimizer,
    optimizer_metrics,
    optimizer_options,
    resolve_optimizer_spec,
)
from .lets import LETS
from .sam import SAM
from .samon import SAMON
from .vasso import VaSSO

__all__ = [
    "ASAM",
    "BASE_NAMES",
    "BSAM",
    "BatchClosure",
    "LETS",
    "OPTIMIZER_NAMES",
    "SAM",
    "SAMON",
    "SharpnessAware",
    "SinglePass",
    "VaSSO",
    "base_options",
    "batchnorm_buffers",
    "build_optimizer",
    "frozen_bn",
    "optimizer_metrics",
    "optimizer_options",
    "resolve_optimizer_spec",
]
