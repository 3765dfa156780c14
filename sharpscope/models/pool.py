"""Global average pooling as a mean over the spatial axes.

``nn.AdaptiveAvgPool1d/2d(1)`` computes the same numbers, but its CUDA backward has no
deterministic implementation, so ``torch.use_deterministic_algorithms(True)`` (``train
--deterministic``) refuses it; a mean's backward is a broadcast, deterministic everywhere.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["GlobalAvgPool"]


class GlobalAvgPool(nn.Module):
    """``(N, C, *spatial) -> (N, C)``: the mean over every axis after the channels.

    >>> import torch
    >>> x = torch.arange(12.0).reshape(1, 2, 2, 3)
    >>> GlobalAvgPool()(x)
    tensor([[2.5000, 8.5000]])
    >>> bool(torch.allclose(GlobalAvgPool()(x), nn.AdaptiveAvgPool2d(1)(x).flatten(1)))
    True
    """

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=tuple(range(2, x.dim())))
