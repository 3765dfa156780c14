"""The model zoo: factories by registry name.

Every factory has the signature ``factory(input_shape, num_classes, **options) ->
nn.Module``: ``input_shape`` is the per-example shape and ``num_classes`` the output
width, both taken from the data; options are checked (an unknown option or bad value
raises :class:`~sharpscope.errors.SharpscopeError` listing the valid ones). Weights are
drawn from torch's global generator, so ``torch.manual_seed`` makes a build
reproducible. Normalization layers are stock ``nn`` modules (see
:mod:`sharpscope.models.norm`).

========== ===================== =============================================
name       inputs                options (defaults)
========== ===================== =============================================
mlp        any (flattened)       width=256, depth=2, activation=relu, norm=none
cnn1d      (L,) or (C, L)        width=32, depth=3, norm=batch
cnn        (C, H, W)             width=8, depth=2, norm=batch
resnet     (C, H, W)             depth=20 (6n + 2), width=16, norm=batch, shortcut=B
resnet20   (C, H, W)             as resnet, depth 20
resnet32   (C, H, W)             as resnet, depth 32
resnet56   (C, H, W)             as resnet, depth 56
wrn        (C, H, W)             depth=16, width=4, dropout=0.0, norm=batch
vit        (C, H, W), (C, L), (L,)  patch=4, dim=64, depth=4, heads=4, mlp_ratio=2, dropout=0
========== ===================== =============================================

>>> import torch
>>> model_names()
['cnn', 'cnn1d', 'mlp', 'resnet', 'resnet20', 'resnet32', 'resnet56', 'vit', 'wrn']
>>> MODELS["cnn1d"]((40,), 10, norm="layer")(torch.zeros(3, 40)).shape
torch.Size([3, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from . import mlp as _mlp
from . import resnet as _resnet
from . import vit as _vit
from . import wrn as _wrn
from .cnn import CNN1D_OPTIONS, CNN_OPTIONS, cnn, cnn1d
from .mlp import mlp
from .norm import NORM_TYPES, Option, is_norm_layer, norm_layer, resolve_options
from .resnet import resnet, resnet20, resnet32, resnet56
from .vit import vit
from .wrn import wrn

ModelFactory = Callable[..., nn.Module]

MODELS: dict[str, ModelFactory] = {
    "mlp": mlp,
    "cnn1d": cnn1d,
    "cnn": cnn,
    "resnet": resnet,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "wrn": wrn,
    "vit": vit,
}


#: each registered model's options, with their defaults
MODEL_OPTIONS: dict[str, dict[str, Option]] = {
    "mlp": _mlp.OPTIONS,
    "cnn1d": CNN1D_OPTIONS,
    "cnn": CNN_OPTIONS,
    "resnet": _resnet.DEPTH_OPTIONS,
    "resnet20": _resnet.OPTIONS,
    "resnet32": _resnet.OPTIONS,
    "resnet56": _resnet.OPTIONS,
    "wrn": _wrn.OPTIONS,
    "vit": _vit.OPTIONS,
}


def resolved_model_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A registered model's spec with every option checked and its default filled in, as
    the model is built (``norm=None`` is ``"none"``); any other spec as it is.

    Raises:
        SharpscopeError: an unknown option or a bad value.

    >>> resolved_model_spec({"name": "cnn1d", "norm": None})
    {'name': 'cnn1d', 'width': 32, 'depth': 3, 'norm': 'none'}
    """
    name = spec.get("name")
    if name not in MODEL_OPTIONS or "factory" in spec:
        return dict(spec)
    options = {k: v for k, v in spec.items() if k != "name"}
    return {"name": name, **resolve_options(name, options, MODEL_OPTIONS[name])}


def model_names() -> list[str]:
    """Registered model names, sorted."""
    return sorted(MODELS)


def num_parameters(model: nn.Module) -> int:
    """Number of trainable scalars in ``model``.

    >>> num_parameters(nn.Linear(3, 2))
    8
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = [
    "MODELS",
    "MODEL_OPTIONS",
    "NORM_TYPES",
    "ModelFactory",
    "cnn",
    "cnn1d",
    "is_norm_layer",
    "mlp",
    "model_names",
    "norm_layer",
    "num_parameters",
    "resnet",
    "resnet20",
    "resnet32",
    "resnet56",
    "resolved_model_spec",
    "vit",
    "wrn",
]
