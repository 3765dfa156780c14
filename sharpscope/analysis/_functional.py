"""Shared helpers of the sharpness and landscape analyses: flat parameter vectors,
model calls with many parameter sets at once, analysis mode, chunking.

The m-sharpness maximizations (one per data subset) and the landscape grid points
(one per parameter set) are independent problems of the same shape. They run several
at a time with :func:`torch.func.vmap` over ``functional_call`` with a leading "copy"
axis on the parameters, in chunks that bound the memory (analysis.md §5, §6).

Parameters are handled as one flat vector θ ∈ R^P over the trainable parameters in
``model.named_parameters()`` order (the order of ``model.parameters()`` and of the
eigenvectors of :func:`sharpscope.analysis.spectrum.top_eigenvalues`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..errors import SharpscopeError, caller_level, check_initialized, first_line, model_failure
from ..metrics import is_binary_logit
from ..modes import batchnorm_without_running_stats, eval_mode
from ..precision import HALF_DTYPES, rounding
from ..registry import get_loss as resolve_loss  # noqa: F401 - re-exported
from ..registry import loss_name  # noqa: F401 - re-exported
from ..results import RunMeta

LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ParamLayout:
    """Names and shapes of the trainable parameters, and their place in the flat vector.

    >>> layout = ParamLayout.of(nn.Linear(3, 2))
    >>> layout.names, layout.size
    (('weight', 'bias'), 8)
    >>> flat = layout.flatten(dict(nn.Linear(3, 2).named_parameters()))
    >>> {k: tuple(v.shape) for k, v in layout.unflatten(flat.expand(4, -1)).items()}
    {'weight': (4, 2, 3), 'bias': (4, 2)}
    """

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def of(cls, model: nn.Module) -> ParamLayout:
        """The layout of ``model``'s trainable parameters (tied weights counted once)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise SharpscopeError("the model has no trainable parameters to analyse")
        check_initialized(model)
        return cls(tuple(n for n, _ in named), tuple(p.shape for _, p in named))

    @functools.cached_property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each tensor."""
        return tuple(int(np.prod(s)) for s in self.shapes)

    @functools.cached_property
    def size(self) -> int:
        """P, the length of the flat vector."""
        return sum(self.numels)

    @functools.cached_property
    def _slices(self) -> tuple[tuple[str, torch.Size, slice], ...]:
        starts = np.cumsum((0, *self.numels))
        return tuple(
            (name, shape, slice(int(a), int(b)))
            for name, shape, a, b in zip(self.names, self.shapes, starts[:-1], starts[1:])
        )

    def slices(self) -> Iterator[tuple[str, torch.Size, slice]]:
        """``(name, shape, slice into the flat vector)`` of each tensor."""
        return iter(self._slices)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """Concatenate the named tensors (each with optional leading axes) into ``(..., P)``."""
        parts = []
        for name, shape in zip(self.names, self.shapes):
            if name not in tensors:
                raise SharpscopeError(f"parameter '{name}' is missing")
            t = tensors[name]
            lead = t.shape[: t.dim() - len(shape)]
            if tuple(t.shape[len(lead) :]) != tuple(shape):
                raise SharpscopeError(
                    f"parameter '{name}' has shape {tuple(t.shape[len(lead) :])}, "
                    f"expected {tuple(shape)}"
                )
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views of a ``(..., P)`` vector as the named tensors ``(..., *shape)``."""
        lead = flat.shape[:-1]
        # torch.split, not one slice per tensor: a slice's backward writes a zero-filled
        # (..., P) gradient per tensor, split's backward concatenates the pieces once.
        parts = torch.split(flat, self.numels, dim=-1)
        return {
            name: part.view((*lead, *shape))  # a tuple: a 0-dim tensor has no sizes to list
            for name, shape, part in zip(self.names, self.shapes, parts)
        }

    def matrix_mask(self, device: torch.device | None = None) -> Tensor:
        """Boolean ``(P,)``: True on the entries of tensors with two or more dimensions."""
        mask = torch.zeros(self.size, dtype=torch.bool, device=device)
        for _, shape, sl in self.slices():
            mask[sl] = len(shape) >= 2
        return mask


