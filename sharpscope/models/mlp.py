"""Fully connected network on flattened inputs."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn

from .norm import Option, check_input_shape, norm_layer, resolve_options

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}

OPTIONS = {
    "width": Option(256, int, low=1),
    "depth": Option(2, int, low=0),
    "activation": Option("relu", str, tuple(ACTIVATIONS)),
    "norm": Option("none", str, ("none", "batch", "layer")),
}


class MLP(nn.Module):
    """``depth`` hidden layers ``Linear -> norm -> activation``, then a linear head.

    The input is flattened, so any per-example shape works. ``depth=0`` is
    multinomial logistic regression. Linear layers use PyTorch's default init,
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases.
    """

    def __init__(
        self, in_features: int, num_classes: int, width: int, depth: int, activation: str, norm: str
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth):
            layers += [
                nn.Linear(features, width),
                norm_layer(norm, width, spatial_dims=0),
                ACTIVATIONS[activation](),
            ]
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.net = nn.Sequential(*[m for m in layers if not isinstance(m, nn.Identity)])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mlp(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> MLP:
    """Multilayer perceptron: flatten, ``depth`` hidden layers of ``width`` units, linear head.

    Args:
        input_shape: per-example input shape (any rank); it is flattened.
        num_classes: output width.
        **options: ``width`` (256), ``depth`` (2 hidden layers; 0 gives a linear model),
            ``activation`` ("relu" | "tanh" | "gelu"), ``norm`` ("none" | "batch" | "layer",
            i.e. none, ``BatchNorm1d`` or ``LayerNorm`` after each hidden linear layer).

    Raises:
        SharpscopeError: unknown option, bad value or bad shape.

    On MNIST-1D with the defaults: 40·256+256 + 256·256+256 + 256·10+10 parameters.

    >>> sum(p.numel() for p in mlp((40,), 10).parameters()) == 40*256+256 + 256*256+256 + 2570
    True
    """
    shape = check_input_shape("mlp", input_shape, num_classes, range(1, 8), "(any shape)")
    opts = resolve_options("mlp", options, OPTIONS)
    return MLP(math.prod(shape), num_classes, **opts)
