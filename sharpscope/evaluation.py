"""Evaluate a classifier on a data split: loss, accuracy, NLL and calibration.

Evaluation runs in eval mode (BatchNorm running statistics, no dropout), restores the
model's previous mode, and under ``torch.distributed`` each rank evaluates a
contiguous shard and the sums are all-reduced so every rank returns the same numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .determinism import lacks_deterministic_kernel
from .device_memory import is_out_of_memory
from .distributed import group_rank_and_size, is_multi_process, share
from .errors import SharpscopeError, model_failure
from .metrics import class_probabilities, predictive_metrics
from .modes import eval_mode

#: Examples :func:`check_model_on_data` runs the model on (plus the largest class).
CHECK_EXAMPLES = 8


def check_model_on_data(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[..., Tensor],
    num_classes: int | None = None,
) -> Tensor | None:
    """Run the model and the loss once on a few examples, in eval mode, without gradients
    (each module's mode restored), so that a model that does not fit the data fails in
    one line before training or an analysis starts: another input shape, or fewer
    outputs than classes (the example of the largest class is among those run). More
    outputs than the data's ``num_classes`` (when given) warn: they train, but the
    accuracy's argmax ranges over classes that never occur.

    Returns:
        The loss on those examples; None when they did not fit in memory (left to the
        caller, which reads smaller batches).

    Raises:
        SharpscopeError: the model or the loss raised.
    """
    rows = torch.arange(min(CHECK_EXAMPLES, len(targets)), device=targets.device)
    if len(targets) and not targets.is_floating_point() and targets.dim() == 1:
        rows = torch.cat([rows, targets.argmax().reshape(1)])
    try:
        with eval_mode(model), torch.no_grad():
            outputs = model(inputs[rows])
            loss = loss_fn(outputs, targets[rows])
    except SharpscopeError:
        raise
    except Exception as exc:  # the user's model or loss does not run on this data
        if is_out_of_memory(exc):
            return None
        if lacks_deterministic_kernel(exc):
            raise  # runs, but not deterministically: deterministic_algorithms names it
        raise model_failure(exc, inputs) from exc
    width = outputs.shape[-1] if isinstance(outputs, Tensor) and outputs.dim() == 2 else None
    if num_classes is not None and width is not None and width > num_classes > 1:
        warnings.warn(
            f"the model has {width} outputs but the data have {num_classes} classes: it "
            f"trains, but the accuracy's argmax also ranges over the {width - num_classes} "
            "outputs of classes that never occur; build it with as many outputs as classes",
            stacklevel=3,
        )
    return loss


@torch.no_grad()
def evaluate(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    *,
    batch_size: int = 1000,
    autocast_dtype: torch.dtype | None = None,
    probs_fn: Callable[[Tensor], Tensor] | None = None,
    distributed: bool = False,
) -> dict[str, float]:
    """Mean loss, accuracy, NLL and 15-bin ECE on ``(inputs, targets)``.

    Args:
        model: the classifier (C logits, or one binary logit); evaluated in eval mode.
        inputs, targets: the split (targets are class indices).
        loss_fn: the training loss, averaged with weights n_b/N over batches.
        batch_size: evaluation batch size.
        autocast_dtype: optional autocast dtype (bf16 on GPU).
        probs_fn: replaces the model's softmax (bSAM's Bayesian model average).
        distributed: each process of the initialised torch.distributed group evaluates
            its share of the examples, and all of them return the metrics of the whole
            split (every rank must call); False: this process evaluates all of them.

    Returns:
        ``{"loss", "acc", "nll", "ece"}`` as floats.
    """
    with eval_mode(model):
        part = share(len(targets), *group_rank_and_size(distributed))
        x_all, y_all = inputs[part], targets[part]
        loss_sum = torch.zeros((), dtype=torch.float64, device=inputs.device)
        probs_chunks = []
        for x, y in zip(x_all.split(batch_size), y_all.split(batch_size)):
            if not len(y):
                continue  # an empty shard (a rank beyond the examples) splits into one empty chunk
            with torch.autocast(
                x.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                logits = model(x)
            loss_sum += loss_fn(logits.float(), y).double() * len(y)
            probs_chunks.append(
                # float64: a float32 softmax underflows to 0 for a logit gap over ~104, and the
                # NLL would stop at the clamp instead of reaching the cross-entropy
                probs_fn(x) if probs_fn is not None else class_probabilities(logits.double())
            )
        probs = torch.cat(probs_chunks) if probs_chunks else inputs.new_zeros((0, 1))
    if distributed and is_multi_process():
        return _reduce_metrics(loss_sum, probs, y_all, len(targets))
    metrics = predictive_metrics(probs, y_all)
    metrics["loss"] = float(loss_sum / len(targets))
    return metrics


def _reduce_metrics(
    loss_sum: Tensor, probs: Tensor, targets: Tensor, total: int
) -> dict[str, float]:
    """All-gather the per-rank probabilities so that ECE is computed over all examples."""
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.long, device=probs.device) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(targets)], device=probs.device))
    width = probs.shape[1] if probs.dim() == 2 and len(probs) else 0
    widths = [torch.zeros(1, dtype=torch.long, device=probs.device) for _ in range(world)]
    dist.all_gather(widths, torch.tensor([width], device=probs.device))
    num_classes = int(max(w.item() for w in widths))
    longest = int(max(c.item() for c in counts))
    padded_p = probs.new_zeros((longest, num_classes))
    padded_y = targets.new_zeros((longest,))
    padded_p[: len(targets)] = probs
    padded_y[: len(targets)] = targets
    gathered_p = [torch.zeros_like(padded_p) for _ in range(world)]
    gathered_y = [torch.zeros_like(padded_y) for _ in range(world)]
    dist.all_gather(gathered_p, padded_p)
    dist.all_gather(gathered_y, padded_y)
    dist.all_reduce(loss_sum)
    all_p = torch.cat([p[: int(c.item())] for p, c in zip(gathered_p, counts)])
    all_y = torch.cat([y[: int(c.item())] for y, c in zip(gathered_y, counts)])
    metrics = predictive_metrics(all_p, all_y)
    metrics["loss"] = float(loss_sum / total)
    return metrics