def flat_parameters(model: nn.Module, layout: ParamLayout | None = None) -> Tensor:
    """θ as one detached ``(P,)`` vector (a copy)."""
    layout = layout or ParamLayout.of(model)
    params = dict(model.named_parameters())
    return layout.flatten({n: params[n].detach() for n in layout.names}).clone()


def float_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The floating-point buffers (BatchNorm running statistics and the like)."""
    return {n: b for n, b in model.named_buffers() if b.is_floating_point()}


def model_dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """dtype and device of the first trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SharpscopeError("the model has no trainable parameters to analyse")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
    if len(dtypes) > 1:  # one flat vector of parameters has one dtype
        raise SharpscopeError(
            f"the model's trainable parameters have mixed dtypes ({', '.join(dtypes)}): "
            "cast the model to one dtype (e.g. model.double()) to analyse it"
        )
    return params[0].dtype, params[0].device


def warn_half_precision(dtype: torch.dtype, what: str) -> None:
    """Warn that a float16/bfloat16 model gives ``what`` at half precision (the Hessian
    analyses refuse such a model; these evaluate it as it is)."""
    if dtype in HALF_DTYPES:
        name = str(dtype).removeprefix("torch.")
        eps = rounding(dtype)
        warnings.warn(
            f"the model is {name}: {what} is computed at its resolution (about {eps} "
            "relative, so smaller differences are rounding); a float32 copy "
            "(copy.deepcopy(model).float()) gives more exact values",
            RuntimeWarning,
            stacklevel=caller_level(),
        )


@contextlib.contextmanager
def analysis_mode(model: nn.Module, probe: Tensor | None = None) -> Iterator[str]:
    """Put every module in eval mode, and restore each module's own mode afterwards.

    Yields the mode the analysis records: "eval", or "batch" (with a warning) when a
    BatchNorm keeps no running statistics and so normalizes with each batch's even in
    eval mode (the result then depends on the batches or subsets; analysis.md §0).
    Buffers are never updated in eval mode. With ``probe`` (some of the inputs) a model
    that is random even in eval mode is refused (:func:`check_not_random`).
    """
    name = batchnorm_without_running_stats(model)
    if name is not None:
        warnings.warn(
            f"BatchNorm '{name}' keeps no running statistics (track_running_stats="
            "False), so even in eval mode it normalizes with each batch's: the result "
            "depends on the batches (or m-sharpness subsets); recorded as mode 'batch'",
            RuntimeWarning,
            stacklevel=3,
        )
    with eval_mode(model):
        if probe is not None:
            check_not_random(model, probe)
        yield "eval" if name is None else "batch"


def check_not_random(model: nn.Module, inputs: Tensor, examples: int = 32) -> None:
    """Two forward passes over the first ``examples`` inputs must agree (rtol 1e-5): a
    model random even in eval mode (``F.dropout(x, training=True)``, a noise layer) gave
    another value at every call of the landscape, m-sharpness and the measures, without a
    word, as the Hessian's pre-flight check already refuses. The global random state is
    left as it was; a model that does not run is left to the analysis' own call to report."""
    probe = inputs[:examples]
    devices = [probe.device] if probe.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        try:
            first, second = model(probe), model(probe)
        except Exception:  # reported, in one line, where the analysis runs the model
            return
    if (
        isinstance(first, Tensor)
        and isinstance(second, Tensor)
        and first.shape == second.shape
        and not torch.allclose(first, second, rtol=1e-5, atol=1e-6, equal_nan=True)
    ):
        raise SharpscopeError(
            "two forward passes over the same examples gave different outputs: the model "
            "is random even in eval mode (F.dropout(..., training=True), a noise layer, "
            "...); the analyses need a fixed function"
        )


def with_data(meta: RunMeta | None, data: Any) -> RunMeta | None:
    """``meta`` with a :class:`~sharpscope.data.DataSplit`'s spec and split recorded, when
    ``data`` is one and ``meta`` names no data."""
    if (meta is None or meta.data is None) and hasattr(data, "spec") and hasattr(data, "split"):
        recorded = {**data.spec, "split": data.split, **getattr(data, "subset", {})}
        return dataclasses.replace(meta or RunMeta(), data=recorded)
    return meta


