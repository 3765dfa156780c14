"""The closure the trainer hands to ``optimizer.step``.

Every sharpscope optimizer takes one call per batch, ``loss = opt.step(closure)``, and
calls the closure once per forward+backward pass it needs (two for SAM, one for SGD).
A plain user closure works::

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

:class:`BatchClosure` does the same and also exposes the batch, which three features
need: m-sharpness training (``m=``, the batch is split into groups), bSAM with
``splits > 1`` (``closure(j, M)`` runs chunk ``j`` of ``M``), and LETS's exact
Hessian-vector product (``hypergrad="hvp"``). It also carries the mixed-precision
settings, so the optimizer can handle an fp16 ``GradScaler`` for both passes.

Trainer usage::

    closure = BatchClosure(model, loss_fn, x, y, autocast_dtype=torch.bfloat16)
    loss = opt.step(closure)          # opt from sharpscope.optim.build_optimizer

With ``scaler=GradScaler(...)`` the optimizer owns the scaler protocol for the step
(unscale before the perturbation and before the base step, skip on inf/NaN,
``scaler.update()``): do not call ``scaler.step``/``scaler.update`` yourself.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import SharpscopeError

__all__ = ["BatchClosure", "unwrap_model"]

#: the dtypes ``torch.autocast`` computes in for training; ``None`` is full precision
AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)
#: what the closure and the optimizers call on a ``GradScaler``
SCALER_METHODS = ("scale", "unscale_", "step", "update", "get_scale", "is_enabled")


def check_scaler(scaler: Any) -> None:
    """Refuse, in one line, a ``scaler`` that is neither None nor a GradScaler (it failed
    at the first step with an AttributeError)."""
    lacking = [name for name in SCALER_METHODS if not callable(getattr(scaler, name, None))]
    if scaler is not None and lacking:
        raise SharpscopeError(
            "scaler must be a torch.amp.GradScaler or None, got a "
            f"{type(scaler).__name__} (no {', '.join(lacking)})"
        )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel``/``DataParallel`` wrapper (else itself)."""
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and hasattr(model, "no_sync"):
        return inner
    if isinstance(model, nn.DataParallel):
        return model.module
    return model


class BatchClosure:
    """Zero the gradients, run forward and backward on one batch, return the loss.

    Args:
        model: the network (may be wrapped in ``DistributedDataParallel``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar mean loss``.
        inputs: the batch inputs, a tensor whose first dimension indexes examples.
        targets: the batch targets, first dimension indexes examples.
        autocast_dtype: run forward and loss under ``torch.autocast`` with this dtype
            (``torch.bfloat16`` or ``torch.float16``); ``None`` for full precision.
        scaler: an fp16 ``torch.amp.GradScaler``; the backward pass is then scaled.

    Raises:
        SharpscopeError: for arguments in another order, inputs and targets of different
            lengths, another ``autocast_dtype`` or a ``scaler`` that is no ``GradScaler``.

    Calling ``closure()`` uses the whole batch; ``closure(j, M)`` uses chunk ``j`` of
    ``torch.tensor_split(batch, M)`` (equal chunks when ``M`` divides the batch size).
    Either returns the detached mean loss (unscaled).

    Example:
        >>> model = nn.Linear(2, 1)
        >>> closure = BatchClosure(model, nn.functional.mse_loss, torch.ones(4, 2), torch.zeros(4, 1))
        >>> loss = closure()
        >>> model.weight.grad is not None and loss.requires_grad is False
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[Any, Tensor], Tensor],
        inputs: Tensor,
        targets: Tensor,
        *,
        autocast_dtype: torch.dtype | None = None,
        scaler: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module) or not callable(loss_fn):
            raise SharpscopeError(
                "BatchClosure takes (model, loss_fn, inputs, targets), got "
                f"({type(model).__name__}, {type(loss_fn).__name__}, ...)"
            )
        if not all(hasattr(t, "__len__") for t in (inputs, targets)):
            raise SharpscopeError(
                "BatchClosure's inputs and targets must be batches (tensors), got "
                f"{type(inputs).__name__} and {type(targets).__name__}: the order is "
                "(model, loss_fn, inputs, targets)"
            )
        if len(inputs) != len(targets):
            raise SharpscopeError(
                f"inputs and targets differ in length ({len(inputs)} vs {len(targets)}); "
                "pass one target per example"
            )
        if autocast_dtype not in AUTOCAST_DTYPES:  # else a raw error, or no autocast, later
            raise SharpscopeError(
                "autocast_dtype must be torch.bfloat16, torch.float16 or None, got "
                f"{autocast_dtype!r}"
            )
        check_scaler(scaler)
        self.model = model
        self.loss_fn = loss_fn
        self.inputs = inputs
        self.targets = targets
        self.autocast_dtype = autocast_dtype
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None

    @property
    def batch_size(self) -> int:
        """Number of examples in the batch."""
        return len(self.targets)

    def chunk_sizes(self, num_chunks: int) -> list[int]:
        """Sizes of the ``num_chunks`` chunks ``closure(j, num_chunks)`` uses."""
        base, extra = divmod(self.batch_size, num_chunks)
        return [base + (1 if j < extra else 0) for j in range(num_chunks)]

    def chunk(self, chunk_index: int, num_chunks: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets of chunk ``chunk_index`` of ``num_chunks``."""
        if not 0 <= chunk_index < num_chunks:
            raise SharpscopeError(
                f"chunk index {chunk_index} is outside 0..{num_chunks - 1}; "
                "pass 0 <= chunk_index < num_chunks"
            )
        if num_chunks > self.batch_size:
            raise SharpscopeError(
                f"cannot split a batch of {self.batch_size} examples into {num_chunks} chunks; "
                "use a batch at least as large as the number of splits"
            )
        return (
            torch.tensor_split(self.inputs, num_chunks)[chunk_index],
            torch.tensor_split(self.targets, num_chunks)[chunk_index],
        )

    def autocast(self):
        """The autocast context of the forward pass (a no-op without ``autocast_dtype``)."""
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.inputs.device.type, dtype=self.autocast_dtype)

    def __call__(self, chunk_index: int | None = None, num_chunks: int | None = None) -> Tensor:
        if chunk_index is None:
            inputs, targets = self.inputs, self.targets
        else:
            inputs, targets = self.chunk(chunk_index, num_chunks or 1)
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            with self.autocast():
                loss = self.loss_fn(self.model(inputs), targets)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
        return loss.detach()
