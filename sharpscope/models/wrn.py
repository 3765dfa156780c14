"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k: a 3x3 stem with 16 channels, three stages of n = (d - 4) / 6 pre-activation
blocks with 16k, 32k and 64k channels (stride 2 at the start of stages 2 and 3), a final
norm + ReLU, global average pooling and a linear head. Layout and init follow the
authors' reference code and its common PyTorch port (xternalz/WideResNet-pytorch).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import SharpscopeError
from .norm import (
    NORM_CHOICES,
    Option,
    check_input_shape,
    kaiming_init_,
    norm_layer,
    resolve_options,
)
from .pool import GlobalAvgPool
from .resnet import scale_residual_branches_

OPTIONS = {
    "depth": Option(16, int, low=10),
    "width": Option(4, int, low=1),
    "dropout": Option(0.0, float, low=0.0, high=1.0, high_open=True),
    "norm": Option("batch", str, NORM_CHOICES),
}


class WideBlock(nn.Module):
    """Pre-activation block: ``conv(drop(relu(norm(conv(relu(norm(x))))))) + shortcut``.

    Where the shape changes the shortcut is a strided 1x1 conv applied to the
    pre-activated input ``relu(norm(x))``, as in the reference code.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, dropout: float, norm: str
    ) -> None:
        super().__init__()
        bias = norm == "none"
        self.norm1 = norm_layer(norm, in_channels, spatial_dims=2)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=bias)
        self.norm2 = norm_layer(norm, out_channels, spatial_dims=2)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=bias)
        self.projection = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        activated = F.relu(self.norm1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.norm2(out))))
        shortcut = x if self.projection is None else self.projection(activated)
        return out + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``width``; see the module docstring."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int,
        width: int,
        dropout: float,
        norm: str,
    ) -> None:
        super().__init__()
        n = (depth - 4) // 6
        bias = norm == "none"
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=bias)
        blocks: list[nn.Module] = []
        channels = 16
        for stage in range(3):
            out = 16 * width * 2**stage
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(WideBlock(channels, out, stride, dropout, norm))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm_layer(norm, channels, spatial_dims=2)
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(channels, num_classes)
        kaiming_init_(self)
        nn.init.zeros_(self.head.bias)  # as the reference code
        if norm == "none":
            scale_residual_branches_(blocks, "conv2")

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.conv(x))
        return self.head(self.pool(F.relu(self.norm(x))))


def wrn(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> WideResNet:
    """Wide ResNet WRN-depth-width (Zagoruyko & Komodakis, 2016).

    Args:
        input_shape: ``(C, H, W)``; any size (global pooling at the end).
        num_classes: output width.
        **options: ``depth`` (16; must be 6n + 4: 10, 16, 22, 28, 40, ...), ``width``
            (widen factor k, 4), ``dropout`` (0.0; between the two convs of each block,
            the paper uses 0.3 in places), ``norm`` ("batch" | "layer" | "group" |
            "none"). The defaults give WRN-16-4; WRN-28-10 is ``depth=28, width=10``.

    Convs use He (fan_out) init and have a bias only with ``norm="none"`` (then residual
    branches are scaled by ``(3n)^-1/2``, see
    :func:`sharpscope.models.resnet.scale_residual_branches_`).

    Raises:
        SharpscopeError: bad depth, unknown option, bad value or bad shape.

    WRN-16-4 on CIFAR-10 has 2.7M parameters (paper, Table 4):

    >>> sum(p.numel() for p in wrn((3, 32, 32), 10).parameters())
    2748890
    """
    shape = check_input_shape("wrn", input_shape, num_classes, (3,), "(C, H, W)")
    opts = resolve_options("wrn", options, OPTIONS)
    if (opts["depth"] - 4) % 6:
        raise SharpscopeError(
            f"model 'wrn': depth must be 6n + 4 (10, 16, 22, 28, 40, ...), got {opts['depth']}"
        )
    return WideResNet(shape[0], num_classes, **opts)