def analysis_meta(
    base: RunMeta | None,
    *,
    num_samples: int,
    seed: int,
    dtype: torch.dtype,
    device: Any,
    mode: str,
    num_params: int,
    extra: Mapping[str, Any] | None = None,
    data: Any = None,
) -> RunMeta:
    """``base`` (or a fresh RunMeta) with what every analysis records, ``extra`` added.

    When ``base`` names no data and ``data`` is a :class:`~sharpscope.data.DataSplit`
    (``ss.load_data(...)``), its spec and split are recorded, so results computed from
    the Python API keep their provenance too.
    """
    base = with_data(base, data) or RunMeta()
    return dataclasses.replace(
        base,
        num_samples=int(num_samples),
        seed=int(seed),
        dtype=str(dtype).replace("torch.", ""),
        device=str(device),
        mode=mode,
        num_params=int(num_params),
        extra={**base.extra, **(extra or {})},
    )


# what a model or loss that does not fit the data raises
_MODEL_ERRORS = (
    RuntimeError,
    TypeError,
    ValueError,
    IndexError,
    AttributeError,
    AssertionError,
    NotImplementedError,
)


@contextlib.contextmanager
def model_errors(vectorized: bool) -> Iterator[None]:
    """Turn the error of a model or loss that does not run on the data into one line.

    Out-of-memory errors pass through (the callers split the work); under ``vmap`` an
    operation without a batching rule (``nn.LSTM``, ``nn.GRU``, ...) names the way out.
    """
    from ..device_memory import is_out_of_memory

    try:
        yield
    except SharpscopeError:
        raise
    except _MODEL_ERRORS as exc:
        if is_out_of_memory(exc):
            raise
        # no batching rule (nn.LSTM, ...), or a forward writing to a buffer in place
        unsupported = ("atching rule", "attempted to call in-place operation")
        if vectorized and any(words in str(exc) for words in unsupported):
            raise VmapUnsupportedError(
                f"torch.func.vmap cannot run this model ({first_line(exc)}); pass vectorize=False"
            ) from exc
        raise model_failure(exc) from exc


class VmapUnsupportedError(SharpscopeError):
    """``torch.func.vmap`` has no batching rule for an operation of the model."""


def vmap_or_loop(function: Callable[..., Any]) -> Callable[..., Any]:
    """Let ``vectorize=None`` (not chosen by the caller) fall back to the loop, with a
    warning, when ``vmap`` cannot run the model (``nn.LSTM``, ``nn.GRU``, ...); a
    ``vectorize=True`` the caller chose still raises. The fallback computes the same
    values: the loop is the reference the vectorized path is tested against."""
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("vectorize") is not None:
            return function(*args, **kwargs)
        try:
            return function(*args, **kwargs)
        except VmapUnsupportedError as exc:
            warnings.warn(
                f"{str(exc).removesuffix('; pass vectorize=False')}: the loop instead "
                "(the same values, slower; vectorize=False or --no-vectorize skips this attempt)",
                RuntimeWarning,
                stacklevel=2,
            )
            bound.arguments["vectorize"] = False
            return function(*bound.args, **bound.kwargs)

    return wrapper


def normalize_logits(outputs: Tensor, eps: float = 1e-12) -> Tensor:
    """Subtract each row's mean logit and divide by the row's L2 norm.

    This removes the freedom to scale the logits (analysis.md §5, "logit
    normalization").

    >>> z = normalize_logits(torch.tensor([[1.0, 3.0], [5.0, 5.0]]))
    >>> z[0].tolist(), z[1].tolist()
    ([-0.7071067690849304, 0.7071067690849304], [0.0, 0.0])
    """
    centered = outputs - outputs.mean(dim=-1, keepdim=True)
    return centered / (centered.norm(dim=-1, keepdim=True) + eps)


