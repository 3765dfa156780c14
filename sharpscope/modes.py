"""Module modes for evaluation and analysis: eval mode for a block, each module's own mode
afterwards.

``model.train(was_training)`` is not a restore: it sets every submodule, so a part the user
froze with ``.eval()`` (a BatchNorm backbone, say) would come back in train mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, batchnorm_train: bool = False) -> Iterator[None]:
    """Every module of ``model`` in eval mode for the block (BatchNorm layers in train mode
    with ``batchnorm_train``); afterwards each module has its own mode back."""
    saved = [(module, module.training) for module in model.modules()]
    for module, _ in saved:
        module.training = False
        if batchnorm_train and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.training = True
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def batchnorm_without_running_stats(model: nn.Module) -> str | None:
    """The name of the first BatchNorm that keeps no running statistics (it normalizes with
    each batch's even in eval mode), or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            return name
    return None
