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


def batchnorm_on_one_value(model: nn.Module, example: torch.Tensor) -> str | None:
    """The name of the first BatchNorm in train mode that sees one value per channel when
    ``model`` runs on one example (``example``, a batch of one): a BatchNorm over plain
    features, or over conv maps of 1x1. In train mode PyTorch refuses to normalize that
    ("Expected more than 1 value per channel when training"), so a training step whose
    forward pass holds one example fails there. None when there is no such layer.

    The model runs once, in eval mode (statistics are not updated) and without gradients;
    a model that does not run on the example is left to the caller's own check.

    >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    >>> batchnorm_on_one_value(net, torch.zeros(1, 3))
    '1'
    >>> conv = nn.Sequential(nn.Conv1d(1, 2, 3), nn.BatchNorm1d(2))
    >>> batchnorm_on_one_value(conv, torch.zeros(1, 1, 5)) is None
    True
    """
    found: list[str] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1]:
                if x[:1].numel() // x.shape[1] <= 1 and name not in found:
                    found.append(name)

        return record

    training = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training
    ]
    if not training:
        return None
    handles = [module.register_forward_pre_hook(hook(name)) for name, module in training]
    try:
        with eval_mode(model), torch.no_grad():
            model(example[:1])
    except Exception:  # noqa: BLE001 - the model's own failure is reported elsewhere
        return None
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None
