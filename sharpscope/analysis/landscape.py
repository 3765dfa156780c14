"""Loss-landscape slices (Li et al., 2018, arXiv:1712.09913; analysis.md §6).

1-D: f(α) = L(θ* + αd); 2-D: f(α, β) = L(θ* + αδ + βη); interpolation between two
models: f(α) = L((1−α)θ_A + αθ_B); PCA of a training trajectory: the plane of the
first two principal components of θ_t − θ_final.

Directions (built by :mod:`sharpscope.analysis.directions`):

* ``"random"``: i.i.d. N(0, 1) entries (seeded), then normalized per filter: for every
  tensor with ≥ 2 dimensions and every slice along its first axis (a conv output
  channel, a linear output row), d_slice ← d_slice·‖θ_slice‖/(‖d_slice‖ + 1e-10).
  Other norms: per layer (tensor), per element (d ⊙ |θ|), none. Tensors with ≤ 1
  dimension (biases, BatchNorm scale and shift): "ignore" sets them to zero (the
  published setting), "keep" copies θ (the reference code's non-ignore behaviour),
  "normalize" treats each such tensor as one filter under the chosen norm (for
  "filter" and "layer": d ← d·‖θ‖/(‖d‖ + 1e-10) over the whole tensor).
* ``"eigen"``: the top Hessian eigenvectors from :func:`~sharpscope.analysis.spectrum.
  top_eigenvalues` (unit norm; the axes are then in parameter-norm units).
* another model or ``state_dict``: linear interpolation (α-axis [−span/2, 1 + span/2],
  [−0.5, 1.5] by default, the reference scripts' range); BatchNorm running statistics
  are interpolated too ("states" mode) by default when the model has float buffers.
* a list of models or ``state_dict``\\ s (a trajectory, the last one usually the model
  itself): centered PCA of θ_t − θ_final, the first components as directions, the
  checkpoints projected by least squares onto them.

Every point reports the mean loss and the accuracy over the data, in eval mode
(running BatchNorm statistics; never recomputed per point). Points are evaluated
several at a time with ``vmap(functional_call)`` over stacked parameter sets (on a GPU),
or one after another with the input layer's output precomputed for the whole slice
where that pays (:mod:`sharpscope.analysis.input_layer`; on CPU), split
across processes under ``torchrun``, and written incrementally (NaN = not yet
computed): after the first block, every ``save_every`` seconds, and with the points
finished so far when an interrupt (Ctrl-C) or an error stops the run, which then
resumes where it stopped. ``loss[i, j]`` is the value at ``(x[i], y[j])``. Default axes always
contain the model (0) and, for interpolation, the second model (1).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..curvature.fold import fold_batchnorm
from ..data.batches import fixed_batches
from ..device_memory import FittingRows, available_memory_bytes, free_memory_note
from ..distributed import group_rank_and_size, peers_checked
from ..errors import SharpscopeError, check, check_integers, check_numbers, check_seed
from ..modes import eval_mode, keeps_model_buffers
from ..precision import ieee_float32
from ..registry import check_model_loss
from ..results import Result, RunMeta
from ._functional import (
    AffineRows,
    ParamLayout,
    analysis_meta,
    analysis_mode,
    evaluate_parameter_sets,
    fingerprint,
    flat_parameters,
    hashable_values,
    is_classification,
    loss_name,
    model_dtype_device,
    model_errors,
    resolve_loss,
    vmap_or_loop,
    warn_half_precision,
    with_data,
)
from .directions import (  # normalize/random_direction: still importable from here
    BIAS_MODES,
    NORMS,
    BiasMode,
    DirectionNorm,
    DirectionPlan,
    normalize_direction,
    plan_directions,
    random_direction,
)
from .input_layer import PrecomputedInputLayers

#: Fewest grid points per axis: a slice needs its centre and a point on each side.
MIN_GRID = 3


@dataclass(frozen=True)
class LandscapeResult(Result):
    """A 1-D or 2-D loss-landscape slice.

    Attributes:
        x: ``(n_x,)`` coordinates α along the first direction.
        y: ``(n_y,)`` coordinates β along the second direction (None in 1-D).
        loss: ``(n_x,)`` or ``(n_x, n_y)`` mean loss, ``loss[i, j]`` at ``(x[i], y[j])``;
            NaN where not yet computed.
        accuracy: the same for the accuracy (NaN without class labels).
        computed: bool mask, True where the point has been evaluated (a diverged point
            may have a NaN loss and still be computed).
        directions: ``(dims, P)`` the directions, flattened over the trainable
            parameters in ``model.parameters()`` order.
        direction_kind: "random", "eigen", "interpolation" or "pca".
        norm, bias, states: direction normalization ("unit" for eigen and PCA
            directions, "none" for a 1-D interpolation's θ_B − θ_A), handling of
            tensors with ≤ 1 dimension, and whether BatchNorm running statistics move
            with the weights.
        cosine: cosine between the two directions (None in 1-D).
        direction_norms: ‖d‖ of each direction.
        eigenvalues: Hessian eigenvalues of the eigen directions, else None.
        explained_variance_ratio: PCA ratios of the directions, else None.
        trajectory: ``(T, dims)`` PCA coordinates of the checkpoints, else None.
        complete: every point computed.
        settings: what a resumed run must match (shapes, options, hashes of θ, of the
            BatchNorm statistics and frozen parameters, and of the data).
        loss_name: the loss used.
        seconds: wall time (of this call; a resumed run adds its own).
        meta: provenance; ``meta.extra["points_evaluated"]`` counts the points
            evaluated in this call, ``meta.extra["points_loaded"]`` those resumed from
            ``out``.
    """

    kind: ClassVar[str] = "landscape"

    x: Tensor
    y: Tensor | None
    loss: Tensor
    accuracy: Tensor
    computed: Tensor
    directions: Tensor
    direction_kind: str
    norm: str
    bias: str
    states: bool
    cosine: float | None
    direction_norms: list
    eigenvalues: Tensor | None
    explained_variance_ratio: Tensor | None
    trajectory: Tensor | None
    complete: bool
    settings: dict
    loss_name: str
    seconds: float
    meta: RunMeta

    @property
    def axes(self) -> tuple[Tensor, ...]:
        """``(x,)`` in 1-D, ``(x, y)`` in 2-D."""
        return (self.x,) if self.y is None else (self.x, self.y)

    @property
    def dims(self) -> int:
        """1 or 2."""
        return len(self.axes)

    def plot(self, kind: str = "auto", metric: str = "loss", ax: Any = None, **options: Any) -> Any:
        """A matplotlib Figure: 1-D curve, 2-D "contour" (default) or "surface".

        See :func:`sharpscope.plotting.landscape.plot_landscape`.
        """
        from ..plotting.landscape import plot_landscape

        return plot_landscape(self, kind=kind, metric=metric, ax=ax, **options)


def _axis(values: Any, name: str) -> Tensor:
    axis = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    check(len(axis) >= 1 and bool(torch.isfinite(axis).all()), f"{name} must be finite numbers")
    return axis


#: host bytes per grid point: its coordinates (float64), loss and accuracy grids (float64,
#: and their copies written to landscape.npz) and the computed mask, rounded up
BYTES_PER_GRID_POINT = 64


def _check_grid_fits_memory(
    dims: int, grid: int, x: Sequence[float] | Tensor | float | None, y: Any
) -> None:
    """One line when the grid's coordinates and results cannot fit the free host memory
    (``grid=100000`` in 2-D is 1e10 points: it ran out of memory with advice about batches)."""
    sizes = [int(np.size(x)) if x is not None else grid]  # x=0.5: one point
    if dims == 2:
        sizes.append(int(np.size(y)) if y is not None else grid)
    points = math.prod(sizes)
    free = available_memory_bytes()
    need = points * BYTES_PER_GRID_POINT
    check(
        free is None or need <= free,
        f"a {' x '.join(map(str, sizes))} grid is {points:.3g} points, whose coordinates and "
        f"results need about {need / 2**30:.3g} GiB; {(free or 0) / 2**30:.3g} GiB "
        f"of memory is free{free_memory_note(free)}: use a smaller grid",
    )


def _default_axes(plan: DirectionPlan, dims: int, grid: int, span: float) -> list[Tensor]:
    if plan.kind == "pca":
        axes = []
        for i in range(dims):
            c = plan.trajectory[:, i]
            lo, hi = min(float(c.min()), 0.0), max(float(c.max()), 0.0)
            margin = 0.1 * (hi - lo) if hi > lo else 1.0
            axes.append(_covering_grid(lo - margin, hi + margin, grid))
        return axes
    if plan.kind == "interpolation":
        axes = [_interpolation_grid(span, grid)]
    else:
        axes = [_centered_grid(span, grid)]
    if dims == 2:
        axes.append(_centered_grid(span, grid))
    return axes


def _grid(lo: float, hi: float, num: int, anchors: tuple[float, ...] = (0.0,)) -> Tensor:
    """``num`` evenly spaced values from lo to hi; a value within rounding of an anchor
    (the model itself at 0, the second model at 1) is that anchor exactly.

    >>> _grid(-1.0, 1.0, 11)[5].item()
    0.0
    """
    axis = torch.linspace(lo, hi, num, dtype=torch.float64)
    for anchor in anchors:
        axis[(axis - anchor).abs() <= 1e-9 * (hi - lo)] = anchor
    return axis


def _centered_grid(span: float, num: int) -> Tensor:
    """``num`` evenly spaced values in [−span, span] with the model (0) among them:
    ``linspace(−span, span, num)`` for odd ``num``; for even ``num`` the grid of
    ``num + 1`` points without +span (step 2·span/num).

    >>> _centered_grid(1.0, 4).tolist()
    [-1.0, -0.5, 0.0, 0.5]
    """
    if num % 2:
        return _grid(-span, span, num)
    return _grid(-span, span, num + 1)[:-1]


def _interpolation_grid(span: float, num: int) -> Tensor:
    """``num`` evenly spaced α with both models (0 and 1) among them, close to
    [−span/2, 1 + span/2]: the step is 1/m, with m (the steps from 0 to 1) nearest to
    ``linspace``'s (num − 1)/(1 + span); the other points go half below 0 (the odd one)
    and half above 1. For span 1 and num = 4k + 1 this is ``linspace(−0.5, 1.5, num)``.

    >>> [round(a, 12) for a in _interpolation_grid(1.0, 11).tolist()]
    [-0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4]
    """
    steps = min(max(1, math.floor((num - 1) / (1 + span) + 0.5)), num - 1)
    below = (num - steps) // 2
    above = num - 1 - steps - below
    return _grid(-below / steps, 1 + above / steps, num, anchors=(0.0, 1.0))


def _covering_grid(lo: float, hi: float, num: int) -> Tensor:
    """``num`` evenly spaced values with 0 among them covering [lo, hi] (lo < 0 < hi),
    with the smallest step that does.

    >>> _covering_grid(-1.0, 3.0, 5).tolist()
    [-1.0, 0.0, 1.0, 2.0, 3.0]
    """
    step, below = min((max(-lo / b, hi / (num - 1 - b)), b) for b in range(1, num - 1))
    return _grid(-below * step, (num - 1 - below) * step, num)


# --- the driver ---------------------------------------------------------------------------


def _peek(path: Path | None) -> LandscapeResult | None:
    """The stored partial result at ``path`` if it is a readable landscape, else None."""
    if path is None or not path.exists():
        return None
    try:
        previous = LandscapeResult.load(path)
    except Exception:  # noqa: BLE001 - _load_partial reports it
        return None
    return previous if previous.directions is not None else None


#: what else may have given a stored landscape other directions than this run's, by kind
_OTHER_DIRECTIONS = {
    "interpolation": " (another second model: another --directions CKPT2?)",
    "pca": " (another trajectory: another --directions FOLDER?)",
}


def _same_directions(stored: Tensor, planned: Tensor) -> bool:
    """Whether the stored directions are this run's, ``planned``, to the rounding of the
    dtype that ``planned`` comes cast to (the model's, in which a result stores them):
    each within 4 eps (at least 1e-9) of its norm once both are in that dtype (the plan is
    float64 arithmetic on the CPU, where another machine's LAPACK may move the last bits of
    a PCA)."""
    tolerance = max(4 * torch.finfo(planned.dtype).eps, 1e-9)
    stored = stored.to(planned.dtype).double()
    planned = planned.double()
    gap = (stored - planned).norm(dim=1)
    return bool((gap <= tolerance * planned.norm(dim=1)).all())


def _data_fingerprint(batches: Sequence[tuple[Tensor, Tensor]]) -> str:
    """A short SHA-256 of the examples, the same whatever batches hold them (the batch size
    is a setting of its own): the inputs' and the targets' dtype, shape of one example and
    count, then their values in order.

    >>> x, y = torch.arange(12.0).reshape(6, 2), torch.arange(6)
    >>> _data_fingerprint([(x, y)]) == _data_fingerprint([(x[:4], y[:4]), (x[4:], y[4:])])
    True
    """
    digest = hashlib.sha256()
    for part in zip(*batches):  # the inputs, then the targets
        first = part[0]
        count = sum(len(t) for t in part)
        digest.update(f"{first.dtype} {(count, *first.shape[1:])}".encode())
        for t in part:
            digest.update(hashable_values(t).numpy().tobytes())
    return digest.hexdigest()[:16]


def _batch_size(batches: Sequence[tuple[Tensor, Tensor]]) -> int | list[int]:
    """Examples per batch: one number for batches of one size but a smaller last one (the
    command line's, ``batch_size=``'s), else each batch's.

    >>> _batch_size([(None, torch.zeros(4)), (None, torch.zeros(4)), (None, torch.zeros(1))])
    4
    """
    sizes = [len(t) for _, t in batches]
    if all(n == sizes[0] for n in sizes[:-1]) and sizes[-1] <= sizes[0]:
        return sizes[0]
    return sizes


#: settings that files of earlier versions lack (batch_size: see _load_partial)
_NEWER_SETTINGS = ("buffers", "buffer_directions")


def _load_partial(
    path: Path,
    settings: dict,
    axes: list[Tensor],
    num_params: int,
    directions: Tensor,
    batches: Sequence[tuple[Tensor, Tensor]] = (),
) -> LandscapeResult | None:
    """The partial result stored at ``path`` to resume from, if its settings, arrays and
    directions match this run (a hand-edited file with arrays of other sizes is refused;
    so are points along another second model or trajectory, or towards other BatchNorm
    statistics, which the other settings do not name). Settings that a file of an earlier
    version lacks are not compared, and one from before the settings held ``batch_size``
    fingerprinted the data batch by batch: ``batches`` (this run's) are fingerprinted that
    way to compare with it."""
    if not path.exists():
        return None
    try:
        previous = LandscapeResult.load(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        why = "" if isinstance(exc, SharpscopeError) else f" ({type(exc).__name__})"
        raise SharpscopeError(
            f"{path} exists but is not a landscape result{why}; delete it or choose another output"
        ) from exc
    old = dict(previous.settings or {})
    for key in _NEWER_SETTINGS:
        old.setdefault(key, settings.get(key))  # an earlier version's file: not compared
    if "batch_size" not in old and old.get("data") == fingerprint(
        *(t for b in batches for t in b)
    ):  # an earlier version's file of the same data in the same batches
        old["data"], old["batch_size"] = settings.get("data"), settings.get("batch_size")
    # the BatchNorm statistics' directions (states mode) are said with the directions below
    other_states = old.pop("buffer_directions") != settings.get("buffer_directions")
    differing = sorted(
        k
        for k in (set(old) | set(settings)) - {"buffer_directions"}
        if old.get(k) != settings.get(k)
    )
    if "params" in differing and "buffers" in differing:
        differing.remove("buffers")  # another model: its weights say it
    if differing == ["batch_size"] and isinstance(old["batch_size"], int):
        raise SharpscopeError(
            f"{path} holds a landscape computed in batches of {old['batch_size']} examples, "
            f"not {settings['batch_size']} (another batch size rounds each mean loss "
            f"differently): resume it with batch size {old['batch_size']}, or delete it or "
            "choose another output to start a new one"
        )
    if differing:
        raise SharpscopeError(
            f"{path} holds a landscape with different settings ({', '.join(differing)}); "
            "delete it or choose another output to start a new one"
        )
    shape = tuple(len(a) for a in axes)
    expected = {
        "loss": shape,
        "accuracy": shape,
        "computed": shape,
        "directions": (len(axes), num_params),
        "x": (shape[0],),
        "y": (shape[1],) if len(shape) == 2 else None,
    }
    for name, wanted in expected.items():
        array = getattr(previous, name)
        found = None if array is None else tuple(array.shape)
        if found != wanted:
            raise SharpscopeError(
                f"{path} holds a landscape whose {name} has shape {found}, not {wanted} as its "
                "settings say (a damaged or edited file); delete it or choose another output"
            )
    for name, axis, stored in zip("xy", axes, (previous.x, previous.y)):
        if not torch.equal(stored.double(), axis.double().cpu()):
            raise SharpscopeError(
                f"{path} holds a landscape whose {name} axis differs from the one its "
                "settings say (a damaged or edited file); delete it or choose another output"
            )
    if other_states or not _same_directions(previous.directions, directions):
        hint = _OTHER_DIRECTIONS.get(str(settings.get("direction_kind")), "")
        raise SharpscopeError(
            f"{path} holds a landscape along other directions{hint}; delete it or choose "
            "another output to start a new one"
        )
    return previous


def _checkpoint_source(source: Any) -> dict[str, Any] | None:
    """Path (absolute), epoch and sha256 of a loaded checkpoint; None for anything else
    (a model or state_dict given as it is records nothing)."""
    path, sha256 = getattr(source, "path", None), getattr(source, "sha256", None)
    if not isinstance(path, (str, Path)) or not isinstance(sha256, str):
        return None
    return {
        "path": str(Path(path).resolve()),
        "epoch": getattr(source, "epoch", None),
        "sha256": sha256,
    }


def _with_direction_sources(meta: RunMeta | None, directions: Any) -> RunMeta | None:
    """``meta`` with the checkpoints that give the directions, so that the file says which
    they were: an interpolation's second model as a study's pair files record it
    (``second_checkpoint``, ``second_sha256``), a PCA's checkpoints in the order of the
    ``trajectory`` rows (``trajectory_checkpoints``). Keys the caller set are kept."""
    if isinstance(directions, (list, tuple)):
        rows = [_checkpoint_source(c) for c in directions]
        found = {"trajectory_checkpoints": rows} if any(rows) else {}
    else:
        one = _checkpoint_source(directions)
        found = (
            {}
            if one is None
            else {"second_checkpoint": one["path"], "second_sha256": one["sha256"]}
        )
    if not found:
        return meta
    base = meta or RunMeta()
    return dataclasses.replace(base, extra={**found, **base.extra})


@vmap_or_loop
@ieee_float32()
@keeps_model_buffers
def landscape(
    model: nn.Module,
    data: Any,
    dims: int = 2,
    *,
    grid: int = 41,
    span: float = 1.0,
    directions: Any = "random",
    norm: DirectionNorm = "filter",
    bias: BiasMode = "ignore",
    states: bool | None = None,
    x: Any = None,
    y: Any = None,
    loss: Any = "cross_entropy",
    seed: int = 0,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    out: str | Path | None = None,
    save_every: float = 30.0,
    max_points: int | None = None,
    vectorize: bool | None = None,
    fold_bn: bool | None = None,
    precompute_input: bool | None = None,
    distributed: bool = False,
    meta: RunMeta | None = None,
    progress: Callable[[int], None] | None = None,
) -> LandscapeResult:
    """Loss and accuracy on a 1-D or 2-D slice through the model's weights.

    Args:
        model: the network θ* (left as found; eval mode). For interpolation it is θ_A;
            for PCA the final point θ_final.
        data: a pair of tensors, a Dataset, or an iterable of batches (the analysis set;
            the training split by default in the CLI).
        dims: 1 or 2.
        grid: points per axis, ≥ 3 (41; the reference scripts used 51, and 401 for
            interpolation). Default axes are evenly spaced and always contain the
            model (0) and, for interpolation, the second model (1), for any ``grid``.
        span: random/eigen axes are [−span, span] (for even ``grid``: the grid of
            ``grid + 1`` points without +span, e.g. −1, −0.5, 0, 0.5 for 4 points);
            interpolation's α-axis is about [−span/2, 1 + span/2] with step 1/m, m
            (the steps from 0 to 1) nearest to (grid − 1)/(1 + span), the other points
            half below 0 (the odd one) and half above 1 (``linspace(−0.5, 1.5, grid)``
            for span 1 and grid = 4k + 1, e.g. 41 or 401; −0.6 to 1.4 for 11), and its
            β-axis [−span, span]. PCA axes come from the trajectory, not from
            ``span``: the smallest uniform step through 0 (the final model) that
            covers the projected checkpoints with a 10% margin.
        directions: "random", "eigen", another model / state_dict / checkpoint
            (interpolation), or a list of them (PCA of a trajectory).
        norm: "filter" (Li et al.), "layer", "element" or "none" (random directions, and
            the second direction of a 2-D interpolation).
        bias: tensors with ≤ 1 dimension: "ignore" (zero direction; for PCA: left out),
            "keep" (direction = θ), "normalize" (each such tensor treated as one
            filter: under "filter"/"layer" it gets its whole weights' norm).
        states: move BatchNorm running statistics along the slice (interpolation only;
            default: on when the model has float buffers).
        x, y: explicit axis values (override ``grid``/``span``; used as given).
        loss: loss name, factory path or callable (mean loss).
        seed: seed of the random directions (and of the eigen solver).
        batch_size: examples per forward pass (None: all at once).
        chunk_size: grid points per block (default :func:`default_point_chunk`): one
            vectorized call, or that many loop iterations between writes and progress.
        out: a ``.npz`` (or ``.json``) file written incrementally, and with all the
            points finished when an exception (KeyboardInterrupt included) stops the
            run (the loop on CPU records each point; vmap and the GPU, each block);
            if it exists with the same settings, the run resumes and only computes
            the missing points.
        save_every: seconds between incremental writes after the first, which comes
            after the first block (0: after every block).
        max_points: compute about this many new points (rounded up to whole chunks),
            then return (``complete`` is then False; call again to continue).
        vectorize: evaluate several points per ``vmap(functional_call)``; False: a
            Python loop over points (the reference). None (default): on a GPU, vmap
            (the loop, with a warning, for a model vmap cannot trace) unless one point's
            forward pass over a batch already fills the GPU (:func:`vmap_pays_on_gpu`;
            the FLOPs counted are in ``meta.extra["forward_flops_per_call"]``); on CPU
            the loop, where the work per point is compute-bound and vmapped
            convolutions become slower grouped ones. README's performance tables give
            ``sharpscope bench landscape``'s figures for both (ResNet-20 on 1,024 CIFAR
            images: vmap 0.91x the loop on an H200; cnn1d on MNIST-1D, CPU: vmap 0.76x
            the loop, faster only with as few as 128 examples per point).
        fold_bn: evaluate a copy with each BatchNorm folded into the convolution or
            linear layer before it (:func:`sharpscope.curvature.fold.fold_batchnorm`;
            the same function in eval mode, checked on the first 64 examples; recorded
            in ``settings["bn_folded"]``). Default: fold, except for a loop asked for on
            CUDA (``vectorize=False``), where folding each point's weights costs more
            kernel launches than it saves (H200, ``bench landscape``: 0.66 vs 0.43 ms per
            point); the GPU loop that the default picks for large models folds, as vmap
            does, so that its settings do not depend on the GPU.
        precompute_input: for the loop: compute the output of each layer that reads the
            data (the first linear or convolution layer) once per batch for θ* and each
            direction, and at every point only their linear combination
            (:mod:`sharpscope.analysis.input_layer`; exact up to rounding, checked at θ*
            and the slice's extreme points; recorded in ``settings["input_layers"]``). Default:
            on for the loop when it pays, i.e. the layer's fan-in is at least 32 per
            stored output (an MLP on images: 4.4-4.9x the plain loop; not cnn1d or
            ResNet-20, whose first convolutions are cheaper than the combination), and
            the stored outputs take at most 2 GiB (not for the GPU loop the default
            picks, which keeps vmap's settings). True: whenever a layer qualifies. The
            vectorized path does not use it.
        distributed: True splits the points (and "eigen"'s products) across the
            processes of an initialized ``torch.distributed`` group (every rank must
            call); rank 0 writes ``out``, every rank returns the full result. False
            (default): this process alone, even inside a group (e.g. on rank 0 only).
        meta: provenance to extend. Directions given as loaded checkpoints
            (``sharpscope.load_checkpoint``) add what made them: an interpolation's
            ``meta.extra["second_checkpoint"]`` (absolute path) and ``["second_sha256"]``,
            a PCA's ``meta.extra["trajectory_checkpoints"]`` (``path``, ``epoch``,
            ``sha256`` per checkpoint, in the order of ``trajectory``'s rows; null for a
            model or state_dict given as it is).
        progress: called with the number of grid points finished (first with the points
            a resumed run already has), e.g. a progress bar's ``update``.

    Returns:
        :class:`LandscapeResult` (``meta.extra["points_evaluated"]``: points computed
        by this call; ``meta.extra["points_loaded"]``: points resumed from ``out``).

    Raises:
        SharpscopeError: dims not 1 or 2, grid < 3, span ≤ 0, an unknown norm, bias or
            direction, checkpoints of a different architecture, or an ``out`` file from
            a different run.
    """
    start = time.perf_counter()
    meta = _with_direction_sources(meta, directions)
    check(dims in (1, 2), f"dims must be 1 or 2, got {dims}")
    check(
        isinstance(grid, Integral) and not isinstance(grid, bool) and grid >= MIN_GRID,
        f"grid must be an integer of at least {MIN_GRID} points per axis, got {grid!r}",
    )
    check_numbers(span=span)
    check_integers(chunk_size=chunk_size, max_points=max_points)
    check_seed("seed", seed)
    check(span > 0, f"span must be > 0, got {span}")
    check(norm in NORMS, f"unknown norm '{norm}'; choose one of {', '.join(NORMS)}")
    check(bias in BIAS_MODES, f"unknown bias mode '{bias}'; choose one of {', '.join(BIAS_MODES)}")
    check(max_points is None or max_points >= 1, f"max_points must be >= 1, got {max_points}")
    check(chunk_size is None or chunk_size >= 1, f"chunk_size must be >= 1, got {chunk_size}")
    _check_grid_fits_memory(dims, grid, x, y)
    check(
        not (vectorize and precompute_input),
        "precompute_input is for the per-point loop (vectorize=False)",
    )
    loss_fn = resolve_loss(loss)
    dtype, device = model_dtype_device(model)
    warn_half_precision(dtype, "every grid point's loss")
    batches = fixed_batches(
        data, batch_size, device, why=" and a landscape evaluates one fixed data set at every point"
    )
    batches = [(b.to(dtype) if b.is_floating_point() else b, t) for b, t in batches]
    classification = is_classification(batches[0][1])
    layout = ParamLayout.of(model)
    check_model_loss(loss_fn, model, *batches[0], "the landscape")  # vmap, folded BN copies
    theta = flat_parameters(model, layout)
    rank, world = group_rank_and_size(distributed)
    path = Path(out) if out is not None else None

    with analysis_mode(model, batches[0][0]) as mode:
        resumable = _peek(path)
        if isinstance(directions, str) and directions == "eigen" and resumable is not None:
            # resuming: reuse the stored eigenvectors instead of solving again
            plan = DirectionPlan(
                "eigen",
                theta.double().cpu(),
                resumable.directions.double(),
                eigenvalues=resumable.eigenvalues,
            )
        else:
            plan = plan_directions(
                model,
                batches,
                layout,
                theta,
                directions,
                dims,
                norm=norm,
                bias=bias,
                states=states,
                seed=seed,
                loss=loss,
                distributed=distributed,
            )
        axes = _default_axes(plan, dims, grid, span)
        if x is not None:
            axes[0] = _axis(x, "x")
        if y is not None:
            check(dims == 2, "y values were given for a 1-D landscape")
            axes[1] = _axis(y, "y")
        shape = tuple(len(a) for a in axes)
        applied_norm: str = norm  # what was done to the directions, for the record
        if plan.kind in ("eigen", "pca"):
            applied_norm = "unit"  # eigenvectors, principal components: not scaled like θ
        elif plan.kind == "interpolation" and dims == 1:
            applied_norm = "none"  # θ_B − θ_A as it is
        trainable = set(layout.names)
        settings = {
            "dims": dims,
            "shape": list(shape),
            "axes": fingerprint(*axes),
            "direction_kind": plan.kind,
            "norm": applied_norm,
            "bias": bias,
            "states": plan.states,
            "seed": seed,
            "loss": loss_name(loss),
            "params": fingerprint(theta),
            # what else moves the losses: BatchNorm statistics and frozen parameters, and
            # in states mode the statistics' directions (checked with the directions)
            "buffers": fingerprint(
                *(
                    t
                    for n, t in model.state_dict().items()
                    if n not in trainable and t.is_floating_point()
                )
            ),
            "buffer_directions": fingerprint(*plan.buffer_direction.values()),
            "data": _data_fingerprint(batches),
            "batch_size": _batch_size(batches),
            "num_samples": sum(len(t) for _, t in batches),
        }
        flops_per_call = None
        defaulted = vectorize is None
        if vectorize is None:
            vectorize, flops_per_call = default_vectorize(model, batches, device, precompute_input)
        fold_default, precompute_default = _default_fold_and_precompute(
            device.type, vectorize, defaulted, precompute_input
        )
        if fold_bn is None:
            fold_bn = fold_default
        evaluator, pairs = (
            fold_batchnorm(model, batches[0][0][:64], check=True) if fold_bn else (model, [])
        )
        settings["bn_folded"] = [norm_name for _, norm_name in pairs]
        mesh = torch.cartesian_prod(*axes).reshape(-1, dims) if dims == 2 else axes[0].unsqueeze(-1)
        directions_dev = plan.directions.to(device, dtype)
        origin_dev = plan.origin.to(device, dtype)

        def precompute() -> PrecomputedInputLayers | None:
            if not (precompute_input or precompute_default):
                return None
            built, why_not = PrecomputedInputLayers.build(
                evaluator,
                layout,
                origin_dev,
                directions_dev,
                batches,
                folded=pairs,
                check_points=mesh[[0, -1]].to(device, dtype),
                min_fan_in=0 if precompute_input else None,
            )
            if built is None and precompute_input:
                warnings.warn(
                    f"the input layer is evaluated at every point: {why_not}",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return built

        precomputed = precompute()
        settings["input_layers"] = precomputed.names if precomputed is not None else []
        previous = (
            _load_partial(path, settings, axes, layout.size, plan.directions.to(dtype), batches)
            if path is not None
            else None
        )
        if previous is not None:
            plan.directions = previous.directions.double()
            if not torch.equal(plan.directions.to(device, dtype), directions_dev):
                directions_dev = plan.directions.to(device, dtype)
                precomputed = precompute()  # the stored directions, as before
            loss_grid = previous.loss.double().reshape(-1).clone()
            acc_grid = previous.accuracy.double().reshape(-1).clone()
            computed = previous.computed.reshape(-1) > 0.5  # earlier files held 0/1 floats
        else:
            loss_grid = torch.full(
                (int(torch.tensor(shape).prod()),), float("nan"), dtype=torch.float64
            )
            acc_grid = loss_grid.clone()
            computed = torch.zeros(len(loss_grid), dtype=torch.bool)
        loaded = int(computed.sum())
        if chunk_size is None:
            largest = max(len(t) for _, t in batches)
            chunk_size = default_point_chunk(layout.size, device, examples_per_call=largest)
        # Work comes in fixed blocks of consecutive grid indices, so every point is
        # evaluated in the same company whether the run is fresh, resumed or split
        # across processes (identical values, not just close ones). A block's weights
        # are always formed for all its rows together under vmap (a matmul over fewer
        # rows rounds differently), which then evaluates the whole block again; the loop
        # forms each point's weights alone (AffineRows) and evaluates only the
        # unfinished points.
        blocks = [
            idx
            for idx in torch.arange(len(computed)).split(min(chunk_size, max(1, len(computed))))
            if not bool(computed[idx].all())
        ]
        if max_points is not None:
            counts = torch.tensor([int((~computed[b]).sum()) for b in blocks]).cumsum(0)
            blocks = blocks[: int((counts < min(max_points, len(computed))).sum()) + 1]

        def snapshot(complete: bool) -> LandscapeResult:
            return _result(
                plan,
                axes,
                shape,
                loss_grid,
                acc_grid,
                computed,
                complete,
                settings,
                applied_norm,
                bias,
                loss,
                time.perf_counter() - start,
                loaded,
                with_data(meta, data),
                seed,
                dtype,
                device,
                mode,
                layout,
                vectorize,
                world,
                chunk_size,
                flops_per_call,
            )

        # A block that does not fit is split. The loop on CPU takes a block in one call
        # and records each point as it is done, so that an interrupt keeps every finished
        # point (on a GPU a block takes milliseconds, and recording a point would wait for
        # it); running out of memory there is final, as one point is all it holds.
        one_by_one = not vectorize and device.type != "cuda"
        fitting = FittingRows("grid points")

        def evaluate_rows(
            flat: Tensor | AffineRows, buffers: dict[str, Tensor], mine: Tensor, rows: slice
        ) -> tuple[Tensor, Tensor]:
            before_forward = None
            if precomputed is not None:  # the loop: flat is AffineRows
                coefficients = flat[rows].coefficients.tolist()

                def before_forward(row: int, batch: int) -> None:
                    precomputed.select(coefficients[row], batch)

            index = mine[rows]
            on_row = None
            if one_by_one:

                def on_row(row: int, value: float, accuracy: float) -> None:
                    at = int(index[row])
                    loss_grid[at], acc_grid[at], computed[at] = value, accuracy, True

            values, accs = evaluate_parameter_sets(
                evaluator if precomputed is None else precomputed.model,
                layout,
                flat[rows],
                batches,
                loss_fn,
                classification=classification,
                buffers={name: value[rows] for name, value in buffers.items()},
                vectorize=vectorize,
                before_forward=before_forward,
                on_row=on_row,
            )
            # recorded at once, for a snapshot on interrupt
            loss_grid[index], acc_grid[index], computed[index] = values, accs, True
            return values, accs

        def save(to: Path) -> None:
            nonlocal saved, last_save
            snapshot(bool(computed.all())).save(to)
            saved, last_save = int(computed.sum()), time.perf_counter()

        saved, last_save = loaded, -math.inf  # the first write comes after the first round

        if progress is not None:
            progress(int(computed.sum()))
        try:
            for round_start in range(0, len(blocks), world):
                round_blocks = blocks[round_start : round_start + world]
                # points of this round not done before it (vmap redoes a whole block)
                new = sum(int((~computed[b]).sum()) for b in round_blocks)
                block = (
                    round_blocks[rank]
                    if rank < len(round_blocks)
                    else torch.zeros(0, dtype=torch.long)
                )
                rows = (
                    (~computed[block]).nonzero().squeeze(1)
                    if one_by_one
                    else torch.arange(len(block))
                )
                mine = block[rows]
                if len(mine):
                    coords = mesh[block].to(device, dtype)
                    flat: Tensor | AffineRows
                    if vectorize:
                        flat = (origin_dev + coords @ directions_dev)[rows.to(device)]
                    else:  # one row at a time, without a (rows, P) block
                        skip = precomputed.unused if precomputed is not None else frozenset()
                        points = coords[rows.to(device)]
                        flat = AffineRows(layout, origin_dev, directions_dev, points, skip)
                    buffers = {
                        name: (
                            plan.buffer_origin[name]
                            + coords[:, :1].double().reshape(-1, *[1] * value.dim()) * value
                        ).to(dtype)[rows.to(device)]
                        for name, value in plan.buffer_direction.items()
                    }
                    try:
                        compute = functools.partial(evaluate_rows, flat, buffers, mine)
                        if one_by_one:  # one point at a time: fewer rows need no less memory
                            parts = [(slice(0, len(mine)), compute(slice(0, len(mine))))]
                        else:
                            parts = fitting.run(compute, 0, len(mine))
                    except Exception:
                        if int(computed.sum()) > loaded:
                            raise  # not the model: it ran on the points before
                        with model_errors(bool(vectorize)):  # one line, if it is the model
                            raise
                    values = torch.cat([result[0] for _, result in parts])
                    accs = torch.cat([result[1] for _, result in parts])
                else:
                    values = accs = torch.zeros(0, dtype=torch.float64)
                parts = [(mine.tolist(), values.tolist(), accs.tolist())]
                if world > 1:
                    gathered: list[Any] = [None] * world
                    with peers_checked():
                        dist.all_gather_object(gathered, parts[0])
                    parts = gathered
                for idx, vals, acc in parts:
                    index = torch.as_tensor(idx, dtype=torch.long)
                    loss_grid[index] = torch.as_tensor(vals, dtype=torch.float64)
                    acc_grid[index] = torch.as_tensor(acc, dtype=torch.float64)
                    computed[index] = True
                if progress is not None:
                    progress(new)
                last_round = round_start + world >= len(blocks)  # written below
                due = time.perf_counter() - last_save >= save_every
                if path is not None and rank == 0 and due and not last_round:
                    save(path)
        except BaseException:
            # an interrupt (or any error) keeps every point finished: a rerun resumes there
            if path is not None and rank == 0 and int(computed.sum()) > saved:
                try:
                    save(path)
                except Exception as exc:  # noqa: BLE001 - the original error matters more
                    warnings.warn(
                        f"could not write the partial landscape to {path}: {exc}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            raise
        result = snapshot(bool(computed.all()))
    if path is not None and rank == 0:
        result.save(path)
    if rank == 0:
        _warn_non_finite(result)
    return result


def _largest_step(result: LandscapeResult) -> float:
    """max |c_k · d_k[i]| over the grid's coordinates c and the directions' entries, in float64."""
    axes = [result.x] if result.y is None else [result.x, result.y]
    return max(
        float(axis.double().abs().max()) * float(direction.double().abs().max())
        for axis, direction in zip(axes, result.directions, strict=False)
    )


#: the advice for interpolated BatchNorm variances that turn negative (a study words its own)
STATES_ADVICE = "states=False / --no-states, or a smaller span"


def _warn_non_finite(result: LandscapeResult) -> None:
    """Say how many computed points have a non-finite loss, and the usual cause: weights that
    overflow the dtype at the grid's ends (too large a span: a step beyond the square root of
    the largest number, whose product with a like weight overflows), or interpolated BatchNorm
    variances that turn negative."""
    diverged = int((result.computed.bool() & ~torch.isfinite(result.loss)).sum())
    if diverged:
        step = _largest_step(result)
        largest = torch.finfo(result.directions.dtype).max
        if step > math.sqrt(largest):  # the product of two such weights overflows
            cause = (
                f" (a weight moves by up to {step:.3g} at the grid's ends, and "
                f"{str(result.directions.dtype).removeprefix('torch.')} overflows at "
                f"{largest:.3g}: use a smaller span)"
            )
        elif result.states:
            cause = (
                " (BatchNorm running variances moved with the weights turn negative beyond the "
                f"end points: {STATES_ADVICE})"
            )
        else:
            cause = ""
        warnings.warn(
            f"{diverged} point(s) gave a non-finite loss{cause}", RuntimeWarning, stacklevel=3
        )


# One grid point's forward pass over a batch fills a GPU from about this many FLOPs per
# streaming multiprocessor on; above it vmap's grouped convolutions run slower than the
# loop. Measured on an H200 (132 SMs; vmap/loop speed, 2-D grids, float32): 1.06-6.0x up to
# 42 GFLOP per point (cnn1d, mlp, cnn, vit, ResNet-20 with 128-512 examples, ResNet-56
# with 128), 0.72-0.92x from 84 GFLOP on (ResNet-20 with 1,024, ResNet-56 with 512,
# WRN-16-4 with 128). Other GPUs are assumed to saturate in proportion to their SMs, and
# float64 like float32 (measured in float32 only).
VMAP_MAX_FLOPS_PER_SM = 0.5e9


def forward_flops(model: nn.Module, x: Tensor, *, per_example: bool = False) -> float | None:
    """FLOPs of ``model(x)`` in eval mode: its matrix products and convolutions, counted by
    :class:`torch.utils.flop_counter.FlopCounterMode` (no gradients; the model's modes and
    BatchNorm statistics are left as found); divided by ``len(x)`` with ``per_example``.
    None when the pass fails or counts nothing.

    >>> forward_flops(nn.Linear(5, 3), torch.zeros(4, 5))  # 2 · 5 · 3 per example
    120.0
    """
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    except Exception:  # noqa: BLE001 - a model that cannot run on a few examples: no count
        return None
    total = float(counter.get_total_flops())
    if total <= 0:
        return None
    return total / len(x) if per_example else total


def default_vectorize(
    model: nn.Module,
    batches: Sequence[tuple[Tensor, Tensor]],
    device: torch.device,
    precompute_input: bool | None = None,
) -> tuple[bool, float | None]:
    """:func:`landscape`'s default path and the forward FLOPs per call it went by: the loop
    on CPU (and whenever ``precompute_input`` asks for the loop's precomputation); on a GPU
    vmap, unless :func:`vmap_pays_on_gpu` says one point's pass over the largest batch
    fills it (vmap too when the FLOPs cannot be counted)."""
    if device.type != "cuda" or precompute_input:
        return False, None
    per_example = forward_flops(model, batches[0][0][:4], per_example=True)
    if per_example is None:
        return True, None
    per_call = per_example * max(len(t) for _, t in batches)
    return vmap_pays_on_gpu(per_call, device), per_call


def _default_fold_and_precompute(
    device_type: str, vectorize: bool, defaulted: bool, precompute_input: bool | None
) -> tuple[bool, bool]:
    """The defaults of ``fold_bn`` and of precomputing the input layer (where it pays).

    The loop on CPU folds and precomputes; vmap folds. A loop asked for on CUDA
    (``vectorize=False``) does not fold (folding each point's weights costs more kernel
    launches than it saves) and precomputes where it pays, as on the CPU; an explicit
    ``precompute_input`` wins over the second value. The GPU loop that the FLOP count
    picks (:func:`default_vectorize`) keeps vmap's settings, so that a slice resumed on
    another GPU, which may choose the other path, is still the same slice.

    >>> _default_fold_and_precompute("cpu", False, True, None)
    (True, True)
    >>> _default_fold_and_precompute("cuda", False, True, None)  # the FLOP count's loop
    (True, False)
    >>> _default_fold_and_precompute("cuda", False, False, None)  # --no-vectorize
    (False, True)
    >>> _default_fold_and_precompute("cuda", False, True, True)  # precompute_input=True
    (False, False)
    """
    chosen_by_flops = defaulted and device_type == "cuda" and not vectorize and not precompute_input
    fold = vectorize or device_type != "cuda" or chosen_by_flops
    precompute = precompute_input is None and not vectorize and not chosen_by_flops
    return fold, precompute


def vmap_pays_on_gpu(flops_per_call: float, device: torch.device | str) -> bool:
    """Whether vmap over grid points beats the loop on the GPU ``device`` for a model
    whose forward pass over one batch takes ``flops_per_call``: while one point leaves the
    GPU idle (below :data:`VMAP_MAX_FLOPS_PER_SM` per multiprocessor)."""
    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    return flops_per_call <= VMAP_MAX_FLOPS_PER_SM * multiprocessors


def default_point_chunk(
    num_params: int, device: torch.device | None = None, *, examples_per_call: int = 1
) -> int:
    """Grid points per vectorized call: 8 on CPU, 64 on a GPU, with at most 2^24
    parameter entries and 2^16 examples (points × batch) per call."""
    cap = 8 if device is None or torch.device(device).type == "cpu" else 64
    by_params = 2**24 // max(1, num_params)
    by_examples = 2**16 // max(1, examples_per_call)
    return int(max(1, min(cap, by_params, by_examples)))


def _result(
    plan: DirectionPlan,
    axes: list[Tensor],
    shape: tuple[int, ...],
    loss_grid: Tensor,
    acc_grid: Tensor,
    computed: Tensor,
    complete: bool,
    settings: dict,
    norm: str,
    bias: str,
    loss: Any,
    seconds: float,
    loaded: int,
    meta: RunMeta | None,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    mode: str,
    layout: ParamLayout,
    vectorize: bool,
    world: int,
    chunk_size: int,
    flops_per_call: float | None,
) -> LandscapeResult:
    dirs = plan.directions
    cosine = None
    if len(dirs) == 2:  # NaN for a zero direction: it has no angle
        norms = dirs[0].norm() * dirs[1].norm()
        cosine = float(dirs[0] @ dirs[1] / norms) if norms > 0 else float("nan")
    return LandscapeResult(
        x=axes[0].clone(),
        y=axes[1].clone() if len(axes) == 2 else None,
        loss=loss_grid.reshape(shape).clone(),
        accuracy=acc_grid.reshape(shape).clone(),
        computed=computed.reshape(shape).clone(),
        directions=dirs.to(dtype).cpu(),
        direction_kind=plan.kind,
        norm=norm,
        bias=bias,
        states=plan.states,
        cosine=cosine,
        direction_norms=[float(d.norm()) for d in dirs],
        eigenvalues=plan.eigenvalues,
        explained_variance_ratio=plan.explained,
        trajectory=plan.trajectory,
        complete=complete,
        settings=settings,
        loss_name=loss_name(loss),
        seconds=seconds,
        meta=analysis_meta(
            meta,
            num_samples=settings["num_samples"],
            seed=seed,
            dtype=dtype,
            device=device,
            mode=mode,
            num_params=layout.size,
            extra={
                "vectorized": vectorize,
                # what the GPU default went by (None: not counted)
                "forward_flops_per_call": flops_per_call,
                "chunk_size": chunk_size,
                "processes": world,
                "points_loaded": loaded,
                "points_evaluated": int(computed.sum()) - loaded,
                "bn": "running statistics (eval mode)"
                + ("; moved with the weights (states)" if plan.states else ""),
            },
        ),
    )


def landscape_slice_1d(model: nn.Module, data: Any, **options: Any) -> LandscapeResult:
    """:func:`landscape` with ``dims=1``."""
    return landscape(model, data, 1, **options)


def landscape_slice_2d(model: nn.Module, data: Any, **options: Any) -> LandscapeResult:
    """:func:`landscape` with ``dims=2``."""
    return landscape(model, data, 2, **options)


__all__ = [
    "LandscapeResult",
    "default_point_chunk",
    "default_vectorize",
    "forward_flops",
    "landscape",
    "landscape_slice_1d",
    "landscape_slice_2d",
    "normalize_direction",
    "random_direction",
    "vmap_pays_on_gpu",
]
