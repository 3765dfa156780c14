"""Module modes for evaluation and analysis: eval mode for a block, each module's own mode
afterwards.

``model.train(was_training)`` is not a restore: it sets every submodule, so a part the user
froze with ``.eval()`` (a BatchNorm backbone, say) would come back in train mode.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


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


@contextlib.contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Every buffer of ``model`` as it was before the block, afterwards: an analysis never
    changes the model, also one whose own forward writes to a buffer in eval mode (a call
    counter, a cache), in place or by assigning a new tensor."""
    saved = [
        (module, name, tensor, tensor._version, tensor.detach().clone())
        for module in model.modules()
        for name, tensor in module._buffers.items()
        if tensor is not None
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, tensor, version, value in saved:
                # an unchanged buffer is left alone: a copy would bump its version, and a
                # gradient graph that saved it could not run backward any more
                if module._buffers.get(name) is not tensor:
                    module._buffers[name] = tensor
                if tensor._version != version:
                    tensor.copy_(value)


def keeps_model_buffers(function: Callable[..., T]) -> Callable[..., T]:
    """Run ``function(model, ...)`` under :func:`buffers_kept` when its first argument is
    a module (a prepared operator is passed on as it is)."""

    @functools.wraps(function)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> T:
        if not isinstance(model, nn.Module):
            return function(model, *args, **kwargs)
        with buffers_kept(model):
            return function(model, *args, **kwargs)

    return wrapper


def batchnorm_without_running_stats(model: nn.Module) -> str | None:
    """The name of the first BatchNorm that keeps no running statistics (it normalizes with
    each batch's even in eval mode), or None."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is None:
            return name
    return None
