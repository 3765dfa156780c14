"""Standard CIFAR augmentation on tensors, vectorised over the batch.

Random crop with 4-pixel zero padding and a horizontal flip with probability 1/2
(He et al. 2016; the SAM paper's "basic" augmentation), drawn from a generator so
that a seeded run is reproducible and resumable.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Randomly crop (after zero padding) and horizontally flip a batch (B, C, H, W).

    >>> x = torch.arange(16.0).view(1, 1, 4, 4)
    >>> y = random_crop_flip(x, torch.Generator().manual_seed(0), padding=0)
    >>> torch.equal(y, x) or torch.equal(y, x.flip(-1))
    True
    """
    batch, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    # Offsets and flips are drawn on the CPU generator, then moved: same draws on any device.
    top = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
    left = torch.randint(0, 2 * padding + 1, (batch,), generator=generator).to(images.device)
    flip = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
    rows = top[:, None] + torch.arange(height, device=images.device)[None, :]
    cols = left[:, None] + torch.arange(width, device=images.device)[None, :]
    cols = torch.where(flip[:, None], cols.flip(-1), cols)
    index = torch.arange(batch, device=images.device)[:, None, None]
    cropped = padded.permute(0, 2, 3, 1)[index, rows[:, :, None], cols[:, None, :]]
    return cropped.permute(0, 3, 1, 2).contiguous()
