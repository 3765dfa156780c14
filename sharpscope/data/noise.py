"""Symmetric label noise (e.g. Zhang et al. 2017; SAM paper Section 3.3).

Exactly ``round(fraction·N)`` of the N labels given, chosen by a seeded permutation, get
a label drawn uniformly from the *other* C − 1 classes, so the realised noise rate over
those N equals the requested one (up to rounding) instead of fraction·(C − 1)/C.

:func:`sharpscope.data.load_data` flips the labels of the full training split, before a
``val_fraction`` hold-out and a ``samples`` subset are taken from it (so that a subset's
noisy labels are those of the full split): the rate is exact on the full split only, and a
subset's varies around it (``samples=512``, ``label_noise=0.4`` on MNIST-1D: 38.1%).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import SharpscopeError

NOISE_STREAM = 7_919  # offsets the noise seed from the other seeded draws of the data


def symmetric_label_noise(
    targets: Tensor, fraction: float, num_classes: int, seed: int = 0
) -> Tensor:
    """A copy of ``targets`` with ``fraction`` of the labels flipped to another class.

    >>> y = torch.zeros(10, dtype=torch.long)
    >>> noisy = symmetric_label_noise(y, 0.3, num_classes=4, seed=0)
    >>> int((noisy != y).sum())
    3

    Raises:
        SharpscopeError: the targets are not class indices of shape (N,), or there are
            fewer than 2 classes to flip between.
    """
    if targets.is_floating_point() or targets.is_complex() or targets.dim() != 1:
        raise SharpscopeError(
            "label noise needs class labels (integer targets of shape (N,)); the data give "
            f"{str(targets.dtype).replace('torch.', '')} targets of shape {tuple(targets.shape)}"
            + ("" if targets.dim() == 1 else " (one class index per example, not one-hot)")
        )
    if num_classes < 2:
        raise SharpscopeError(
            f"label noise needs at least 2 classes to flip between; the data hold {num_classes} "
            f"(all labels {int(targets[0]) if len(targets) else 0})"
        )
    # A stream of its own: seeded with ``seed`` alone, the choice of flipped examples was
    # the permutation ``samples`` takes its subset from (same seed 0), so the first N
    # examples were nearly all flipped ones.
    generator = torch.Generator().manual_seed((int(seed) * 1_000_003 + NOISE_STREAM) % 2**63)
    n = len(targets)
    num_noisy = round(fraction * n)
    chosen = torch.randperm(n, generator=generator)[:num_noisy]
    shift = torch.randint(1, num_classes, (num_noisy,), generator=generator)
    noisy = targets.clone()
    noisy[chosen] = (targets[chosen] + shift) % num_classes
    return noisy
