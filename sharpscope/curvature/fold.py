r"""Fold eval-mode BatchNorm into the layer before it, inside the differentiated function.

In eval mode a BatchNorm layer is a per-channel affine map

.. math:: \mathrm{BN}(z) = s \odot z + t, \qquad
          s = \frac{\gamma}{\sqrt{\sigma^2_{run} + \epsilon}}, \quad t = \beta - \mu_{run} \odot s,

so a convolution or linear layer :math:`z = W * x + b` followed directly by it equals one
layer with :math:`W' = s \odot W` (scaled along the output channels) and
:math:`b' = s \odot b + t = s \odot (b - \mu_{run}) + \beta`. :func:`fold_batchnorm`
returns a copy of the model whose layers compute exactly that at every call, from the
unchanged parameters W, b, γ, β
(the folded BatchNorm passes its input through). The loss is the same function of the
same named parameters, so its gradient and Hessian are unchanged, but a Hessian-vector
product no longer differentiates twice through ``native_batch_norm`` on activation-sized
tensors (a product on the small BatchNorm CNN of ``bench spectrum`` costs 1.42 instead of
1.84 gradient passes, and half as much under glibc's default malloc settings):
the scaling happens on the weights instead. This is the inference-time Conv-BN fusion of
deployment tool chains (e.g. ``torch.ao``'s ``fuse_conv_bn_eval``), done symbolically so
the parameters stay separate.

Pairs are found by running the model once on a couple of examples with hooks: a
``BatchNorm1d/2d/3d`` or ``SyncBatchNorm`` (tracking running statistics) is folded into a
``Conv1d/2d/3d`` or ``Linear`` (subclasses only if they keep the stock ``forward``)
when it receives that layer's output tensor itself, unmodified (same object, same
version counter, so an in-place ReLU in between prevents it), both run exactly once per
forward, and the channel counts agree. A layer output that is also used elsewhere cannot
be seen by hooks; :class:`~sharpscope.curvature.operator.HessianOperator` therefore
compares the loss and gradient of the folded copy with the original's in its pre-flight
check and keeps the original when they differ.
"""

from __future__ import annotations

import copy
import functools
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..modes import eval_mode

__all__ = [
    "FOLDABLE_LAYERS",
    "batchnorm_affine",
    "find_foldable_pairs",
    "fold_batchnorm",
    "tensor_sharing_copy",
]

#: the linear and convolution layers whose computation is known (affine in their weights)
FOLDABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# forward methods whose eval-mode computation the fold reproduces (a subclass that
# overrides forward, e.g. a weight-standardized conv, is left alone)
_STOCK_FORWARDS = {cls.forward for cls in FOLDABLE_LAYERS + _NORMS} | {
    nn.modules.batchnorm._BatchNorm.forward
}


def find_foldable_pairs(model: nn.Module, example: Tensor) -> list[tuple[str, str]]:
    """``(layer name, BatchNorm name)`` pairs that :func:`fold_batchnorm` would fold.

    Runs ``model`` once on ``example`` in eval mode without gradients (modes restored).
    Returns an empty list when the model fails on the example.
    """
    names = {module: name for name, module in model.named_modules()}
    calls: dict[str, int] = {}
    channels: dict[str, int] = {}
    last: dict[str, Any] = {}
    candidates: dict[str, str] = {}

    def after_layer(module: nn.Module, inputs: Any, output: Any) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        # a Linear layer's output channels are on axis 1 (BatchNorm's) only for (N, F)
        if isinstance(output, Tensor) and (output.dim() == 2 or not isinstance(module, nn.Linear)):
            last.update(name=name, output=output, version=output._version)
            # from the output, not layer.weight: outside eval mode a parametrization
            # (spectral_norm) would run a power-iteration step on the user's buffers
            channels[name] = output.shape[1]
        else:
            last.clear()

    def before_norm(module: nn.Module, inputs: Any) -> None:
        name = names[module]
        calls[name] = calls.get(name, 0) + 1
        z = inputs[0] if inputs else None
        if z is not None and z is last.get("output") and z._version == last["version"]:
            candidates[name] = last["name"]

    handles = []
    for module in names:
        if type(module).forward not in _STOCK_FORWARDS:
            continue
        if isinstance(module, FOLDABLE_LAYERS):
            handles.append(module.register_forward_hook(after_layer))
        elif isinstance(module, _NORMS) and _tracks_stats(module):
            handles.append(module.register_forward_pre_hook(before_norm))
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    except Exception:  # the pre-flight check reports a model that fails on the data
        return []
    finally:
        for handle in handles:
            handle.remove()
        last.clear()

    modules = dict(model.named_modules())
    pairs = []
    for norm_name, layer_name in candidates.items():
        if calls.get(layer_name) == 1 and calls.get(norm_name) == 1:
            if channels.get(layer_name) == modules[norm_name].num_features:
                pairs.append((layer_name, norm_name))
    return pairs


