"""Small convolutional networks: ``cnn1d`` for sequences (MNIST-1D), ``cnn`` for images."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .norm import Option, check_input_shape, kaiming_init_, norm_layer, resolve_options
from .pool import GlobalAvgPool

CONV_NORMS = ("batch", "layer", "none")
CNN1D_OPTIONS = {
    "width": Option(32, int, low=1),
    "depth": Option(3, int, low=1),
    "norm": Option("batch", str, CONV_NORMS),
}
CNN_OPTIONS = {
    "width": Option(8, int, low=1),
    "depth": Option(2, int, low=1),
    "norm": Option("batch", str, CONV_NORMS),
}


class CNN1d(nn.Module):
    """``depth`` blocks ``Conv1d(k=5, stride=2) -> norm -> ReLU``, global average pool, linear head.

    Every block has ``width`` channels and halves the length, so the parameter count
    does not depend on the input length.
    """

    def __init__(
        self, in_channels: int, num_classes: int, width: int, depth: int, norm: str, unsqueeze: bool
    ) -> None:
        super().__init__()
        self.unsqueeze = unsqueeze  # (N, L) inputs get a channel axis
        layers: list[nn.Module] = []
        channels = in_channels
        for _ in range(depth):
            layers += [
                nn.Conv1d(channels, width, 5, stride=2, padding=2, bias=norm == "none"),
                norm_layer(norm, width, spatial_dims=1),
                nn.ReLU(),
            ]
            channels = width
        layers = [m for m in layers if not isinstance(m, nn.Identity)]
        self.features = nn.Sequential(*layers)
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(width, num_classes)
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.unsqueeze:
            x = x.unsqueeze(1)
        return self.head(self.pool(self.features(x)))


def cnn1d(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> CNN1d:
    """1-D CNN for sequences such as MNIST-1D (Greydanus, 2020).

    Args:
        input_shape: ``(L,)`` (treated as one channel, ``(1, L)``) or ``(C, L)``.
        num_classes: output width.
        **options: ``width`` (32 channels per block), ``depth`` (3 blocks), ``norm``
            ("batch" | "layer" | "none"; default "batch"). "layer" is
            ``nn.GroupNorm(1, width)``: layer normalization over (channels, length) with a
            per-channel affine, found by type as a ``GroupNorm``.

    Each block is ``Conv1d(k=5, stride=2, padding=2) -> norm -> ReLU`` (convs have no bias
    when a norm follows); then global average pooling and ``Linear(width, num_classes)``.
    Convolutions use He (fan_out) init.

    Raises:
        SharpscopeError: unknown option, bad value or bad shape.

    Defaults on MNIST-1D: 5·32 + 2·(32·32·5) conv weights, 3·64 BatchNorm, 32·10 + 10 head.

    >>> sum(p.numel() for p in cnn1d((40,), 10).parameters())
    10922
    """
    shape = check_input_shape("cnn1d", input_shape, num_classes, (1, 2), "(L,) or (C, L)")
    opts = resolve_options("cnn1d", options, CNN1D_OPTIONS)
    in_channels = 1 if len(shape) == 1 else shape[0]
    return CNN1d(in_channels, num_classes, unsqueeze=len(shape) == 1, **opts)


class CNN(nn.Module):
    """Blocks ``Conv2d(3x3) -> norm -> ReLU`` with ``width * 2**i`` channels and a 2x2 max-pool
    between blocks, global average pool, and a two-layer head ``Linear(C, 4C) -> ReLU ->
    Linear(4C, num_classes)``.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        width: int,
        depth: int,
        norm: str,
    ) -> None:
        super().__init__()
        channels, height, wide = input_shape
        layers: list[nn.Module] = []
        for i in range(depth):
            out = width * 2**i
            if i > 0 and min(height, wide) >= 2:  # pooling stops once the map is one pixel
                layers.append(nn.MaxPool2d(2))
                height, wide = height // 2, wide // 2
            layers += [
                nn.Conv2d(channels, out, 3, padding=1, bias=norm == "none"),
                norm_layer(norm, out, spatial_dims=2),
                nn.ReLU(),
            ]
            channels = out
        layers = [m for m in layers if not isinstance(m, nn.Identity)]
        self.features = nn.Sequential(*layers)
        self.pool = GlobalAvgPool()
        self.head = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.ReLU(), nn.Linear(4 * channels, num_classes)
        )
        kaiming_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)))


def cnn(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> CNN:
    """Small 2-D CNN for images (digits ``(1, 8, 8)``, CIFAR ``(3, 32, 32)``).

    This is the spectrum benchmark model: a BatchNorm CNN with about 3,000 parameters
    on scikit-learn digits.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: output width.
        **options: ``width`` (8 channels in the first block, doubling per block), ``depth``
            (2 blocks), ``norm`` ("batch" | "layer" | "none"; default "batch"; "layer" is
            ``nn.GroupNorm(1, C)``).

    Raises:
        SharpscopeError: unknown option, bad value or bad shape.

    Defaults on digits, 3,010 parameters: convs 1·8·9 + 8·16·9, BatchNorm 2·(8+16),
    head (16·64 + 64) + (64·10 + 10).

    >>> sum(p.numel() for p in cnn((1, 8, 8), 10).parameters())
    3010
    """
    shape = check_input_shape("cnn", input_shape, num_classes, (3,), "(C, H, W)")
    opts = resolve_options("cnn", options, CNN_OPTIONS)
    return CNN(shape, num_classes, **opts)