def is_classification(targets: Tensor) -> bool:
    """Integer class labels of shape ``(N,)``, or their one-hot rows ``(N, C)`` (the usual
    targets of MSE classification): 0-1 error and accuracy are defined.

    >>> is_classification(torch.tensor([2, 0])), is_classification(torch.eye(3)[[2, 0]])
    (True, True)
    >>> is_classification(torch.tensor([[0.9, 0.1]]))  # soft labels: no class to score
    False
    """
    if targets.is_complex():
        return False
    if targets.dim() == 1:
        return not targets.is_floating_point()
    if targets.dim() == 2 and targets.is_floating_point() and len(targets):
        one_hot = ((targets == 0) | (targets == 1)).all() and (targets.sum(dim=1) == 1).all()
        return bool(one_hot)
    return False


def class_labels(targets: Tensor) -> Tensor:
    """The class of each example: the labels themselves, or the argmax of one-hot rows."""
    return targets if targets.dim() == 1 else targets.argmax(dim=-1)


def predicted_classes(outputs: Tensor) -> Tensor:
    """The predicted class of each example: the argmax of its outputs, or, for a single
    output per example (shape ``(N,)`` or ``(N, 1)``: a binary logit), 1 where it is > 0.

    >>> predicted_classes(torch.tensor([[0.1, 2.0], [3.0, -1.0]])).tolist()
    [1, 0]
    >>> predicted_classes(torch.tensor([[-0.5], [0.7], [0.0]])).tolist()  # 0.0: class 0
    [0, 1, 0]
    """
    if is_binary_logit(outputs):
        return (outputs.reshape(len(outputs)) > 0).long()
    return outputs.argmax(dim=-1)


def num_correct(outputs: Tensor, targets: Tensor) -> Tensor:
    """Number of examples whose predicted class (:func:`predicted_classes`) equals the
    label (a 0-dim tensor)."""
    return (predicted_classes(outputs) == class_labels(targets)).sum()


def chunk_slices(total: int, size: int) -> list[slice]:
    """Consecutive slices of at most ``size`` covering ``range(total)``.

    >>> chunk_slices(5, 2)
    [slice(0, 2, None), slice(2, 4, None), slice(4, 5, None)]
    """
    size = max(1, int(size))
    return [slice(i, min(i + size, total)) for i in range(0, total, size)]


def fingerprint(*tensors: Tensor) -> str:
    """A short SHA-256 of tensors' values (to check that a resumed run is the same run)."""
    digest = hashlib.sha256()
    for t in tensors:
        array = hashable_values(t)
        digest.update(str(tuple(array.shape)).encode())
        digest.update(str(array.dtype).encode())
        digest.update(array.numpy().tobytes())
    return digest.hexdigest()[:16]


def hashable_values(t: Tensor) -> Tensor:
    """``t``'s values as a contiguous CPU tensor NumPy can read (bfloat16 as float32)."""
    array = t.detach().cpu().contiguous()
    return array.float() if array.dtype == torch.bfloat16 else array


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, restart, subset, ...)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2)
    seed = int(state[0]) << 32 | int(state[1])
    return torch.Generator().manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)


