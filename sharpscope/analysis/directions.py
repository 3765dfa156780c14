"""Directions of a loss-landscape slice (Li et al., 2018, arXiv:1712.09913; analysis.md §6).

* random: seeded N(0, 1), then scaled like the weights (:func:`normalize_direction`:
  per filter d_slice·‖θ_slice‖/(‖d_slice‖ + 1e-10), per layer, per element or none;
  tensors with ≤ 1 dimension ignored, kept or normalized);
* eigen: the top Hessian eigenvectors (unit norm);
* interpolation: θ_B − θ_A, with BatchNorm running statistics moving alike ("states");
* PCA: the first principal components of a trajectory's θ_t − θ, with each checkpoint
  projected onto them by least squares.

:func:`plan_directions` turns the ``directions`` argument of
:func:`sharpscope.analysis.landscape.landscape` into a :class:`DirectionPlan`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from ..errors import SharpscopeError, check
from ._functional import ParamLayout, float_buffers, seeded_generator

DirectionNorm = Literal["filter", "layer", "element", "none"]
BiasMode = Literal["ignore", "keep", "normalize"]
NORMS = get_args(DirectionNorm)
BIAS_MODES = get_args(BiasMode)
FILTER_EPS = 1e-10  # Li et al.'s guard in d·‖θ‖/(‖d‖ + ε)


def normalize_direction(
    direction: Tensor, theta: Tensor, layout: ParamLayout, norm: str, bias: str
) -> Tensor:
    """Scale a flat direction like the weights (Li et al. 2018, §4; analysis.md §6).

    Args:
        direction: ``(P,)`` raw direction.
        theta: ``(P,)`` the weights it is normalized against.
        layout: the tensors of the flat vector.
        norm: "filter" (each slice along the first axis gets its weight slice's norm),
            "layer" (each tensor gets its tensor's norm), "element" (d ⊙ |θ|), "none".
        bias: tensors with ≤ 1 dimension: "ignore" (zero), "keep" (copy θ), "normalize"
            (each tensor treated as one filter: under "filter"/"layer", d·‖θ‖/(‖d‖ + 1e-10)
            over the whole tensor).

    Returns:
        The normalized ``(P,)`` direction.

    >>> layout = ParamLayout.of(nn.Linear(2, 2))
    >>> theta = torch.tensor([3.0, 4.0, 0.0, 1.0, 5.0, 6.0])
    >>> d = normalize_direction(torch.ones(6), theta, layout, "filter", "ignore")
    >>> [round(v, 4) for v in d.tolist()]  # rows get the norms 5 and 1; the bias is zero
    [3.5355, 3.5355, 0.7071, 0.7071, 0.0, 0.0]
    """
    out = torch.empty_like(direction)
    for _, shape, sl in layout.slices():
        if sl.stop == sl.start:
            continue  # a tensor with no entries (a zero-width layer)
        d, w = direction[sl].view(shape), theta[sl].view(shape)
        if len(shape) <= 1:
            if bias == "ignore":
                out[sl] = 0
                continue
            if bias == "keep":
                out[sl] = w.reshape(-1)
                continue
            d, w = d.reshape(1, -1), w.reshape(1, -1)
        if norm == "filter":
            rows_d, rows_w = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
            scale = rows_w.norm(dim=1, keepdim=True) / (
                rows_d.norm(dim=1, keepdim=True) + FILTER_EPS
            )
            out[sl] = (rows_d * scale).reshape(-1)
        elif norm == "layer":
            out[sl] = (d * (w.norm() / (d.norm() + FILTER_EPS))).reshape(-1)
        elif norm == "element":
            out[sl] = (d * w.abs()).reshape(-1)
        else:
            out[sl] = d.reshape(-1)
    return out


def random_direction(
    theta: Tensor, layout: ParamLayout, *, seed: int, index: int, norm: str, bias: str
) -> Tensor:
    """A seeded N(0, 1) direction, normalized by :func:`normalize_direction` (float64, CPU).

    Direction ``index`` of a given ``seed`` is the same on every device and in every run.
    """
    raw = torch.randn(layout.size, generator=seeded_generator(seed, index), dtype=torch.float64)
    direction = normalize_direction(raw, theta.double().cpu(), layout, norm, bias)
    if not bool(direction.any()):
        if bias == "ignore" and all(len(shape) <= 1 for shape in layout.shapes):
            raise SharpscopeError(
                "every trainable tensor has at most one dimension (biases, scales), and "
                "bias='ignore' leaves those out, so the direction is zero: use "
                "bias='normalize' (or 'keep')"
            )
        raise SharpscopeError(
            f"the {norm}-normalized random direction is zero: the weights it is scaled to "
            "are zero; use norm='none'"
        )
    return direction


def check_same_model(model: nn.Module, directions: Any) -> None:
    """Refuse in one line, before any work, a second model (interpolation) or a trajectory
    checkpoint (PCA) whose parameters are not ``model``'s (names and shapes); the landscape
    reads them again where it builds its directions. Named directions pass.
    """
    if isinstance(directions, (str, Tensor)):
        return
    layout = ParamLayout.of(model)
    if isinstance(directions, (list, tuple)):
        for i, t in enumerate(directions):
            _params_of(t, layout, f"trajectory checkpoint {getattr(t, 'path', None) or i}")
    else:
        _params_of(directions, layout, "the second model")


def _params_of(source: Any, layout: ParamLayout, what: str) -> tuple[Tensor, dict[str, Tensor]]:
    """Flat trainable parameters and float buffers of a model, state_dict or checkpoint."""
    if hasattr(source, "model") and isinstance(source.model, nn.Module):
        source = source.model  # a sharpscope Checkpoint
    if isinstance(source, nn.Module):
        tensors = dict(source.state_dict(keep_vars=False))
    elif isinstance(source, Mapping):
        tensors = dict(source.get("state_dict", source))
    else:
        raise SharpscopeError(
            f"{what} must be a model, a state_dict or a loaded checkpoint "
            f"(sharpscope.load_checkpoint(path)), got {type(source).__name__}"
        )
    for name, shape in zip(layout.names, layout.shapes):
        if name not in tensors:
            raise SharpscopeError(
                f"{what} has a different architecture: it has no parameter '{name}'; "
                "interpolation and PCA need checkpoints of the same model"
            )
        if tuple(tensors[name].shape) != tuple(shape):
            raise SharpscopeError(
                f"{what} has a different architecture: parameter '{name}' has shape "
                f"{tuple(tensors[name].shape)}, expected {tuple(shape)}; interpolation and "
                "PCA need checkpoints of the same model"
            )
    flat = layout.flatten({n: tensors[n].detach() for n in layout.names})
    buffers = {n: t.detach() for n, t in tensors.items() if n not in layout.names}
    return flat.double().cpu(), buffers


@dataclass
class DirectionPlan:
    """The slice's origin θ and directions, in float64 on the CPU, and what goes with them:
    BatchNorm statistics that move along an interpolation ("states"), the eigenvalues of
    eigen directions, a PCA's explained-variance ratios and its checkpoints' coordinates."""

    kind: str
    origin: Tensor  # (P,) float64
    directions: Tensor  # (dims, P) float64
    states: bool = False
    buffer_origin: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    buffer_direction: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    eigenvalues: Tensor | None = None
    explained: Tensor | None = None
    trajectory: Tensor | None = None


def _pca_plan(
    model_theta: Tensor, trajectory: Sequence[Any], layout: ParamLayout, dims: int, bias: str
) -> DirectionPlan:
    check(len(trajectory) >= dims, f"a PCA trajectory needs at least {dims} checkpoints")
    rows = torch.stack(
        [
            _params_of(t, layout, f"trajectory checkpoint {getattr(t, 'path', None) or i}")[0]
            for i, t in enumerate(trajectory)
        ]
    )
    # a component at the rounding level of the stored weights (about eps·‖θ_t‖ per
    # checkpoint: a float32 trajectory on a line has s₂/s₁ ~ 1e-7) is empty
    eps = torch.finfo(model_theta.dtype).eps if model_theta.is_floating_point() else 0.0
    rounding = 10 * eps * math.sqrt(len(rows)) * float(rows.norm(dim=1).max())
    rows = rows - model_theta.double().cpu()
    if bias == "ignore":  # Li et al.'s "ignore biasbn": 1-D tensors take no part
        rows = rows * layout.matrix_mask().double()
    centered = rows - rows.mean(dim=0, keepdim=True)
    _, singular, vh = torch.linalg.svd(centered, full_matrices=False)
    floor = max(1e-8 * float(singular[0]), rounding)
    check(
        len(singular) >= dims and float(singular[dims - 1]) > floor,
        f"the trajectory spans fewer than {dims} dimensions; PCA needs more distinct checkpoints"
        + (
            " (1-D tensors, biases and norm weights, are left out with bias='ignore'; "
            "bias='keep' takes them in)"
            if bias == "ignore"
            else ""
        ),
    )
    variance = singular.pow(2)
    directions = vh[:dims]
    coords = torch.linalg.lstsq(directions.T, rows.T).solution.T  # (T, dims)
    return DirectionPlan(
        "pca",
        model_theta.double().cpu(),
        directions,
        explained=variance[:dims] / variance.sum(),
        trajectory=coords,
    )


def plan_directions(
    model: nn.Module,
    batches: list[tuple[Tensor, Tensor]],
    layout: ParamLayout,
    theta: Tensor,
    directions: Any,
    dims: int,
    *,
    norm: str,
    bias: str,
    states: bool | None,
    seed: int,
    loss: Any,
    distributed: bool = False,
) -> DirectionPlan:
    """The plan for ``directions``: "random", "eigen", another model or state_dict
    (interpolation) or a list of them (PCA); see :func:`sharpscope.analysis.landscape.landscape`."""
    theta64 = theta.double().cpu()
    if isinstance(directions, str) and directions == "random":
        check(not states, "states mode moves BatchNorm statistics; it is for interpolation only")
        dirs = [
            random_direction(theta, layout, seed=seed, index=i, norm=norm, bias=bias)
            for i in range(dims)
        ]
        return DirectionPlan("random", theta64, torch.stack(dirs))
    if isinstance(directions, str) and directions == "eigen":
        check(not states, "states mode moves BatchNorm statistics; it is for interpolation only")
        check(
            dims <= theta.numel(),
            f"directions='eigen' with dims={dims} needs {dims} Hessian eigenvectors, but the "
            f"model has {theta.numel()} trainable parameter(s): use dims=1 or random directions",
        )
        from .spectrum import top_eigenvalues

        eig = top_eigenvalues(
            model,
            batches,
            k=dims,
            loss=loss,
            seed=seed,
            return_eigenvectors=True,
            distributed=distributed,
        )
        vectors = eig.eigenvectors.double().cpu()
        vectors = vectors / vectors.norm(dim=1, keepdim=True)
        return DirectionPlan("eigen", theta64, vectors, eigenvalues=eig.eigenvalues.double().cpu())
    if isinstance(directions, str):
        file = (
            " (a file path: pass sharpscope.load_checkpoint(path), or its .model)"
            if directions.endswith((".pt", ".pth", ".ckpt", ".bin")) or "/" in directions
            else ""
        )
        raise SharpscopeError(
            f"unknown directions '{directions}'{file}: use 'random', 'eigen', another model, "
            "state_dict or loaded checkpoint (interpolation) or a list of them (PCA of a "
            "trajectory)"
        )
    if isinstance(directions, (list, tuple)):
        check(not states, "states mode moves BatchNorm statistics; it is for interpolation only")
        return _pca_plan(theta, directions, layout, dims, bias)
    other, other_buffers = _params_of(directions, layout, "the second model")
    trainable = set(layout.names)
    for name, p in model.named_parameters():
        theirs = other_buffers.get(name)
        if name in trainable or theirs is None or theirs.shape != p.shape:
            continue
        if not torch.equal(p.detach().cpu(), theirs.detach().cpu().to(p.dtype)):
            warnings.warn(
                f"the frozen parameter '{name}' (requires_grad=False) differs between the two "
                "models; only trainable parameters are interpolated, so it keeps the first "
                "model's value and the end point alpha = 1 is not the second model",
                RuntimeWarning,
                stacklevel=3,
            )
            break
    own_buffers = float_buffers(model)
    if states is None:
        states = bool(own_buffers)
    plan = DirectionPlan(
        "interpolation", theta64, (other - theta64).unsqueeze(0), states=bool(states)
    )
    if states:
        for name, value in own_buffers.items():
            if name not in other_buffers or other_buffers[name].shape != value.shape:
                raise SharpscopeError(
                    f"the second model has a different architecture: buffer '{name}' differs; "
                    "interpolation needs checkpoints of the same model"
                )
            plan.buffer_origin[name] = value.detach().double()
            plan.buffer_direction[name] = (
                other_buffers[name].to(value.device).double() - value.double()
            )
    moving = [d for d in plan.buffer_direction.values() if bool(d.any())]
    check(
        bool(plan.directions.any()) or bool(moving),
        "the second model holds the same trainable weights"
        + (" and statistics" if states else "")
        + " as the first: the interpolation between them is a single point",
    )
    if dims == 2:
        second = random_direction(theta, layout, seed=seed, index=1, norm=norm, bias=bias)
        plan.directions = torch.cat([plan.directions, second.unsqueeze(0)])
    return plan


__all__ = [
    "BIAS_MODES",
    "NORMS",
    "BiasMode",
    "DirectionNorm",
    "DirectionPlan",
    "normalize_direction",
    "plan_directions",
    "random_direction",
]
