"""CIFAR ResNets (He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
CVPR 2016, Sec. 4.2): a 3x3 stem, three stages of n basic blocks with ``w``, ``2w`` and
``4w`` channels (the first block of stages 2 and 3 has stride 2), global average pooling
and a linear head; depth = 6n + 2.
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

OPTIONS = {
    "width": Option(16, int, low=1),
    "norm": Option("batch", str, NORM_CHOICES),
    "shortcut": Option("B", str, ("A", "B")),
}


def scale_residual_branches_(blocks: list[nn.Module], last_conv: str) -> None:
    """Multiply the last conv of every residual branch by ``num_blocks ** -0.5``.

    Used only without normalization: with He init each branch roughly preserves the
    variance of its input, so x + F(x) doubles it per block and an un-normalized
    ResNet-56 would start with activations ~2^13 times too large. Scaling each branch
    by 1/sqrt(L) bounds the growth by (1 + 1/L)^L < e (the depth scaling of Fixup,
    Zhang, Dauphin & Ma, ICLR 2019, without its zero init, so every weight gets a
    gradient at initialization).
    """
    scale = len(blocks) ** -0.5
    for block in blocks:
        getattr(block, last_conv).weight.data.mul_(scale)


class ShortcutA(nn.Module):
    """He et al.'s option A: subsample by the stride and zero-pad the new channels (no
    parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    """``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))``, 3x3 convs."""

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm: str, shortcut: str
    ) -> None:
        super().__init__()
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=bias)
        self.norm1 = norm_layer(norm, out_channels, spatial_dims=2)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=bias)
        self.norm2 = norm_layer(norm, out_channels, spatial_dims=2)
        if stride == 1 and in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ShortcutA(in_channels, out_channels, stride)
        else:  # option B: projection by a strided 1x1 conv
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=bias),
                norm_layer(norm, out_channels, spatial_dims=2),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n + 2 with stage widths ``width``, ``2*width``, ``4*width``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        depth: int,
        width: int,
        norm: str,
        shortcut: str,
    ) -> None:
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1, bias=norm == "none")
        self.norm = norm_layer(norm, width, spatial_dims=2)
        blocks: list[nn.Module] = []
        channels = width
        for stage in range(3):
            out = width * 2**stage
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(channels, out, stride, norm, shortcut))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = GlobalAvgPool()
        self.head = nn.Linear(channels, num_classes)
        kaiming_init_(self)
        if norm == "none":
            scale_residual_branches_(blocks, "conv2")

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.norm(self.conv(x)))
        return self.head(self.pool(self.blocks(x)))


#: the options of the registered ``resnet``, whose depth is an option
#: (6n + 2 with n >= 1 is checked by the factory, in a message that says so)
DEPTH_OPTIONS = {"depth": Option(20, int), **OPTIONS}


def resnet(
    input_shape: tuple[int, ...], num_classes: int, depth: int = 20, **options: Any
) -> ResNet:
    """A CIFAR ResNet of depth ``6n + 2`` (20, 32, 44, 56, 110, ...): the registry's
    ``resnet`` (``--model resnet --model-opt depth=44``).

    Args:
        input_shape: ``(C, H, W)``; any size (stride 2 twice, then global pooling).
        num_classes: output width.
        depth: 6n + 2 layers with weights (n basic blocks per stage), at least 8.
        **options: ``width`` (16: channels of the first stage; stages have width, 2·width,
            4·width, as in He et al.), ``norm`` ("batch" | "layer" | "group" | "none", see
            :mod:`sharpscope.models.norm`), ``shortcut`` ("A": parameter-free subsample and
            zero-pad, He et al.'s CIFAR choice; "B", the default: 1x1 conv + norm where the
            shape changes, identity elsewhere).

    Convs use He (fan_out) init, norms unit scale and zero shift, the head PyTorch's
    default. Convs carry a bias only with ``norm="none"``, in which case residual branches
    are scaled by ``(3n)^-1/2`` (see :func:`scale_residual_branches_`).

    Raises:
        SharpscopeError: bad depth, unknown option, bad value or bad shape.

    ResNet-20 on CIFAR-10 has 0.27M parameters (He et al., Table 6): 269,722 with
    option A, 272,474 with B; ResNet-110 1.7M.

    >>> sum(p.numel() for p in resnet((3, 32, 32), 10, 20, shortcut="A").parameters())
    269722
    >>> sum(p.numel() for p in resnet((3, 32, 32), 10, depth="110", shortcut="A").parameters())
    1727962
    """
    return _build("resnet", input_shape, num_classes, {"depth": depth, **options}, DEPTH_OPTIONS)


def _build(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    options: dict[str, Any],
    spec: dict[str, Option],
    depth: int | None = None,
) -> ResNet:
    shape = check_input_shape(name, input_shape, num_classes, (3,), "(C, H, W)")
    opts = resolve_options(name, options, spec)
    depth = opts.pop("depth", depth)
    assert depth is not None
    if depth < 8 or (depth - 2) % 6:
        raise SharpscopeError(
            f"model '{name}': ResNet depth must be 6n + 2 (20, 32, 44, 56, 110), got {depth!r}"
        )
    return ResNet(shape[0], num_classes, depth, **opts)


def _fixed_depth(
    name: str, depth: int, input_shape: tuple[int, ...], num_classes: int, options: dict[str, Any]
) -> ResNet:
    if "depth" in options:
        raise SharpscopeError(
            f"model '{name}' has its depth in its name; for another depth use --model resnet "
            f'--model-opt depth=N (TOML {{name = "resnet", depth = N}}), N = 6n + 2 '
            "(20, 32, 44, 56, 110, ...)"
        )
    return _build(name, input_shape, num_classes, options, OPTIONS, depth)


def resnet20(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> ResNet:
    """ResNet-20 (n = 3); options as :func:`resnet`."""
    return _fixed_depth("resnet20", 20, input_shape, num_classes, options)


def resnet32(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> ResNet:
    """ResNet-32 (n = 5); options as :func:`resnet`."""
    return _fixed_depth("resnet32", 32, input_shape, num_classes, options)


def resnet56(input_shape: tuple[int, ...], num_classes: int, **options: Any) -> ResNet:
    """ResNet-56 (n = 9); options as :func:`resnet`."""
    return _fixed_depth("resnet56", 56, input_shape, num_classes, options)