def split_constant_columns(
    layout: ParamLayout, flat: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split ``(K, P)`` parameter rows into per-row tensors and tensors equal in every row.

    Tensors that no row changes (biases and BatchNorm parameters under
    ``bias="ignore"``, say) go to the shared dict without the K axis, so the vectorized
    call does not carry K copies of them.
    """
    stacked: dict[str, Tensor] = {}
    shared: dict[str, Tensor] = {}
    for name, shape, sl in layout.slices():
        block = flat[:, sl]
        if bool((block == block[:1]).all()):
            shared[name] = block[0].view(shape)
        else:
            stacked[name] = block.view(len(flat), *shape)
    return stacked, shared


@contextlib.contextmanager
def tensors_swapped(
    model: nn.Module, names: Sequence[str]
) -> Iterator[Callable[[Mapping[str, Tensor]], None]]:
    """Let the named parameters and buffers of ``model`` hold other values, restored on exit.

    Yields ``load(values)``, which points each named tensor at ``values[name]`` (same
    shape, dtype and device) by rebinding its ``.data``: the model then computes with
    those values, and the tensors it held are never written (their values, storage and
    version counters are unchanged, so a graph built on them before still backpropagates).
    This is the straightforward "set the weights, evaluate" loop of Li et al. (2018)
    without ``functional_call``'s per-call cost of re-binding every module attribute.
    Autograd still sees the model's own parameters: ``torch.autograd.grad(loss,
    params)`` is then the gradient at the loaded values.

    >>> net = nn.Linear(2, 1, bias=False)
    >>> before = net.weight.detach().clone()
    >>> with tensors_swapped(net, ["weight"]) as load:
    ...     load({"weight": torch.ones(1, 2)})
    ...     net(torch.tensor([[1.0, 2.0]])).item()
    3.0
    >>> bool(torch.equal(net.weight, before))
    True
    """
    named = dict(model.named_parameters())
    named.update(model.named_buffers())
    missing = [n for n in names if n not in named]
    if missing:
        raise SharpscopeError(f"the model has no parameter or buffer named {missing[0]!r}")
    targets = {n: named[n] for n in names}
    held = {n: t.data for n, t in targets.items()}

    def load(values: Mapping[str, Tensor]) -> None:
        for name, value in values.items():
            targets[name].data = value

    try:
        yield load
    finally:
        for name, tensor in targets.items():
            tensor.data = held[name]


@functools.lru_cache(maxsize=64)
def _runs_formed(
    layout: ParamLayout, skip: frozenset[str]
) -> tuple[tuple[slice, tuple[tuple[str, torch.Size, slice], ...]], ...]:
    """Consecutive tensors of ``layout`` not in ``skip``: (their span of the flat vector,
    each tensor's name, shape and slice within the span)."""
    runs: list[tuple[slice, list[tuple[str, torch.Size, slice]]]] = []
    for name, shape, sl in layout.slices():
        if name in skip:
            continue
        if runs and runs[-1][0].stop == sl.start:
            runs[-1] = (slice(runs[-1][0].start, sl.stop), runs[-1][1])
        else:
            runs.append((sl, []))
        start = runs[-1][0].start
        runs[-1][1].append((name, shape, slice(sl.start - start, sl.stop - start)))
    return tuple((span, tuple(members)) for span, members in runs)


@dataclass(frozen=True)
class AffineRows:
    """Parameter rows θ₀ + c_i D (``coefficients`` ``(K, m)``, ``directions`` ``(m, P)``),
    formed one row at a time, for the per-point loop.

    A row costs one pass over θ₀ and D (one ``addmv`` per run of consecutive tensors
    formed) and no ``(K, P)`` block, which for large models costs as much as the forward
    pass. Every row is formed the
    same way whatever rows come with it, so a resumed or distributed run forms the very
    same weights. ``skip``: tensors left out of :meth:`tensors` (they keep the values
    they hold; the landscape leaves out the weights of a precomputed input layer).
    """

    layout: ParamLayout
    origin: Tensor
    directions: Tensor
    coefficients: Tensor
    skip: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.coefficients)

    def __getitem__(self, rows: slice) -> AffineRows:
        return dataclasses.replace(self, coefficients=self.coefficients[rows])

    def tensors(self, row: int) -> dict[str, Tensor]:
        """The named tensors of row ``row`` (one ``addmv`` per run of tensors formed)."""
        workspace = self.workspace()
        self.form(row, workspace)
        return workspace[1]

    def workspace(self) -> tuple[list[Tensor], dict[str, Tensor]]:
        """Buffers to form rows into (one per run of tensors formed) and each named
        tensor's view of them: a model pointed at the views once computes with every row
        that :meth:`form` then writes (no per-row rebinding)."""
        buffers, views = [], {}
        for span, members in _runs_formed(self.layout, self.skip):
            buffers.append(self.origin.new_empty(span.stop - span.start))
            views.update({name: buffers[-1][sl].view(shape) for name, shape, sl in members})
        return buffers, views

    def form(self, row: int, workspace: tuple[list[Tensor], dict[str, Tensor]]) -> None:
        """Write row ``row`` into the buffers of :meth:`workspace`, in place."""
        c = self.coefficients[row]
        for (span, _), buffer in zip(_runs_formed(self.layout, self.skip), workspace[0]):
            torch.addmv(self.origin[span], self.directions[:, span].T, c, out=buffer)


