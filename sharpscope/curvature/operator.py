r"""The Hessian of a model's mean loss over a data set, as a matrix-free operator.

analysis.md §0-1. The objective is :math:`L(\theta) = \frac1N\sum_i \ell(f_\theta(x_i), y_i)`
over the analysis set (N examples) and the trainable parameters θ ∈ R^P, and

.. math:: Hv = \nabla_\theta(\nabla_\theta L \cdot v) = \sum_b \frac{n_b}{N} H_b v,

with :math:`H_b` the Hessian of batch b's mean loss, accumulated in float64. The model
runs in ``eval()`` mode (BatchNorm on running statistics, dropout off), so H does not
depend on the batching; the model's own modes are restored after every call and no
buffer is ever updated.

Two ways of computing one product, both through ``torch.func.functional_call`` on
detached parameters (the model's ``.grad`` is never touched):

* ``"forward"``: forward-over-reverse, a JVP of the gradient function
  (``torch.func.jvp(torch.func.grad(f))``); several vectors at once through ``vmap``.
  This is Pearlmutter's R-operator, :math:`R_v\{\nabla_\theta L\} = Hv` (B. A.
  Pearlmutter, 1994, "Fast exact multiplication by the Hessian", Neural Computation
  6(1), 147-160).
* ``"reverse"``: reverse-over-reverse, the gradient with its graph kept, then a second
  backward against v (plain autograd, so it works where forward mode does not);
  several vectors through ``is_grads_batched``. With a single (local) batch the
  gradient graph is built once and reused by every product.

``hvp_mode="auto"`` times both once, briefly, on the first batch and keeps the faster;
the choice and the timings are in :meth:`HessianOperator.describe`. An explicitly
chosen mode gets one trial product there instead, so that a missing derivative is a
one-line error naming the mode. Auto mode's choice is
remembered per model type, parameter and input shapes, dtype, device and loss, in the
process and in a small file of the user's cache folder (:mod:`.mode_cache`), so later
analyses of the same configuration, in this process or a later one, do not time again. The pre-flight check's second gradient pass keeps its
graph, so with a single batch the reverse-mode products cost no extra graph build.

In eval mode every BatchNorm that directly follows a convolution or linear layer is folded
into it inside the differentiated function (:mod:`.fold`): the same L(θ) of the same
parameters, so the same Hessian, but the products no longer differentiate twice through
BatchNorm on activation-sized tensors (1.3-2x cheaper on the benchmark's BatchNorm
CNN). The pre-flight check runs the original model in its first pass and the folded one
in its second, so a fold that changed the function is caught and undone (the two must
agree to rounding: the loss to 1e-4 and the gradient norm-wise to 1e-2 relative in
float32, 1e-10 and 1e-8 in float64; a wrong fold differs at order one). Either way two
passes of the same model must agree as analysis.md §0 asks.

Multi-process: when ``torch.distributed`` is initialised (or ``WORLD_SIZE`` > 1 under
torchrun, in which case gloo/NCCL is initialised here), every rank reads the same data,
keeps a contiguous shard of the batches, and the weighted sums of products, gradients
and losses are all-reduced: every rank gets the single-process answer.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import itertools
import json
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from ..data.batches import as_batches, fixed_batches, num_examples
from ..device_memory import (
    CPU_MEMORY_SHARE,
    HVP_MEMORY_FACTOR,
    FittingRows,
    available_memory_bytes,
    free_memory_note,
    is_out_of_memory,
    saved_bytes_per_example,
)
from ..distributed import group_rank_and_size, peers_checked, share
from ..errors import SharpscopeError, check_autograd, check_initialized, model_failure
from ..modes import batchnorm_without_running_stats, eval_mode
from ..precision import HALF_DTYPES, float_dtype, floating_tensors, least_precise, rounding
from ..registry import LOSS_CHECK_EXAMPLES, check_loss_on_outputs, loss_name
from ..registry import get_loss as resolve_loss
from . import mode_cache
from .fold import fold_batchnorm
from .mode_cache import device_name
from .twice import twice_differentiable

F64 = torch.float64
HVPMode = Literal["auto", "forward", "reverse"]
BNMode = Literal["eval", "batch"]
_T = TypeVar("_T")
HVP_MODES = ("auto", "forward", "reverse")
BN_MODES = ("eval", "batch")

# Pre-flight agreement of two passes (analysis.md §0).
PREFLIGHT_RTOL = 5e-5
PREFLIGHT_ATOL = 1e-6
# Folded vs original model: the folded model computes the same function in another order,
# so its loss and gradient differ by rounding, which the curvature amplifies in the
# gradient (norm-wise up to 1.3e-4 on barely trained float32 ResNet-20s; 5e-15 in
# float64), while a fold that changed the function differs at order one (12% in the
# loss, 190% in the gradient on the test's example). (loss, gradient) relative
# tolerances, norm-wise, per dtype:
FOLD_RTOL = {torch.float64: (1e-10, 1e-8)}
FOLD_RTOL_DEFAULT = (1e-4, 1e-2)

LossSpec = str | Callable[[Tensor, Tensor], Tensor]


def resolve_dtype(dtype: Any) -> torch.dtype | None:
    """``None``, a torch dtype, or "float32"/"float64"/"fp32"/"fp64"."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "float64": torch.float64,
        "fp64": torch.float64,
        "double": torch.float64,
    }
    if str(dtype) not in names:
        raise SharpscopeError(f"unknown dtype '{dtype}'; use float32 or float64")
    return names[str(dtype)]


def check_not_half(dtype: torch.dtype) -> None:
    """Refuse a half-precision evaluation dtype for Hessian-vector products.

    float16/bfloat16 products are rounded at their machine epsilon (1e-3 / 8e-3), far
    above what Lanczos's symmetry check and its Ritz residuals resolve, so the refusal
    would blame the model; a float copy (``dtype="float32"``) is the remedy.

    >>> check_not_half(torch.float32)
    >>> check_not_half(torch.bfloat16)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: Hessian-vector products in bfloat16 are rounded at \
8e-3, too coarse for Lanczos: pass dtype='float32' (or 'float64') to analyse a float copy \
of the model
    """
    if dtype in HALF_DTYPES:
        eps = rounding(dtype)
        raise SharpscopeError(
            f"Hessian-vector products in {str(dtype).removeprefix('torch.')} are rounded at "
            f"{eps}, too coarse for Lanczos: pass dtype='float32' (or 'float64') to analyse "
            "a float copy of the model"
        )


def resolve_device(device: Any, local_rank: int = 0) -> torch.device:
    """``"auto"``: CUDA (this process's GPU) when present, else CPU; else as given."""
    from ..distributed import pick_device

    return pick_device(device, local_rank)


