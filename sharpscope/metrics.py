"""Predictive metrics: accuracy, negative log-likelihood and calibration error.

ECE (Guo et al., 2017, arXiv:1706.04599): split predictions into ``num_bins`` equal
confidence bins; ECE = Σ_b (n_b/N)·|acc_b − conf_b|. The optimizers issue asks for
15 bins (the bSAM reference evaluation uses 20).
"""

from __future__ import annotations

import torch
from torch import Tensor


def is_binary_logit(outputs: Tensor) -> bool:
    """Whether ``outputs`` hold one value per example (``(N,)`` or ``(N, 1)``): a binary
    classifier's logit, class 1 where it is > 0."""
    return outputs.dim() == 1 or outputs.shape[-1] == 1


def class_probabilities(logits: Tensor) -> Tensor:
    """``(N, C)`` class probabilities: the softmax of the logits, or, for a single output
    per example (a binary logit z), ``(1 − σ(z), σ(z))``.

    >>> class_probabilities(torch.tensor([[0.0]])).tolist()
    [[0.5, 0.5]]
    """
    if is_binary_logit(logits):
        p = torch.sigmoid(logits.reshape(len(logits)))
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


def expected_calibration_error(probs: Tensor, targets: Tensor, num_bins: int = 15) -> float:
    """Expected calibration error of class probabilities ``probs`` (N, C).

    >>> p = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    >>> round(expected_calibration_error(p, torch.tensor([0, 1])), 6)
    0.4
    """
    # on the CPU: CUDA's weighted bincount adds with atomics (neither reproducible nor
    # allowed under torch.use_deterministic_algorithms), and N x C numbers move in no time
    confidence, predicted = probs.detach().cpu().max(dim=1)
    correct = (predicted == targets.detach().cpu()).to(torch.float64)
    confidence = confidence.to(torch.float64)
    # bins (lo, hi]; confidence 0 falls in the first bin
    index = torch.clamp(torch.ceil(confidence * num_bins).long() - 1, 0, num_bins - 1)
    sum_conf = torch.bincount(index, weights=confidence, minlength=num_bins)
    sum_acc = torch.bincount(index, weights=correct, minlength=num_bins)
    return float((sum_acc - sum_conf).abs().sum() / len(targets))


def predictive_metrics(probs: Tensor, targets: Tensor, num_bins: int = 15) -> dict[str, float]:
    """Accuracy, mean NLL and ECE of predicted probabilities ``probs`` (N, C).

    >>> m = predictive_metrics(torch.tensor([[0.5, 0.5], [0.2, 0.8]]), torch.tensor([0, 1]))
    >>> round(m["nll"], 6), m["acc"]
    (0.458145, 1.0)
    """
    probs = probs.detach().to(torch.float64)
    targets = targets.detach()
    # the smallest normal double: NLL is capped near 708 nats, not at the 27.6 of a 1e-12 clamp
    picked = (
        probs.gather(1, targets.view(-1, 1)).squeeze(1).clamp_min(torch.finfo(torch.float64).tiny)
    )
    return {
        "acc": float((probs.argmax(1) == targets).to(torch.float64).mean()),
        "nll": float(-picked.log().mean()),
        "ece": expected_calibration_error(probs, targets, num_bins),
    }
