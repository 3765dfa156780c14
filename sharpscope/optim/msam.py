"""m-sharpness training (SAM paper, Foret et al. 2021, arXiv:2010.01412, §4.1), vectorized.

With ``m=`` set, a SAM-family step splits the batch of B examples into groups of m and
perturbs each group with its *own* gradient::

    g_k  = grad L_{B_k}(w)                    for each group k (pass 1)
    e_k  = perturbation(w, g_k)               (SAM: rho g_k / ||g_k||)
    g~_k = grad L_{B_k}(w + e_k)              (pass 2)
    g~   = sum_k (|B_k| / B) g~_k             -> base step

This is what the SAM paper's multi-accelerator training does with m = per-device batch;
smaller m generalises better. Both passes are one ``torch.func.vmap`` over the groups of
``torch.func.grad`` of ``torch.func.functional_call`` (no Python loop over groups), so
the step costs about two passes whatever B/m is. When m does not divide B, the last
``B mod m`` examples form one smaller group, run by the same vmapped function, and the
groups are weighted by size.

BatchNorm under vmap (what sharpscope chose). Each group normalises with its own batch
statistics, as each accelerator does in the paper's setting. The running statistics are
passed to ``functional_call`` as per-group copies (``vmap`` in_dims 0), so every group
updates its own copy in place; afterwards the module's running mean/var become the
size-weighted mean of the groups' updated copies (for momentum BN that is
``(1 - momentum) r + momentum * mean_k(batch statistic_k)``, the cross-replica average of
the JAX reference) and ``num_batches_tracked`` advances by one. With
``bn_policy="first"`` only pass 1's copies are kept; with ``"both"`` pass 2 continues
from pass 1's copies and its result is kept. Other buffers are never written back.
Dropout: ``vmap(randomness="different")`` draws independent masks per group; with
``same_noise`` the RNG is restored so pass 2 reuses pass 1's masks.

Mixed precision. ``vmap`` has no working batching rule for normalization layers under
``torch.autocast`` (torch 2.x fails with "expected scalar type BFloat16 but found
Float"), so with ``autocast_dtype`` set and a normalization layer in the model the same
per-group functions run one group after another (identical maths, not vectorized). So
they do for a model ``vmap`` cannot follow (Python control flow on data, ``.item()``):
the first step finds out, and that optimizer loops from then on.

Parameters the loss does not use keep ``grad = None`` as in the plain step (the functional
gradients are zeros): they are found by one autograd pass on two examples, plus any
parameter that some group's gradient reaches (a branch those two did not take).

Supported by SAM, ASAM and SAM-ON (their perturbation is a pure function of the weights
and one gradient); the closure must be a :class:`~sharpscope.optim.closure.BatchClosure`
(a plain closure hides the batch). Under DDP each rank splits its own sub-batch and the
averaged ``g~`` is all-reduced. An fp16 ``GradScaler`` is not supported here (bf16
autocast is).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.func import functional_call, grad, grad_and_value, vmap

from ..distributed import is_multi_process
from ..errors import SharpscopeError, first_line
from ._base import (
    _module_stat_buffers,
    batchnorm_modules,
    frozen_bn,
    rng_restore,
    rng_snapshot,
)
from .closure import unwrap_model

if TYPE_CHECKING:
    from ._base import SharpnessAware, StepContext

__all__ = ["m_sharpness_step"]


def _vectorizable(module: torch.nn.Module, autocast_dtype: torch.dtype | None) -> bool:
    """vmap unless autocast meets a normalization layer (see the module docstring)."""
    if autocast_dtype is None:
        return True
    from .samon import NORM_LAYER_TYPES

    return not any(
        isinstance(m, NORM_LAYER_TYPES) for m in module.modules()
    ) and not batchnorm_modules(module)


def _index(tree: Any, k: int) -> Any:
    if isinstance(tree, Tensor):
        return tree[k]
    if isinstance(tree, dict):
        return {key: _index(v, k) for key, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_index(v, k) for v in tree)
    return tree


def _stack(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, Tensor):
        return torch.stack(items)
    if isinstance(first, dict):
        return {key: _stack([it[key] for it in items]) for key in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_stack([it[i] for it in items]) for i in range(len(first)))
    raise TypeError(f"cannot stack {type(first).__name__}")


def _map_groups(
    fn: Callable[..., Any], in_dims: tuple[int | None, ...], vectorize: bool
) -> Callable[..., Any]:
    """``vmap(fn, in_dims)``, or the same as a loop over the group dimension."""
    if vectorize:
        return vmap(fn, in_dims=in_dims, randomness="different")

    def looped(*args: Any) -> Any:
        sizes = (_leading(a) for a, d in zip(args, in_dims) if d is not None)
        groups = next(size for size in sizes if size is not None)
        return _stack(
            [
                fn(*[a if d is None else _index(a, k) for a, d in zip(args, in_dims)])
                for k in range(groups)
            ]
        )

    return looped


def _leading(tree: Any) -> int | None:
    """Size of the group dimension of ``tree``'s tensors; None for an empty tree (a model
    without buffers)."""
    if isinstance(tree, Tensor):
        return tree.shape[0]
    leaves = tree.values() if isinstance(tree, dict) else tree
    return next((size for size in map(_leading, leaves) if size is not None), None)


def _expand(buffers: dict[str, Tensor], groups: int) -> dict[str, Tensor]:
    return {k: v.unsqueeze(0).expand(groups, *v.shape).clone() for k, v in buffers.items()}


def _used_mask(
    opt: SharpnessAware, module: torch.nn.Module, params: list[Tensor], batch: Any, ctx: StepContext
) -> list[bool]:
    """Which ``params`` the loss depends on (cached per model and parameter list).

    One autograd pass on two examples, BN statistics and the RNG left untouched.
    """
    key = (id(module), tuple(id(p) for p in params))
    cached = getattr(opt, "_msam_used", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    state = rng_snapshot(ctx.device)
    try:
        with frozen_bn(module), torch.enable_grad(), batch.autocast():
            loss = batch.loss_fn(module(batch.inputs[:2]), batch.targets[:2])
            grads = torch.autograd.grad(loss, params, allow_unused=True)
    finally:
        rng_restore(state, ctx.device)
    mask = [g is not None for g in grads]
    opt._msam_used = (key, mask)
    return mask


def check_groups_for_batchnorm(module: torch.nn.Module, m: int, size: int) -> None:
    """Refuse m-sharpness groups of one example beside BatchNorm in train mode: a batch of
    ``size`` is cut into groups of ``min(m, size)`` and a remainder, and BatchNorm cannot
    normalize a single example. The trainer calls this before it writes any file."""
    group = min(m, size)
    remainder = size % group
    if 1 in (group, remainder) and any(bn.training for bn in batchnorm_modules(module)):
        raise SharpscopeError(
            f"m-sharpness with m={m} splits a batch of {size} into groups that leave one "
            "example alone, and BatchNorm in train mode cannot normalize a single example; "
            "choose m >= 2 (and m, or the batch size, so that the last group has at least 2)"
        )


def m_sharpness_step(opt: SharpnessAware, ctx: StepContext) -> Tensor:
    """One m-sharpness step of ``opt`` (see the module docstring); returns the batch loss.

    Raises:
        SharpscopeError: with a plain closure or an fp16 GradScaler.
    """
    batch = ctx.batch
    if batch is None:
        raise SharpscopeError(
            f"m-sharpness training (m={opt.m}) needs a sharpscope.optim.BatchClosure so the "
            "batch can be split into groups; a plain closure hides the batch"
        )
    if ctx.scaler is not None:
        raise SharpscopeError(
            "m-sharpness training does not support an fp16 GradScaler; use bf16 autocast "
            "(autocast_dtype=torch.bfloat16) or full precision"
        )
    assert opt.m is not None
    module = unwrap_model(batch.model)
    inputs, targets = batch.inputs, batch.targets
    size = batch.batch_size
    check_groups_for_batchnorm(module, opt.m, size)
    group = min(opt.m, size)
    num_full, remainder = divmod(size, group)

    opt_ids = {id(p) for p in opt._all_params()}
    named = list(module.named_parameters())
    train = [(n, p) for n, p in named if id(p) in opt_ids and p.requires_grad]
    if not train:
        raise SharpscopeError(
            "the optimizer's parameters are not parameters of the closure's model"
        )
    train_names = [n for n, _ in train]
    train_params = [p for _, p in train]
    constants = {n: p.detach() for n, p in named if id(p) not in opt_ids or not p.requires_grad}
    buffers = dict(module.named_buffers())
    bn_buffers = _module_stat_buffers(batchnorm_modules(module))
    bn_ids = {id(b) for b in bn_buffers}
    bn_names = [n for n, b in buffers.items() if id(b) in bn_ids]
    loss_fn = batch.loss_fn
    vectorize = _vectorizable(module, batch.autocast_dtype)

    def group_loss(params: dict[str, Tensor], bufs: dict[str, Tensor], x: Tensor, y: Tensor):
        with batch.autocast():
            out = functional_call(module, ({**params, **constants}, bufs), (x,))
            return loss_fn(out, y)

    def perturb(grads: list[Tensor]) -> list[Tensor]:
        eps = opt.perturbation(train_params, grads)
        return [torch.zeros_like(g) if e is None else e for g, e in zip(grads, eps)]

    chunks = []  # (groups, X, Y, weight of each group)
    if num_full:
        cut = num_full * group
        chunks.append(
            (
                num_full,
                inputs[:cut].reshape(num_full, group, *inputs.shape[1:]),
                targets[:cut].reshape(num_full, group, *targets.shape[1:]),
                group / size,
            )
        )
    if remainder:
        chunks.append(
            (
                1,
                inputs[-remainder:].unsqueeze(0),
                targets[-remainder:].unsqueeze(0),
                remainder / size,
            )
        )

    base = {n: p.detach() for n, p in train}

    def both_passes(vectorize: bool) -> tuple[list, list]:
        """Pass 1 (gradients, losses, BN statistics per group) and pass 2 at each group's
        w + eps; nothing outside is changed until both are done."""
        rng = rng_snapshot(ctx.device) if opt.same_noise else None
        pass1 = []
        with torch.enable_grad():
            for groups, x, y, _ in chunks:
                bufs = _expand(buffers, groups)
                g, loss = _map_groups(grad_and_value(group_loss), (None, 0, 0, 0), vectorize)(
                    base, bufs, x, y
                )
                pass1.append((g, loss, bufs))
        with torch.no_grad():
            perturbed = []
            for g, _, _ in pass1:
                eps = _map_groups(perturb, (0,), vectorize)([g[n] for n in train_names])
                perturbed.append({n: base[n].unsqueeze(0) + e for n, e in zip(train_names, eps)})
        if rng is not None:
            rng_restore(rng, ctx.device)
        pass2 = []
        with torch.enable_grad():
            for (groups, x, y, _), params2, (_, _, bufs1) in zip(chunks, perturbed, pass1):
                bufs = bufs1 if opt.bn_policy == "both" else _expand(buffers, groups)
                g2 = _map_groups(grad(group_loss), (0, 0, 0, 0), vectorize)(params2, bufs, x, y)
                pass2.append((g2, bufs))
        return pass1, pass2

    # vmap over the groups unless this optimizer met a model that vmap cannot follow
    # (data-dependent control flow, .item()): then the same maths one group after another,
    # from the same random state, on this step and every later one. _msam_vmap: None
    # untried, True works, False cannot.
    tried = getattr(opt, "_msam_vmap", None)
    vectorize = vectorize and tried is not False
    start = rng_snapshot(ctx.device) if vectorize and tried is None else None
    try:
        pass1, pass2 = both_passes(vectorize)
    except RuntimeError as exc:
        if start is None or "vmap" not in str(exc):
            raise
        opt._msam_vmap = False
        warnings.warn(
            f"m-sharpness training: torch.func.vmap cannot follow this model "
            f"({first_line(exc)}); its groups of m examples run one after another from now "
            "on (the same steps, more slowly)",
            RuntimeWarning,
            stacklevel=3,
        )
        rng_restore(start, ctx.device)
        pass1, pass2 = both_passes(False)
    else:
        if vectorize:
            opt._msam_vmap = True
    opt.gradient_passes += 2

    with torch.no_grad():
        weights = [c[3] for c in chunks]
        mean_grads = [
            sum(w * g2[n].sum(0) for (g2, _), w in zip(pass2, weights)) for n in train_names
        ]
        loss = sum(w * lo.sum(0) for (_, lo, _), w in zip(pass1, weights))
        kept = [b for _, b in pass2] if opt.bn_policy == "both" else [b for _, _, b in pass1]
        for name in bn_names:
            target = buffers[name]
            if target.is_floating_point():
                value = sum(w * b[name].sum(0) for b, w in zip(kept, weights))
            else:
                value = kept[0][name][0]
            target.copy_(value)
        if ctx.ddp is not None and is_multi_process():
            flat = torch.cat([g.reshape(-1) for g in mean_grads])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            mean_grads = [
                t.view_as(g)
                for t, g in zip(flat.split([g.numel() for g in mean_grads]), mean_grads)
            ]
        used = _used_mask(opt, module, train_params, batch, ctx)
        # the probe saw two examples of one batch: a data-dependent branch it missed still
        # counts as used wherever some group gave it a gradient
        unsure = [i for i, u in enumerate(used) if not u]
        if unsure:
            moved = torch.stack([mean_grads[i].ne(0).any() for i in unsure]).tolist()
            used = list(used)
            for i, m in zip(unsure, moved):
                used[i] = m
        for p, g, u in zip(train_params, mean_grads, used):
            # torch.func gives unused parameters a zero gradient; leave their .grad None
            # as the plain two-pass step does, so the base step (weight decay, momentum)
            # skips them (optimizers.md section 0)
            p.grad = g.to(p.dtype) if u else None
    opt._finish(ctx)
    return loss.detach() if isinstance(loss, Tensor) else torch.as_tensor(loss)