def _model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype of the first floating tensor and device of the first tensor (parameters,
    then buffers): defined for any model (one without trainable parameters is refused
    later, in one line), in the order of ``analysis._functional.model_dtype_device``."""
    check_initialized(model)
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = first.device if first is not None else torch.device("cpu")
    return float_dtype(model) or torch.get_default_dtype(), device


def ensure_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment when WORLD_SIZE > 1 and
    no group exists yet (NCCL on CUDA, gloo on the CPU). Returns (rank, world size).

    Raises:
        SharpscopeError: there is no group, and torchrun's environment names none.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available():
        if not dist.is_initialized():
            from ..distributed import init_from_env

            init_from_env(device)
    return group_rank_and_size(True)


def effective_bn_mode(model: nn.Module, bn_mode: BNMode) -> BNMode:
    """``bn_mode``, but "batch" where "eval" meets a BatchNorm without running statistics.

    Such a layer (``track_running_stats=False``) normalizes with the statistics of each
    batch even in eval mode, so the model's Hessian depends on the batch partition: it is
    what ``bn_mode="batch"`` computes, and records.
    """
    name = batchnorm_without_running_stats(model) if bn_mode == "eval" else None
    if name is None:
        return bn_mode
    warnings.warn(
        f"BatchNorm '{name}' keeps no running statistics (track_running_stats="
        "False), so even in eval mode it uses each batch's: analysing in "
        "bn_mode='batch' (the Hessian depends on the batch partition; recorded)",
        RuntimeWarning,
        stacklevel=3,
    )
    return "batch"


@functools.cache
def _load_jvp_decompositions() -> None:
    """Import torch's forward-mode decompositions, which ``jvp`` loads on first use, with
    the warning their import raises silenced: that module calls ``torch.jit.script``, which
    torch 2.14 deprecates with a FutureWarning (a hidden DeprecationWarning in 2.13) that
    every ``sharpscope spectrum`` would print though it is torch's own, not the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated")
        import torch._decomp.decompositions_for_jvp  # noqa: F401


