"""The exact dense Hessian of a small model, the reference every estimate is tested against.

``torch.func.hessian`` of the mean loss as a function of the flattened trainable
parameters, in float64 on a copy of the model (analysis.md §1, Validation). The
derivatives take another path than :class:`~sharpscope.curvature.HessianOperator`'s (no
HVP, no batching, no BatchNorm folding, all of ``data`` as one batch), but the two share
the loss lookup (``resolve_loss``, i.e. :func:`sharpscope.registry.get_loss`), the
switch to ``bn_mode="batch"`` for a BatchNorm without running statistics
(:func:`~sharpscope.curvature.operator.effective_bn_mode`) and the reading of ``data``
(:mod:`sharpscope.data.batches`), so a bug there is not caught by comparing the two. It
forms the P x P matrix, so it is only for P up to a few thousand.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..data.batches import as_tensors
from ..errors import SharpscopeError
from ..registry import LOSS_CHECK_EXAMPLES, check_loss_on_outputs
from .operator import effective_bn_mode, resolve_loss
from .twice import twice_differentiable

F64 = torch.float64


def dense_hessian(
    model: nn.Module,
    data: Any,
    loss: Any = "cross_entropy",
    *,
    bn_mode: str = "eval",
    max_params: int = 20_000,
) -> Tensor:
    r"""The float64 Hessian :math:`\nabla^2_\theta L` of the mean loss over all of ``data``.

    Args:
        model: the network (not modified: a float64 copy is used).
        data: anything :func:`sharpscope.data.batches.as_tensors` accepts.
        loss: loss name, factory path or callable.
        bn_mode: "eval" (running statistics) or "batch" (batch statistics over all of
            ``data`` as one batch; also where a BatchNorm keeps no running statistics).
        max_params: refuse larger models (the matrix has P² entries).

    Returns:
        ``(P, P)`` float64, parameters in ``model.parameters()`` order (trainable only).

    >>> m = nn.Linear(2, 1, bias=False)
    >>> x, y = torch.eye(2), torch.zeros(2, 1)
    >>> dense_hessian(m, (x, y), "mse").tolist()  # (2/N) X^T X with N = 2
    [[1.0, 0.0], [0.0, 1.0]]
    """
    loss_fn = resolve_loss(loss)
    bn_mode = effective_bn_mode(model, bn_mode)  # type: ignore[arg-type]
    module = copy.deepcopy(model).to(F64)
    if bn_mode == "batch":
        torch.func.replace_all_batch_norm_modules_(module)
        module.eval()
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
    else:
        module.eval()
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in module.named_parameters() if p.requires_grad]
    consts = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    consts.update(dict(module.named_buffers()))
    theta = torch.cat([p.detach().reshape(-1) for n, p in module.named_parameters() if n in names])
    if theta.numel() > max_params:
        raise SharpscopeError(
            f"dense Hessian of {theta.numel()} parameters refused (> {max_params})"
        )
    x, y = as_tensors(data)
    x = x.to(F64) if x.is_floating_point() else x
    y = y.to(F64) if y.is_floating_point() else y
    try:  # a loss reading the (user's) model's parameters is refused
        with torch.no_grad():
            out = module(x[:LOSS_CHECK_EXAMPLES])
    except Exception:  # noqa: BLE001 - the Hessian's own call names the failure
        out = None
    if isinstance(out, Tensor):
        check_loss_on_outputs(
            loss_fn, out, y[:LOSS_CHECK_EXAMPLES], model.parameters(), "the dense Hessian"
        )

    def mean_loss(flat: Tensor) -> Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        # fused attention and hardsigmoid have no double backward: the same functions in
        # plain operations (twice.py)
        with twice_differentiable():
            out = functional_call(module, (params, consts), (x,))
        return loss_fn(out, y)

    if bn_mode == "eval":
        try:
            H = torch.func.hessian(mean_loss)(theta)
        except NotImplementedError:  # an operation without a forward-mode derivative
            H = None
        except RuntimeError as exc:  # an autograd.Function without setup_context
            if "functorch" not in str(exc):
                raise
            H = None
        if H is not None and _symmetric(H):
            return H
    # torch.func.hessian (vmapped forward over reverse) returns a non-symmetric, wrong
    # matrix for batch-statistics BatchNorm and for nn.TransformerEncoderLayer (torch
    # 2.x), and refuses an old-style autograd.Function; the unvectorized
    # reverse-over-reverse one is right there.
    H = torch.autograd.functional.hessian(mean_loss, theta)
    if not _symmetric(H):
        raise SharpscopeError(
            "PyTorch's second derivatives of this model are not symmetric (an operation "
            "with a wrong double backward, e.g. torch.nn.utils.parametrizations.weight_norm)"
        )
    return H


def _symmetric(H: Tensor) -> bool:
    """Whether ``H`` equals its transpose to float64 rounding (1e-10 of its largest entry)."""
    return bool((H - H.T).abs().max() <= 1e-10 * max(float(H.abs().max()), 1e-300))