def evaluate_parameter_sets(
    model: nn.Module,
    layout: ParamLayout,
    flat: Tensor | AffineRows,
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: LossFn,
    *,
    classification: bool,
    buffers: Mapping[str, Tensor] | None = None,
    vectorize: bool = True,
    before_forward: Callable[[int, int], None] | None = None,
    on_row: Callable[[int, float, float], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean loss and accuracy over all batches for each of K parameter sets.

    Args:
        model: the network (in the mode the caller chose; nothing is changed).
        layout: where each trainable tensor sits in a row of ``flat``.
        flat: ``(K, P)`` parameter rows, or (the loop only) :class:`AffineRows`.
        batches: the data, each batch weighted n_b/N.
        loss_fn: mean loss of a batch.
        classification: whether to count correct predictions (:func:`predicted_classes`).
        buffers: optional ``(K, ...)`` buffers, one per parameter set (BatchNorm running
            statistics moved along with the weights: landscape "states" mode).
        vectorize: evaluate the K sets with one ``vmap(functional_call)`` per batch
            (False: a Python loop over the sets that points the model's parameters at
            each row in turn, see :func:`tensors_swapped`).
        before_forward: loop only: called with ``(row, batch index)`` before each
            forward pass (the landscape points its precomputed input layers there).
        on_row: loop only: called with ``(row, loss, accuracy)`` as each row is done
            (the landscape records it at once, so that an interrupt keeps it).

    Returns:
        ``(loss, accuracy)``, two float64 ``(K,)`` CPU tensors (accuracy NaN when not
        ``classification``, and where the loss is NaN).
    """
    total = sum(len(y) for _, y in batches)
    k = len(flat)
    loss = torch.zeros(k, dtype=torch.float64)
    correct = torch.zeros(k, dtype=torch.float64)
    buffers = dict(buffers or {})
    if vectorize and (
        before_forward is not None or on_row is not None or isinstance(flat, AffineRows)
    ):
        raise ValueError("before_forward, on_row and AffineRows are for the loop (vectorize=False)")
    with torch.no_grad():
        if vectorize:
            stacked, shared = split_constant_columns(layout, flat)
            stacked.update(buffers)

            def one(params: dict[str, Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
                out = functional_call(model, (params, shared), (x,))
                hits = num_correct(out, y) if classification else out.sum() * 0
                return loss_fn(out, y), hits

            batched = torch.func.vmap(one, in_dims=(0, None, None))
            for x, y in batches:
                if stacked:
                    values, hits = batched(stacked, x, y)
                else:  # every row is the same parameter set
                    values, hits = (v.expand(k) for v in one({}, x, y))
                loss += values.double().cpu() * (len(y) / total)
                correct += hits.double().cpu()
        else:
            names = [*layout.names, *buffers]
            with tensors_swapped(model, names) as load:
                if isinstance(flat, AffineRows):
                    workspace = flat.workspace()
                    load(workspace[1])  # once: each row is formed in place below
                for row in range(k):
                    if isinstance(flat, AffineRows):
                        flat.form(row, workspace)
                    else:
                        load(layout.unflatten(flat[row]))
                    if buffers:
                        load({name: b[row] for name, b in buffers.items()})
                    for index, (x, y) in enumerate(batches):
                        if before_forward is not None:
                            before_forward(row, index)
                        out = model(x)
                        loss[row] += float(loss_fn(out, y)) * (len(y) / total)
                        if classification:
                            correct[row] += float(num_correct(out, y))
                    if on_row is not None:
                        value = float(loss[row])
                        hits = float(correct[row]) / total if classification else math.nan
                        on_row(row, value, math.nan if math.isnan(value) else hits)
    accuracy = correct / total if classification else torch.full_like(loss, float("nan"))
    # NaN outputs have no prediction: argmax would count class 0 as a guess
    accuracy[torch.isnan(loss)] = float("nan")
    return loss, accuracy