class HessianOperator:
    r"""Matrix-free Hessian of the mean loss of ``model`` over ``data``.

    Args:
        model: the network; it is left as found (modes restored, buffers untouched;
            copied when a dtype, device or BatchNorm mode change is needed).
        data: a pair of tensors, a Dataset, or an iterable of ``(inputs, targets)``
            batches (fixed order, nothing dropped). Moved to the device once.
        loss: "cross_entropy" (default), "mse", a factory path, or a callable
            ``loss(outputs, targets) -> mean``, a function of those two alone: one that
            reads the model's parameters (an L2 regulariser) is refused, since it would
            be held fixed (``weight_decay`` adds (wd/2)·||θ||²).
        batch_size: split tensors/datasets into batches of this size (None: one batch,
            or one per rank when distributed).
        device: "auto" (CUDA when present), a device, or None for the model's device.
        dtype: None (the model's), or float64 for the validation mode (a float64 copy).
            A float16/bfloat16 model needs float32 or float64 here (half precision is
            refused: its products are rounded far above what Lanczos resolves). A given
            dtype casts every floating parameter and buffer (a copy). With None a model
            of mixed dtypes (a float64 head on a float32 body) runs as it is: its
            products are rounded at its least precise dtype (:attr:`products_dtype`),
            which sets Lanczos's symmetry tolerance, and floating data are read in the
            dtype of its first floating tensor.
        hvp_mode: "auto" (time both once, keep the faster), "forward" or "reverse"
            (tried once on the first batch: a model or loss lacking that derivative is
            refused in one line here, not inside a Krylov method).
        bn_mode: "eval" (default: running statistics) or "batch" (opt-in: batch
            statistics, so H depends on the batch partition, which is recorded). A
            model with a BatchNorm that keeps no running statistics is analysed in
            "batch" mode (with a warning): that is what it computes in eval mode.
        weight_decay: adds (wd/2)·||θ||² to L (every eigenvalue shifts by wd).
        param_filter: regular expression on parameter names selecting θ (default: all
            trainable parameters).
        check: run the pre-flight check (two passes over the data must agree; finite
            loss and gradient) and check that the data itself reads the same twice.
        reuse_graph: with a single local batch, build the gradient graph once and
            reuse it for every reverse-mode product (costs its memory).
        fold_bn: in eval mode, fold each BatchNorm into the convolution or linear layer
            before it inside the differentiated function (:mod:`.fold`): the same L(θ)
            and Hessian, cheaper products. Needs ``check`` (the pre-flight check
            compares the folded model with the original and keeps the original when
            they differ).
        max_block_size: the most vectors per vmapped block product (default 16 on CUDA,
            1 on the CPU, where vmapped blocks measured no faster per vector). A block
            that runs out of device memory is redone in blocks half as large, down to
            single products, which then halve the batches (eval mode).
        distributed: True shards the data over the processes of a torchrun job (every
            rank must build the operator and take part in each product; the process
            group is initialised from torchrun's environment if it is not yet). False
            (default): this process alone, even inside an initialised group.
        memory_budget: bytes the products may use on the CPU (default: half of the free
            memory, shared by the processes of a ``torchrun`` on this machine). With
            ``batch_size=None`` in eval mode, one batch estimated to need more
            (:data:`~sharpscope.device_memory.HVP_MEMORY_FACTOR` times what its forward
            pass saves) is read in equal smaller batches, with a warning: the same L, ∇L
            and Hv, without the kernel ending the process for want of memory.
        progress: called with the number of products after each (block) product, e.g.
            a progress bar's ``update``; the analyses themselves print nothing.

    Attributes:
        dim: P, the number of parameters in θ.
        num_examples: N over all ranks.
        hvp_count: products so far, in full passes over the data.
        grad_count: gradient passes so far.
        param_names, param_shapes: the layout of θ (``model.parameters()`` order).
        dtype: the analysis dtype (the requested one, else the model's first floating
            tensor's), in which floating data are read.
        products_dtype: the least precise floating dtype of ``dtype`` and the module's
            tensors: the rounding of the products.
        mixed_dtypes: the module's floating dtypes when it has several (recorded as
            ``mixed_dtypes`` in :meth:`describe`), else empty.
        max_block_size: vectors per vmapped block product (smaller after a block that
            did not fit in device memory).
        batches_halved: how often the local batches were halved because a single
            product or gradient pass did not fit (eval mode only; same L, ∇L and Hv).

    An operator is a snapshot of the weights it was built at: its pre-flight numbers,
    HVP mode and (reverse mode) gradient graph belong to them, and without a copy it reads
    the model's own parameters. Changed in place afterwards (an optimizer step,
    ``load_state_dict``; seen by their version counters), the operator refuses every
    further product, loss or gradient in one line; build a new one for the new weights.

    Raises:
        SharpscopeError: no trainable parameters, empty data, a model or loss that fails
            on the data, a loss that reads the model's parameters (a regulariser: use
            ``weight_decay``), non-finite loss/gradient, two passes that disagree, a
            float16/bfloat16 evaluation dtype (the model's or ``dtype``), or (later) a
            product after the parameters changed.
    """

    def __init__(
        self,
        model: nn.Module,
        data: Any,
        loss: LossSpec = "cross_entropy",
        *,
        batch_size: int | None = None,
        device: Any = None,
        dtype: Any = None,
        hvp_mode: HVPMode = "auto",
        bn_mode: BNMode = "eval",
        weight_decay: float = 0.0,
        param_filter: str | None = None,
        check: bool = True,
        reuse_graph: bool = True,
        fold_bn: bool = True,
        max_block_size: int | None = None,
        distributed: bool = False,
        memory_budget: int | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise SharpscopeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_autograd("Hessian-vector products")
        if hvp_mode not in HVP_MODES:
            raise SharpscopeError(
                f"unknown hvp_mode '{hvp_mode}'; choose one of {', '.join(HVP_MODES)}"
            )
        if bn_mode not in BN_MODES:
            raise SharpscopeError(
                f"unknown bn_mode '{bn_mode}'; choose one of {', '.join(BN_MODES)}"
            )
        bn_mode = effective_bn_mode(model, bn_mode)
        model_dtype, model_device = _model_dtype_device(model)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = model_device if device is None else resolve_device(device, local_rank)
        requested = resolve_dtype(dtype)
        self.dtype = model_dtype if requested is None else requested
        check_not_half(self.dtype)
        self.loss_fn = resolve_loss(loss)
        self.loss_name = loss_name(loss)
        # the loss as the disk cache of HVP modes names it (a callable has no stable name)
        self._loss_text = (
            loss
            if isinstance(loss, str)
            else json.dumps(loss, sort_keys=True, default=str)
            if isinstance(loss, Mapping)
            else None
        )
        self.bn_mode = bn_mode
        self.weight_decay = float(weight_decay)

        if distributed:
            self.rank, self.world_size = ensure_distributed(self.device)
        else:
            self.rank, self.world_size = 0, 1

        # The module actually run: the model itself, or a copy when something must change
        # (a requested dtype casts every floating tensor: a float64 head on a float32 body
        # whose first parameter is float64 is copied too).
        floating = {t.dtype for t in floating_tensors(model)}
        recast = requested is not None and any(d != requested for d in floating)
        needs_copy = self.device != model_device or recast or bn_mode == "batch"
        module = copy.deepcopy(model) if needs_copy else model
        if needs_copy:
            module = module.to(device=self.device, dtype=self.dtype)
        if bn_mode == "batch":
            torch.func.replace_all_batch_norm_modules_(module)  # stats never updated
        self.module = module
        #: the least precise floating dtype among the data's and the module's tensors: the
        #: rounding of the products (Lanczos's symmetry tolerance, the copy-search window)
        module_dtypes = {t.dtype for t in floating_tensors(module)}
        self.products_dtype = least_precise(self.dtype, *module_dtypes)
        check_not_half(self.products_dtype)  # a bfloat16 head on a float32 body too
        #: the module's floating dtypes when they are several (recorded), else empty
        self.mixed_dtypes = (
            sorted(str(d).removeprefix("torch.") for d in module_dtypes)
            if len(module_dtypes) > 1
            else []
        )
        # vmapped blocks pay off on accelerators; on the CPU they measured slower per vector
        # than one product at a time (bench spectrum) and multiply the memory.
        default_block = 16 if self.device.type == "cuda" else 1
        self._blocks = FittingRows(
            "Hessian-vector products", max(1, int(max_block_size or default_block))
        )

        selected: dict[str, Tensor] = {}
        consts: dict[str, Tensor] = {}
        if param_filter is not None and not isinstance(param_filter, str):
            raise SharpscopeError(
                "param_filter is a regular expression on parameter names (e.g. "
                f"'^fc\\.' or 'layer3'), got {type(param_filter).__name__}"
            )
        pattern = re.compile(param_filter) if param_filter else None
        frozen = 0
        for name, p in module.named_parameters():
            if p.requires_grad and (pattern is None or pattern.search(name)):
                selected[name] = p.detach()
            else:
                consts[name] = p.detach()
                frozen += 1
        for name, b in module.named_buffers():
            consts[name] = b
        if not selected:
            why = f" matching '{param_filter}'" if param_filter else ""
            raise SharpscopeError(
                f"the model has no trainable parameters{why} (all requires_grad=False?): "
                "there is no Hessian to analyse"
            )
        self._params = selected
        self._consts = consts
        # the parameters (trainable or not) whose in-place change would change H
        self._watched = [*selected.values(), *list(consts.values())[:frozen]]
        self._versions = None  # recorded once the operator is built
        self.param_names = list(selected)
        self.param_shapes = [tuple(p.shape) for p in selected.values()]
        self._numels = [p.numel() for p in selected.values()]
        self._dtypes = [p.dtype for p in selected.values()]
        self.dim = sum(self._numels)

        self._unfolded = module
        self.bn_folded: list[str] = []
        self.bn_fold_rejected = False
        all_batches = self._read_data(data, batch_size, check)
        self.num_examples = num_examples(all_batches)
        self.num_batches = len(all_batches)
        self.batch_sizes = [len(b[1]) for b in all_batches]
        mine = share(len(all_batches), self.rank, self.world_size)
        cast = True  # floating data follow the analysis dtype (as in landscape, m_sharpness)
        self._use_batches(
            [(self._to_device(x, cast), self._to_device(y, cast)) for x, y in all_batches[mine]]
        )
        if fold_bn and check and bn_mode == "eval" and self._batches:
            self.module, pairs = fold_batchnorm(module, self._batches[0][0][:2])
            self.bn_folded = [norm for _, norm in pairs]
        self.batches_split_for_memory = 0
        if batch_size is None and self.device.type == "cpu" and bn_mode == "eval":
            self._split_for_memory(memory_budget)

        self.hvp_count = 0.0
        self.progress = progress  # called with the number of products after each call
        self.grad_count = 0.0
        self._graph: tuple[list[Tensor], list[Tensor], list[int]] | None = None
        self._reuse_graph_allowed = bool(reuse_graph)
        self._reuse_graph = self._reuse_graph_allowed and len(self._batches) == 1
        self.batches_halved = 0
        self.grad_seconds = math.nan
        self.preflight: dict[str, float] = {}
        self.mode_timings: dict[str, float] = {}
        self.mode_errors: dict[str, str] = {}
        self.hvp_mode_requested = hvp_mode
        self.hvp_mode_cached = False
        self._check_loss(model)  # before the pre-flight passes: a few examples' forward
        remembered = hvp_mode == "auto" and self.world_size == 1  # ranks must agree
        cached = self._remembered_mode() if remembered else None
        if check:
            self._preflight(
                keep_graph=(cached[0][0] if cached else hvp_mode) in ("auto", "reverse")
            )
        if remembered and (self.bn_fold_rejected or self.batches_halved):
            cached = self._remembered_mode()  # the key named the model and batch changed
        if cached is not None and (not cached[1] or self._trial_passes(cached[0][0])):
            (self.hvp_mode, self.mode_timings, self.mode_errors), _ = cached
            self.hvp_mode_cached = True
        elif hvp_mode == "auto":
            self.hvp_mode = self._choose_mode()
            if remembered:  # keyed by the batches it was timed on (halved, maybe)
                self._remember_mode()
        else:  # one untimed trial product: a missing derivative fails here, in one line
            self.hvp_mode = self._choose_mode((hvp_mode,))
        if self.hvp_mode != "reverse":
            self._graph = None
        # a snapshot: the parameters' version counters, checked before every pass
        self._versions: list[int] | None = [t._version for t in self._watched]

    def _check_loss(self, model: nn.Module) -> None:
        """Refuse a loss that reads the model's parameters in θ (:meth:`_forward_loss`
        calls it outside ``functional_call``, so such a term would be constant in H), and
        warn about one that sums over the examples
        (:func:`~sharpscope.registry.check_loss_on_outputs`)."""
        if not self._batches:
            return
        x, y = self._batches[0]
        try:
            with self._analysis_mode(), torch.no_grad():
                out = functional_call(
                    self.module, (self._params, self._consts), (x[:LOSS_CHECK_EXAMPLES],)
                )
        except Exception:  # noqa: BLE001 - the pre-flight check names the failure
            return
        named = dict(model.named_parameters())  # the user's tensors, which the loss reads
        theta = [named[name] for name in self.param_names if name in named]
        check_loss_on_outputs(self.loss_fn, out, y[:LOSS_CHECK_EXAMPLES], theta, "the Hessian")

    # ------------------------------------------------------------------ data
    def _read_data(self, data: Any, batch_size: int | None, check: bool) -> list:
        batches = fixed_batches(data, batch_size, None) if check else as_batches(data, batch_size)
        if self.world_size > 1 and batch_size is None and len(batches) == 1:
            x, y = batches[0]
            size = math.ceil(len(y) / self.world_size)
            batches = list(zip(x.split(size), y.split(size)))
        for x, y in batches:
            if len(x) != len(y):
                raise SharpscopeError(
                    f"a batch has {len(x)} inputs but {len(y)} targets; they must match"
                )
        return batches

    def _to_device(self, t: Tensor, cast: bool) -> Tensor:
        if cast and t.is_floating_point():
            return t.to(device=self.device, dtype=self.dtype)
        return t.to(self.device)

    # ------------------------------------------------------------- plumbing
    @contextmanager
    def _analysis_mode(self) -> Iterator[None]:
        """eval() (BatchNorm in train mode for bn_mode="batch"), restored afterwards."""
        with eval_mode(self.module, batchnorm_train=self.bn_mode == "batch"):
            yield

    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """A flat vector (..., P) as a dict of parameter-shaped tensors (model dtype)."""
        lead = v.shape[:-1]
        return {
            name: part.reshape(*lead, *shape).to(dt)
            for name, part, shape, dt in zip(
                self.param_names, v.split(self._numels, dim=-1), self.param_shapes, self._dtypes
            )
        }

    def flatten(self, tensors: Sequence[Tensor | None], lead: tuple[int, ...] = ()) -> Tensor:
        """Parameter-shaped tensors (None = zero) as one flat float64 vector (..., P)."""
        parts = []
        for t, numel in zip(tensors, self._numels):
            if t is None:
                parts.append(torch.zeros(*lead, numel, dtype=F64, device=self.device))
            else:
                parts.append(t.reshape(*lead, numel).to(F64))
        return torch.cat(parts, dim=-1)

    def parameters_vector(self) -> Tensor:
        """θ as a flat float64 vector."""
        return self.flatten(list(self._params.values()))

    def _forward_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        # fused attention and hardsigmoid have no double backward: the same functions in
        # plain operations (twice.py)
        with twice_differentiable():
            out = functional_call(self.module, (params, self._consts), (x,))
        return self.loss_fn(out, y)

    def _all_reduce(self, t: Tensor) -> Tensor:
        if self.world_size > 1:
            with peers_checked():
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    # ------------------------------------------------------ loss / gradient
    def loss_and_gradient(self, keep_graph: bool = False) -> tuple[float, Tensor]:
        """L(θ) and ∇L(θ) (float64) with one gradient pass over the data.

        With ``keep_graph`` and a single local batch, the gradient is computed with its
        graph, which is then kept for the reverse-mode products (saving one pass).
        """
        return self._fitting(lambda: self._loss_and_gradient(keep_graph))

    def _loss_and_gradient(self, keep_graph: bool) -> tuple[float, Tensor]:
        total = torch.zeros(self.dim + 1, dtype=F64, device=self.device)
        keep = keep_graph and self._reuse_graph
        with self._analysis_mode(), torch.enable_grad():
            for (x, y), w in zip(self._batches, self._weights):
                if keep:
                    value, leaves, grads = self._gradient_graph(x, y)
                    self._graph = _live_graph(leaves, grads)
                else:
                    params = {n: p.detach().requires_grad_() for n, p in self._params.items()}
                    value = self._forward_loss(params, x, y)
                    grads = torch.autograd.grad(value, list(params.values()), allow_unused=True)
                total[0] += w * value.detach().to(F64)
                total[1:] += w * self.flatten([None if g is None else g.detach() for g in grads])
        self._all_reduce(total)
        loss, gradient = float(total[0]), total[1:]
        if self.weight_decay:
            theta = self.parameters_vector()
            loss += 0.5 * self.weight_decay * float(theta @ theta)
            gradient = gradient + self.weight_decay * theta
        self.grad_count += 1
        return loss, gradient

    def finite_difference_hvp(self, v: Tensor, eps: float | None = None) -> Tensor:
        r"""Hv by central differences :math:`[\nabla L(\theta+\epsilon v) - \nabla L(\theta-\epsilon v)]/(2\epsilon)`.

        For tests only (analysis.md §1): ε ≈ 1e-5 in float64, 1e-3 in float32 by
        default. Two gradient passes; not counted as HVPs.
        """
        self._check_unchanged()
        if eps is None:
            eps = 1e-5 if self.products_dtype == F64 else 1e-3
        step = self.unflatten(v.to(self.device, F64) * eps)
        plus = {n: p + step[n] for n, p in self._params.items()}
        minus = {n: p - step[n] for n, p in self._params.items()}
        diff = self._gradient_at(plus) - self._gradient_at(minus)
        if self.weight_decay:
            diff = diff + 2 * eps * self.weight_decay * v.to(self.device, F64)
        return diff / (2 * eps)

    def _gradient_at(self, params: dict[str, Tensor]) -> Tensor:
        total = torch.zeros(self.dim, dtype=F64, device=self.device)
        with self._analysis_mode(), torch.enable_grad():
            for (x, y), w in zip(self._batches, self._weights):
                leaves = {n: p.detach().requires_grad_() for n, p in params.items()}
                value = self._forward_loss(leaves, x, y)
                grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
                total += w * self.flatten(grads)
        return self._all_reduce(total)

    def loss(self) -> float:
        """L(θ) with one forward pass (float64 accumulation)."""
        return self._fitting(self._loss)

    def _loss(self) -> float:
        total = torch.zeros(1, dtype=F64, device=self.device)
        with self._analysis_mode(), torch.no_grad():
            for (x, y), w in zip(self._batches, self._weights):
                total += w * self._forward_loss(self._params, x, y).to(F64)
        self._all_reduce(total)
        value = float(total)
        if self.weight_decay:
            theta = self.parameters_vector()
            value += 0.5 * self.weight_decay * float(theta @ theta)
        return value

    @contextmanager
    def _unfolded_module(self) -> Iterator[None]:
        """Run the original (BatchNorm not folded) module inside the block."""
        folded, self.module = self.module, self._unfolded
        try:
            yield
        finally:
            self.module = folded

    def _preflight(self, keep_graph: bool = False) -> None:
        """Two passes over D must agree (rtol 5e-5, atol 1e-6) and be finite.

        The second pass may keep its gradient graph for the reverse-mode products. With
        BatchNorm folded, the first pass runs the original model and the second the
        folded one. When they differ entry by entry, a third pass tells why: if they
        agree to rounding (:func:`_fold_agrees`) the folded model runs again and must
        reproduce its own pass exactly; otherwise the original runs again, and if it
        reproduces its pass the fold was wrong (the original is kept), else the model or
        data is random.
        """
        try:
            start = time.perf_counter()
            with self._unfolded_module():
                loss1, grad1 = self.loss_and_gradient()
            self.grad_seconds = time.perf_counter() - start
            loss2, grad2 = self.loss_and_gradient(keep_graph=keep_graph)
            if self.bn_folded and not _passes_agree(loss1, grad1, loss2, grad2):
                if _fold_agrees(loss1, grad1, loss2, grad2, self.products_dtype):
                    loss1, grad1 = loss2, grad2  # rounding: the folded model, once more
                else:
                    self.module, self.bn_folded, self.bn_fold_rejected = self._unfolded, [], True
                loss2, grad2 = self.loss_and_gradient(keep_graph=keep_graph)
        except SharpscopeError:
            raise
        except Exception as exc:  # the user's model or loss does not run on this data
            if is_out_of_memory(exc):
                raise  # no fault of the model's: _fitting reads smaller batches
            raise model_failure(exc) from exc
        if not math.isfinite(loss1):
            raise SharpscopeError(
                f"the loss at these weights is not finite ({loss1}); the checkpoint or data "
                "holds non-finite values or the model diverged"
            )
        if not bool(torch.isfinite(grad1).all()):
            raise SharpscopeError(
                "the gradient at these weights is not finite; the checkpoint or data holds "
                "non-finite values or the model diverged"
            )
        if not _passes_agree(loss1, grad1, loss2, grad2):
            diff = float(torch.linalg.vector_norm(grad1 - grad2) / torch.linalg.vector_norm(grad1))
            raise SharpscopeError(
                f"two passes over the data gave different losses ({loss1:.8g} vs {loss2:.8g}, "
                f"gradient rel. diff {diff:.2g}): the model or data is random (dropout on, "
                "BatchNorm in train mode with shuffling, random augmentation, drop_last); "
                "use eval mode and fixed data"
            )
        self.preflight = {
            "loss": loss1,
            "grad_norm": float(torch.linalg.vector_norm(grad1)),
            "grad_seconds": self.grad_seconds,
        }

    # ------------------------------------------------------------- products
    @property
    def max_block_size(self) -> int:
        """The most vectors per vmapped block product (halved when a block did not fit)."""
        return int(self._blocks.most or 1)

    def hvp(self, v: Tensor) -> Tensor:
        """Hv (float64, on the device) for a flat vector v of length P; one full pass."""
        _check_tensor(v, f"a vector of length {self.dim}")
        if v.shape != (self.dim,):
            raise SharpscopeError(f"expected a vector of length {self.dim}, got {tuple(v.shape)}")
        return self._products(v.reshape(1, -1), single=True)[0]

    def hvp_block(self, V: Tensor) -> Tensor:
        """H applied to every row of V ``(s, P)`` (float64); vmapped; s full passes."""
        _check_tensor(V, f"an (s, {self.dim}) block")
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise SharpscopeError(f"expected a (s, {self.dim}) block, got {tuple(V.shape)}")
        return self._products(V, single=False)

    __matmul__ = hvp

    def _products(self, V: Tensor, single: bool) -> Tensor:
        return self._fitting(lambda: self._products_once(V, single))

    def _products_once(self, V: Tensor, single: bool) -> Tensor:
        s = V.shape[0]
        V = V.to(self.device)
        out = torch.zeros(s, self.dim, dtype=F64, device=self.device)
        with self._analysis_mode():
            for index, ((x, y), w) in enumerate(zip(self._batches, self._weights)):
                blocks = functools.partial(self._block_products, index, x, y, V, single, {})
                for rows, product in self._blocks.run(blocks, 0, s):
                    out[rows] += w * product
        self._all_reduce(out)
        if self.weight_decay:
            out += self.weight_decay * V.to(F64)
        self.hvp_count += s
        if self.progress is not None:
            self.progress(s)
        return out

    def _block_products(
        self,
        index: int,
        x: Tensor,
        y: Tensor,
        V: Tensor,
        single: bool,
        shared: dict[str, Any],
        rows: slice,
    ) -> Tensor:
        """H_b V[rows] for batch ``index``; ``shared`` holds the gradient graph that the
        blocks of one reverse-mode call share (rebuilt after a block that failed)."""
        graph = None
        s = V.shape[0]
        if self.hvp_mode == "reverse" and not self._reuse_graph and s > 1:
            if "graph" not in shared:
                shared["graph"] = _live_graph(*self._gradient_graph(x, y)[1:])
            graph = shared["graph"]
        block = V[rows]
        try:
            return self._batch_products(
                self.hvp_mode,
                index,
                x,
                y,
                block,
                single or len(block) == 1,
                graph=graph,
                keep=rows.stop < s,
            )
        except RuntimeError:
            shared.pop("graph", None)  # a failed backward may have freed it
            raise

    # ------------------------------------------------------- device memory
    def _check_unchanged(self) -> None:
        """Refuse to go on when the model's parameters were changed in place since the
        operator was built (their version counters moved: an optimizer step,
        ``load_state_dict``). The operator reads the parameters themselves, not a copy,
        and holds state of the weights it was built at (the pre-flight numbers, the
        mode choice, reverse mode's gradient graph): reverse mode failed with autograd's
        raw in-place error, forward mode silently followed the new weights."""
        if self._versions is None:
            return
        if any(t._version != v for t, v in zip(self._watched, self._versions)):
            raise SharpscopeError(
                "the model's parameters changed since this HessianOperator was built (an "
                "optimizer step or load_state_dict, say): an operator is a snapshot of the "
                "weights it was built at; build a new HessianOperator for the new weights"
            )

    def _fitting(self, compute: Callable[[], _T]) -> _T:
        """``compute()``; when it runs out of device memory, halve the batches and rerun.

        In eval mode the batches are only a way to read D: L, ∇L and Hv are the same
        for any partition (weights n_b/N), so a batch that does not fit is split in two
        (down to one example); in batch-statistics mode the partition is part of the
        function and running out of memory is final. Refused when the parameters changed
        since the operator was built (:meth:`_check_unchanged`).
        """
        self._check_unchanged()
        while True:
            try:
                return compute()
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
                message = str(exc).splitlines()[0] if str(exc) else "out of memory"
            # here the failed attempt's tensors are free (the exception is gone)
            if not self._halve_batches():
                raise torch.OutOfMemoryError(message)

    def _use_batches(self, batches: list) -> None:
        """Read the local data as ``batches`` from now on, each weighted n_b/N."""
        self._batches = batches
        self._weights = [len(y) / self.num_examples for _, y in batches]

    def _split_for_memory(self, budget: int | None) -> None:
        """Split a single local CPU batch whose products would not fit in ``budget`` bytes.

        The estimate is :data:`HVP_MEMORY_FACTOR` times the bytes one forward pass saves
        for the backward, per example (:func:`saved_bytes_per_example`); a model that
        fails on the data is left to the pre-flight check, which names the cause.
        """
        if len(self._batches) != 1 or len(self._batches[0][1]) < 8:
            return
        planned = "given as memory_budget"
        if budget is None:
            free = available_memory_bytes()
            if free is None:
                return
            sharing = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
            budget = int(CPU_MEMORY_SHARE * free / sharing)
            planned = f"half of the {free / 1e9:.3g} GB free{free_memory_note(free, 'GB')}" + (
                f", shared by {sharing} processes" if sharing > 1 else ""
            )
        x, y = self._batches[0]
        params = {n: p.detach().requires_grad_() for n, p in self._params.items()}
        try:
            with self._analysis_mode():
                per_example = saved_bytes_per_example(
                    lambda xs, ys: self._forward_loss(params, xs, ys), x, y
                )
        except Exception:  # noqa: BLE001 - the pre-flight check reports it
            return
        need = HVP_MEMORY_FACTOR * per_example * len(y)
        if need <= budget:
            return
        size = max(1, int(budget // (HVP_MEMORY_FACTOR * per_example)))
        parts = -(-len(y) // size)
        self._use_batches(list(zip(x.tensor_split(parts), y.tensor_split(parts))))
        self.batches_split_for_memory = parts
        warnings.warn(
            f"the {len(y)} examples as one batch would need about {need / 1e9:.3g} GB for "
            f"Hessian-vector products, more than the {budget / 1e9:.3g} GB planned ({planned}); "
            f"reading them in {parts} batches of at most "
            f"{max(len(t) for _, t in self._batches)} (same results; --batch-size sets it)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _halve_batches(self) -> bool:
        """Split every local batch in two; False when that cannot help or is not allowed."""
        if self.bn_mode == "batch" or all(len(y) <= 1 for _, y in self._batches):
            return False
        largest = max(len(y) for _, y in self._batches)
        batches = []
        for x, y in self._batches:
            if len(y) > 1:
                batches += list(zip(x.tensor_split(2), y.tensor_split(2)))
            else:
                batches.append((x, y))
        self._use_batches(batches)
        self._graph = None
        self._reuse_graph = self._reuse_graph_allowed and len(batches) == 1
        self.batches_halved += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        warnings.warn(
            f"a batch of {largest} examples does not fit in device memory; reading the data "
            f"in batches of at most {-(-largest // 2)} (same results; --batch-size sets it)",
            RuntimeWarning,
            stacklevel=2,
        )
        return True

    def _batch_products(
        self,
        mode: str,
        index: int,
        x: Tensor,
        y: Tensor,
        V: Tensor,
        single: bool,
        graph: tuple | None = None,
        keep: bool = False,
    ) -> Tensor:
        """H_b V for one batch: ``(s, P)`` float64.

        ``graph``/``keep``: a gradient graph shared by several blocks (reverse mode) and
        whether to keep it after this block.
        """
        if mode == "forward":
            return self._forward_products(x, y, V, single)
        return self._reverse_products(x, y, V, single, graph, keep)

    def _forward_products(self, x: Tensor, y: Tensor, V: Tensor, single: bool) -> Tensor:
        _load_jvp_decompositions()
        params = self._params
        grad_fn = grad(self._forward_loss)

        def hvp_one(v: dict[str, Tensor]) -> dict[str, Tensor]:
            return jvp(lambda p: grad_fn(p, x, y), (params,), (v,))[1]

        tangents = self.unflatten(V)
        if single:
            out = hvp_one({n: t[0] for n, t in tangents.items()})
            return self.flatten([out[n] for n in self.param_names]).unsqueeze(0)
        out = vmap(hvp_one)(tangents)
        return self.flatten([out[n] for n in self.param_names], lead=(V.shape[0],))

    def _gradient_graph(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor], Sequence]:
        """Loss, leaves and gradients with their graph (for reverse-mode products)."""
        with torch.enable_grad():
            leaves = [p.detach().requires_grad_() for p in self._params.values()]
            value = self._forward_loss(dict(zip(self.param_names, leaves)), x, y)
            grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
        return value, leaves, grads

    def _reverse_products(
        self,
        x: Tensor,
        y: Tensor,
        V: Tensor,
        single: bool,
        graph: tuple | None = None,
        keep: bool = False,
    ) -> Tensor:
        if self._reuse_graph:
            if self._graph is None:
                self._graph = _live_graph(*self._gradient_graph(x, y)[1:])
            leaves, grads, live = self._graph
            keep = True
        elif graph is not None:
            leaves, grads, live = graph
        else:
            leaves, grads, live = _live_graph(*self._gradient_graph(x, y)[1:])
            keep = False
        s = V.shape[0]
        if not live:  # the loss is linear in θ
            return torch.zeros(s, self.dim, dtype=F64, device=self.device)
        tangents = list(self.unflatten(V).values())
        tangents = [tangents[i] for i in live]
        with torch.enable_grad():
            if single:
                hv = torch.autograd.grad(
                    grads, leaves, [t[0] for t in tangents], retain_graph=keep, allow_unused=True
                )
                return self._scatter([hv], 1)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    hv = torch.autograd.grad(
                        grads,
                        leaves,
                        tangents,
                        retain_graph=keep,
                        allow_unused=True,
                        is_grads_batched=True,
                    )
                return self._scatter([hv], s, batched=True)
            except RuntimeError as exc:  # an op without a batched backward: one at a time
                if is_out_of_memory(exc):
                    raise  # the block is halved instead
                rows = []
                for i in range(s):
                    rows.append(
                        torch.autograd.grad(
                            grads,
                            leaves,
                            [t[i] for t in tangents],
                            retain_graph=keep or i < s - 1,
                            allow_unused=True,
                        )
                    )
                return self._scatter(rows, s)

    def _scatter(
        self, results: list[Sequence[Tensor | None]], s: int, batched: bool = False
    ) -> Tensor:
        if batched:
            return self.flatten(results[0], lead=(s,))
        return torch.stack([self.flatten(r) for r in results])

    # --------------------------------------------------------- mode choice
    def _choose_mode(self, modes: tuple[str, ...] = ("forward", "reverse")) -> str:
        """Time one product of each of ``modes`` on the first batch; keep the faster.

        An explicitly requested mode (``modes`` of one) gets one untimed trial product
        instead, so that a model or loss lacking its derivative fails here, in one line
        naming the mode, rather than inside a Krylov method. Failures are recorded in
        :attr:`mode_errors` either way. Every rank takes part (timings are summed over
        ranks) so all ranks agree.
        """
        timed = len(modes) > 1
        timings, out_of_memory = self._time_modes(modes, timed)
        # the first mode that did not fail otherwise ran out of memory: retry on halved batches
        halve = self._first_usable_mode_out_of_memory
        while halve(modes, out_of_memory) and self._halve_batches():
            self.mode_errors = {}
            timings, out_of_memory = self._time_modes(modes, timed)
        if self.world_size > 1:
            t = timings.clone().nan_to_num(posinf=1e30).to(self.device)
            self._all_reduce(t)
            timings = t.cpu()
        if timed:
            self.mode_timings = {
                "forward": float(timings[0]),
                "reverse": float(timings[1]),
            }
        if not bool(torch.isfinite(timings).any()) or float(timings.min()) >= 1e30:
            last = modes[-1]
            if last in out_of_memory and all(m in self.mode_errors for m in modes):
                raise torch.OutOfMemoryError(self.mode_errors[last])  # batches can't halve
            error = self.mode_errors.get(last, "failed on another rank")
            if timed:
                raise SharpscopeError(
                    f"cannot compute Hessian-vector products for this model and loss: {error}"
                )
            raise SharpscopeError(
                f"cannot compute Hessian-vector products in hvp_mode='{last}' for this model "
                f"and loss: {error}"
            )
        chosen = "forward" if float(timings[0]) <= float(timings[1]) else "reverse"
        if chosen == "forward":
            self._graph = None  # built while timing reverse mode; not needed
        return chosen

    def _trial_passes(self, mode: str) -> bool:
        """One untimed product in a ``mode`` read from the disk cache (as for an explicit
        mode), so that a mode this model cannot run is not taken from another model that
        shared its key (a model file edited since); a failure is warned about, and the
        caller times both modes again."""
        self.mode_errors = {}
        timings, _ = self._time_modes((mode,), timed=False)
        if math.isfinite(float(timings[("forward", "reverse").index(mode)])):
            return True
        warnings.warn(
            f"the HVP mode remembered for this configuration, '{mode}', failed for this "
            f"model ({self.mode_errors.get(mode, 'no product')}); timing both modes again",
            RuntimeWarning,
            stacklevel=4,
        )
        self.mode_errors = {}
        return False

    def _first_usable_mode_out_of_memory(
        self, modes: tuple[str, ...], out_of_memory: set[str]
    ) -> bool:
        """Whether the first of ``modes`` that did not fail for another reason ran out of
        memory (forward mode, usually the faster, or reverse where forward cannot run)."""
        for mode in modes:
            if mode in out_of_memory:
                return True
            if mode not in self.mode_errors:
                return False
        return False

    def _time_modes(
        self, modes: tuple[str, ...] = ("forward", "reverse"), timed: bool = True
    ) -> tuple[Tensor, set[str]]:
        """Seconds of one product of each of ``modes`` on the first batch, as (forward,
        reverse), inf for a mode not run or failed, and the modes that ran out of memory
        (each failure is in ``mode_errors``). Untimed: one product per mode, 0 seconds."""
        timings = torch.full((2,), math.inf, dtype=F64)
        out_of_memory: set[str] = set()
        if not self._batches:
            return timings.zero_(), out_of_memory
        x, y = self._batches[0]
        gen = torch.Generator().manual_seed(12345)
        v = torch.randn(1, self.dim, generator=gen, dtype=F64).to(self.device)
        for mode in modes:
            i = ("forward", "reverse").index(mode)
            try:
                with self._analysis_mode():
                    self._batch_products(mode, 0, x, y, v, True)  # warm-up (builds caches)
                    self._sync()
                    elapsed = 0.0
                    if timed:
                        start = time.perf_counter()
                        self._batch_products(mode, 0, x, y, v, True)
                        self._sync()
                        elapsed = time.perf_counter() - start
                timings[i] = elapsed  # only once every product of the mode has succeeded
            except Exception as exc:  # a module without forward-mode support, say
                self.mode_errors[mode] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if is_out_of_memory(exc):
                    out_of_memory.add(mode)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return timings, out_of_memory

    def _mode_key(self, architecture: str) -> tuple | None:
        """What the fastest HVP mode depends on: model, shapes, dtype, device, loss."""
        if not self._batches:
            return None
        x = self._batches[0][0]
        try:
            key = (
                type(self.module),
                architecture,
                tuple(self.param_shapes),
                tuple((n, tuple(b.shape)) for n, b in self._consts.items()),
                str(self.dtype),
                str(self.device),
                tuple(x.shape),
                str(x.dtype),
                self.loss_fn,
                self.bn_mode,
                self._reuse_graph,
                tuple(self.bn_folded),
            )
            hash(key)
        except TypeError:  # an unhashable loss callable: no caching
            return None
        return key

    def _mode_description(self, architecture: str) -> dict[str, Any] | None:
        """The configuration as the disk cache records it (:mod:`.mode_cache`): the
        in-process key written as text, plus what the speed of each mode depends on
        beyond it. None for a loss without a stable name (a callable)."""
        if not self._batches or self._loss_text is None:
            return None
        from .. import __version__

        x = self._batches[0][0]
        return {
            "sharpscope": __version__,
            "torch": torch.__version__,
            "device": device_name(self.device),
            "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "model": mode_cache.class_name(type(self.module)),
            "architecture": architecture,
            "params": [list(shape) for shape in self.param_shapes],
            "buffers": [[name, list(b.shape)] for name, b in self._consts.items()],
            "dtype": str(self.dtype),
            "input": [list(x.shape), str(x.dtype)],
            "loss": self._loss_text,
            "bn_mode": self.bn_mode,
            "reuse_graph": self._reuse_graph,
            "bn_folded": list(self.bn_folded),
        }

    def _architecture(self) -> str:
        """A hash of the module tree as ``repr`` prints it (layer types and sizes)."""
        return hashlib.sha256(repr(self.module).encode()).hexdigest()[:16]

    def _mode_keys(self) -> tuple[tuple | None, str | None, dict[str, Any] | None]:
        """The in-process key, the file's key and the description it hashes."""
        architecture = self._architecture()  # repr of the whole module tree: hashed once
        description = self._mode_description(architecture)
        on_disk = mode_cache.disk_key(description) if description is not None else None
        return self._mode_key(architecture), on_disk, description

    def _remembered_mode(self) -> tuple[mode_cache.Choice, bool] | None:
        """The remembered choice, and whether it was read from the file (then it gets a
        trial product: :meth:`_trial_passes`)."""
        key, on_disk, _ = self._mode_keys()
        return mode_cache.lookup(key, on_disk)

    def _remember_mode(self) -> None:
        key, on_disk, description = self._mode_keys()
        choice = (self.hvp_mode, dict(self.mode_timings), dict(self.mode_errors))
        mode_cache.remember(key, on_disk, choice, description)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def symmetry_advice(self) -> str:
        """The remedy :func:`~sharpscope.curvature.lanczos.check_symmetric` names when
        the products are not symmetric: the other HVP mode, unless it was already tried
        and rejected (:attr:`mode_errors`), when only rewriting the layer is left."""
        other = "reverse" if self.hvp_mode == "forward" else "forward"
        if other in self.mode_errors:
            return (
                f"hvp_mode='{other}' was tried and failed ({self.mode_errors[other]}), so "
                "write that layer with plain tensor operations"
            )
        return f"try hvp_mode='{other}', or write that layer with plain tensor operations"

    def describe(self) -> dict[str, Any]:
        """What a result's metadata should record about this operator."""
        return {
            "hvp_mode": self.hvp_mode,
            "hvp_mode_requested": self.hvp_mode_requested,
            "hvp_mode_seconds": self.mode_timings,
            "hvp_mode_errors": self.mode_errors,
            "num_params": self.dim,
            "num_examples": self.num_examples,
            "num_batches": self.num_batches,
            "max_batch_size": max(self.batch_sizes),
            "batches_halved": self.batches_halved,
            "batches_split_for_memory": self.batches_split_for_memory,
            "max_block_size": self.max_block_size,
            "bn_mode": self.bn_mode,
            "loss": self.loss_name,
            "weight_decay": self.weight_decay,
            "world_size": self.world_size,
            "grad_seconds": self.grad_seconds,
            "preflight": self.preflight,
            "hvp_mode_cached": self.hvp_mode_cached,
            "graph_reused": self._reuse_graph and self.hvp_mode == "reverse",
            "bn_folded": list(self.bn_folded),
            "bn_fold_rejected": self.bn_fold_rejected,
            **({"mixed_dtypes": self.mixed_dtypes} if self.mixed_dtypes else {}),
        }


def _check_tensor(value: Any, expected: str) -> None:
    """One line for a product asked of a non-tensor (a NumPy array, a list).

    >>> _check_tensor([1.0], "a vector of length 1")
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: expected a torch.Tensor (a vector of length 1), got list; \
convert with torch.as_tensor
    """
    if not isinstance(value, Tensor):
        raise SharpscopeError(
            f"expected a torch.Tensor ({expected}), got {type(value).__name__}; convert with "
            "torch.as_tensor"
        )


def _passes_agree(loss1: float, grad1: Tensor, loss2: float, grad2: Tensor) -> bool:
    """The pre-flight tolerance: rtol 5e-5, atol 1e-6 on the loss and the gradient."""
    loss_ok = abs(loss1 - loss2) <= PREFLIGHT_ATOL + PREFLIGHT_RTOL * abs(loss1)
    return loss_ok and torch.allclose(grad1, grad2, rtol=PREFLIGHT_RTOL, atol=PREFLIGHT_ATOL)


def _fold_agrees(
    loss1: float, grad1: Tensor, loss2: float, grad2: Tensor, dtype: torch.dtype
) -> bool:
    """Original (1) and folded (2) model agree up to rounding in ``dtype``, norm-wise.

    Element-wise tolerances reject a correct fold of a sharp float32 network (a tenth of
    a ResNet-20's gradient entries differ by more than 5e-5 relative), so the losses and
    the gradient vectors are compared as wholes.
    """
    loss_rtol, grad_rtol = FOLD_RTOL.get(dtype, FOLD_RTOL_DEFAULT)
    loss_ok = abs(loss1 - loss2) <= PREFLIGHT_ATOL + loss_rtol * abs(loss1)
    diff = torch.linalg.vector_norm(grad1 - grad2)
    return loss_ok and bool(diff <= PREFLIGHT_ATOL + grad_rtol * torch.linalg.vector_norm(grad1))


def _live_graph(
    leaves: list[Tensor], grads: Sequence[Tensor | None]
) -> tuple[list[Tensor], list[Tensor], list[int]]:
    """Leaves, the gradients that depend on θ, and their indices."""
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    return leaves, [grads[i] for i in live], live  # type: ignore[misc]