def fold_batchnorm(
    model: nn.Module, example: Tensor, *, check: bool = False
) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of ``model`` with eval-mode BatchNorm folded into the preceding layers.

    The copy shares every parameter and buffer tensor with ``model`` (no memory is
    duplicated), keeps every parameter and buffer name, and computes the same function
    in eval mode (it must only be run in eval mode). Returns ``(model, [])`` unchanged
    when nothing can be folded, or, with ``check``, when the two models' outputs on
    ``example`` differ by more than 1e-4 relative (a layer output used elsewhere too).

    >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    >>> _ = net[1].running_var.fill_(4.0)
    >>> folded, pairs = fold_batchnorm(net, torch.randn(2, 1, 5, 5))
    >>> pairs
    [('0', '1')]
    >>> x = torch.randn(3, 1, 5, 5)
    >>> bool(torch.allclose(folded(x), net(x), atol=1e-6))
    True
    """
    pairs = find_foldable_pairs(model, example)
    if not pairs:
        return model, []
    folded = tensor_sharing_copy(model).eval()
    modules = dict(folded.named_modules())
    for layer_name, norm_name in pairs:
        layer, norm = modules[layer_name], modules[norm_name]
        # instance attributes shadow the class's forward: names and types stay the same
        layer.forward = functools.partial(_folded_forward, layer, norm)
        norm.forward = _pass_through
    if check and not _same_outputs(model, folded, example):
        return model, []
    return folded, pairs


def tensor_sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s modules that holds the very same parameter and buffer tensors,
    so that a module's ``forward`` can be replaced in the copy without touching ``model``."""
    shared = itertools.chain(model.parameters(), model.buffers())
    return copy.deepcopy(model, memo={id(t): t for t in shared})


def _same_outputs(model: nn.Module, folded: nn.Module, example: Tensor) -> bool:
    folded.eval()  # the analyses evaluate the copy in eval mode; the model is restored
    with eval_mode(model), torch.no_grad():
        expected, found = model(example), folded(example)
    if not (isinstance(expected, Tensor) and isinstance(found, Tensor)):
        return False
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    return bool(torch.allclose(found, expected, rtol=1e-4, atol=1e-4 * scale))


def _tracks_stats(norm: nn.modules.batchnorm._BatchNorm) -> bool:
    return norm.track_running_stats and norm.running_mean is not None


def batchnorm_affine(norm: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """``(s, t)`` of the eval-mode BatchNorm as the per-channel map z -> s * z + t, from
    its current weight, bias and running statistics."""
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def _folded_forward(layer: nn.Module, norm: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """``norm(layer(x))`` in eval mode as one layer with scaled weights and a new bias."""
    scale, shift = batchnorm_affine(norm)
    if layer.bias is not None:
        shift = shift + layer.bias * scale
    weight = layer.weight * scale.reshape(-1, *([1] * (layer.weight.dim() - 1)))
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, shift)
    return layer._conv_forward(x, weight, shift)


def _pass_through(x: Tensor) -> Tensor:
    return x
