r"""Precompute the layers that read the data, once for a whole loss-landscape slice.

A linear or convolution layer is affine in its own parameters, :math:`z(x; W, b) = W * x + b`.
Along a slice :math:`\theta = \theta_0 + \sum_k c_k d_k` (random, eigen, interpolation and
PCA directions alike) its weights are :math:`W_0 + \sum_k c_k D_k` and its bias
:math:`b_0 + \sum_k c_k e_k`, so when its input :math:`x` does not depend on the network's
parameters (the first layer, which reads the data), its output at every grid point is

.. math:: z(\theta) = z(x; W_0, b_0) + \sum_k c_k \, z(x; D_k, e_k).

The K + 1 outputs on the right are computed once per batch of data; each grid point then
costs a linear combination of them (K + 1 elementwise passes) instead of the layer
itself. A BatchNorm folded into the layer (:mod:`sharpscope.curvature.fold`) is applied
to the combination with the point's own scale and shift, so BatchNorm parameters and
running statistics that move along the slice are honoured. It pays where the layer's
fan-in is large next to the K + 1 stored values read per output: an MLP on images
(``sharpscope bench landscape``: 4.4-4.9x the plain loop on CPU), not a first convolution
with a handful of inputs per output (``cnn1d``, ResNet-20), which the default leaves alone.

Which layers qualify is found, not assumed: a stock ``nn.Linear`` or ``nn.Conv1d/2d/3d``
(exact type, no hooks of its own, a trainable weight held as a plain parameter) that runs
once per forward pass and receives bit-identical input when every parameter and float
buffer of the model is changed. The precomputed model is then checked against the
ordinary one at θ₀ and the slice's extreme grid points before it is used.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..curvature.fold import FOLDABLE_LAYERS, batchnorm_affine, tensor_sharing_copy
from ._functional import ParamLayout, float_buffers, tensors_swapped

__all__ = ["MAX_BASIS_BYTES", "PrecomputedInputLayers", "fan_in", "find_input_layers"]

# Largest memory the K + 1 stored outputs may take, over all batches. A fixed bound, not
# a share of the free memory, so that whether a slice is precomputed (recorded in its
# settings) does not change when an interrupted run resumes on a busier machine.
MAX_BASIS_BYTES = 2 * 1024**3
# relative agreement of the precomputed model's outputs with the ordinary model's
CHECK_RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
# A layer is worth precomputing when each output costs many multiply-adds (its fan-in)
# next to the K + 1 stored values the combination reads for it. Measured per point (one
# CPU thread, 2-D slices, the layer's weights still formed at every point): fan-in 784
# and 3072 (MLPs on images) 1.4x and 1.8x faster; fan-in 40 (MNIST-1D MLP) no change;
# fan-in 5 (cnn1d) and 27 (ResNet-20's first convolution) slower (0.9x). Hence at least
# 32 per stored term. (With those weights left unformed, ``bench landscape``'s fan-in
# 3072 MLP runs 4.4-4.9x the plain loop.)
FAN_IN_PER_TERM = 32


class _Captured(Exception):
    """Stops a forward pass once the input layers have seen their inputs."""


def _candidates(model: nn.Module, layout: ParamLayout, folded: set[str]) -> dict[str, nn.Module]:
    names = set(layout.names)
    found = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if (
            type(module) in FOLDABLE_LAYERS
            and not module._forward_hooks
            and not module._forward_pre_hooks
            and ("forward" not in vars(module) or name in folded)  # fold's own forward only
            and f"{prefix}weight" in names
        ):
            found[name] = module
    return found


def _layer_inputs(
    model: nn.Module, layers: dict[str, nn.Module], x: Tensor, *, whole_pass: bool
) -> dict[str, list[Tensor | None]]:
    """The inputs each of ``layers`` receives when ``model`` runs on ``x`` (no gradients).

    ``whole_pass``: run the whole forward pass and keep a copy of every call's input (None
    for a call whose input is not one tensor); else stop the pass once every layer has
    had its first input, and keep that tensor itself.
    """
    seen: dict[str, list[Tensor | None]] = {name: [] for name in layers}
    handles = []
    for name, layer in layers.items():

        def record(module: nn.Module, inputs: tuple, name: str = name) -> None:
            one = len(inputs) == 1 and isinstance(inputs[0], Tensor)
            if whole_pass:
                seen[name].append(inputs[0].detach().clone() if one else None)
            else:
                seen[name].append(inputs[0])
                if all(seen.values()):
                    raise _Captured

        handles.append(layer.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(x)
    except _Captured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def find_input_layers(
    model: nn.Module, layout: ParamLayout, example: Tensor, folded: Sequence[str] = ()
) -> list[str]:
    """Names of the layers of ``model`` whose input does not depend on its parameters.

    Runs ``model`` (in the mode it is in) twice on ``example``: as it is, and with every
    parameter and floating-point buffer t replaced by 1.25 t + 0.125. A stock linear or
    convolution layer with a trainable weight qualifies when it runs once in each pass
    and its two inputs are identical. ``folded``: layers into which
    :func:`~sharpscope.curvature.fold.fold_batchnorm` folded a BatchNorm (their
    ``forward`` is replaced).
    """
    layers = _candidates(model, layout, set(folded))
    if not layers:
        return []
    try:
        before = _layer_inputs(model, layers, example, whole_pass=True)
        tensors = {**dict(model.named_parameters()), **float_buffers(model)}
        with tensors_swapped(model, list(tensors)) as load:
            load({name: t.detach() * 1.25 + 0.125 for name, t in tensors.items()})
            after = _layer_inputs(model, layers, example, whole_pass=True)
    except Exception:  # noqa: BLE001 - a model that fails here is left to the ordinary path
        return []
    return [
        name
        for name in layers
        if len(before[name]) == 1
        and len(after[name]) == 1
        and before[name][0] is not None
        and after[name][0] is not None
        and torch.equal(before[name][0], after[name][0])
    ]


def fan_in(layer: nn.Module) -> int:
    """Multiply-adds per output value of a linear or convolution layer."""
    if isinstance(layer, nn.Linear):
        return layer.in_features
    return layer.in_channels // layer.groups * math.prod(layer.kernel_size)


def _affine(layer: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, bias)
    return layer._conv_forward(x, weight, bias)


@dataclass
class PrecomputedInputLayers:
    """A copy of a model whose input layers return precomputed outputs along a slice.

    Build it with :meth:`build`; before each forward pass of :attr:`model` on batch ``b``
    at the point θ₀ + Σ c_k d_k, call :meth:`select` with ``(c, b)``.

    Attributes:
        model: the copy (it shares every parameter and buffer with the original).
        names: the precomputed layers.
        basis_bytes: memory taken by the stored outputs.
        unused: the trainable tensors of those layers that no other module holds: the
            copy computes the same at any value of them, so a point need not form them
            (checked with them set to NaN).
    """

    model: nn.Module
    names: list[str]
    basis_bytes: int
    unused: frozenset[str] = frozenset()
    _basis: dict[str, list[Tensor]] = field(default_factory=dict, repr=False)
    _coefficients: list[float] = field(default_factory=list, repr=False)
    _batch: int = 0

    @classmethod
    def build(
        cls,
        model: nn.Module,
        layout: ParamLayout,
        origin: Tensor,
        directions: Tensor,
        batches: Sequence[tuple[Tensor, Tensor]],
        *,
        folded: Sequence[tuple[str, str]] = (),
        check_points: Tensor | None = None,
        max_bytes: int = MAX_BASIS_BYTES,
        min_fan_in: int | None = None,
    ) -> tuple[PrecomputedInputLayers | None, str]:
        """The precomputed copy of ``model`` for the slice ``origin + c @ directions``.

        Args:
            model: the network to evaluate (possibly a BatchNorm-folded copy; not changed).
            layout: where each trainable tensor sits in ``origin`` and ``directions``.
            origin: ``(P,)`` centre θ₀ of the slice; directions: ``(K, P)``.
            batches: the data, as the evaluation will go through it.
            folded: ``(layer, BatchNorm)`` pairs folded in ``model``.
            check_points: ``(M, K)`` coefficients at which (and at θ₀) the copy must
                reproduce ``model``'s outputs on the first 64 examples (relative 1e-10 in
                float64, 1e-4 in float32), with the ``unused`` tensors set to NaN.
            max_bytes: give up when the stored outputs would take more.
            min_fan_in: leave out layers with a smaller :func:`fan_in` (default
                ``FAN_IN_PER_TERM * (K + 1)``, where precomputing starts to pay; 0 takes
                every qualifying layer).

        Returns:
            ``(precomputed, "")``, or ``(None, reason)`` when no layer qualifies or pays, the
            outputs would not fit in ``max_bytes`` or the check fails.
        """
        example = batches[0][0][:64]
        norms = dict(folded)
        names = find_input_layers(model, layout, example, list(norms))
        if not names:
            return None, "no linear or convolution layer reads the data directly"
        if min_fan_in is None:
            min_fan_in = FAN_IN_PER_TERM * (len(directions) + 1)
        modules = dict(model.named_modules())
        small = [n for n in names if fan_in(modules[n]) < min_fan_in]
        names = [n for n in names if n not in small]
        if not names:
            return None, (
                f"the input layer {small[0]} has fan-in {fan_in(modules[small[0]])}, "
                f"under the {min_fan_in} where precomputing pays"
            )
        copy = tensor_sharing_copy(model)
        modules = dict(copy.named_modules())
        layers = {n: modules[n] for n in names}
        with torch.no_grad():
            outputs = {
                n: _affine(layers[n], x, layers[n].weight, None)
                for n, (x, *_) in _layer_inputs(copy, layers, example, whole_pass=False).items()
            }
        per_example = sum(z.numel() for z in outputs.values()) / len(example)
        examples = sum(len(x) for x, _ in batches)
        needed = int(per_example * examples) * (len(directions) + 1) * origin.element_size()
        if needed > max_bytes:
            return None, (
                f"the input layers' outputs would take {needed / 2**20:.0f} MiB "
                f"(at most {max_bytes / 2**20:.0f} MiB)"
            )
        trainable = set(layout.names)
        holders: dict[int, int] = {}
        for module in copy.modules():
            for tensor in module._parameters.values():
                holders[id(tensor)] = holders.get(id(tensor), 0) + 1
        unused = frozenset(
            f"{name}.{kind}"
            for name in names
            for kind in ("weight", "bias")
            if f"{name}.{kind}" in trainable and holders[id(getattr(layers[name], kind))] == 1
        )
        built = cls(copy, names, needed, unused)
        built._coefficients = [0.0] * len(directions)
        centre = layout.unflatten(origin)
        steps = [layout.unflatten(d) for d in directions]
        built._basis = {n: [] for n in names}
        for x, _ in batches:
            with torch.no_grad():
                captured = _layer_inputs(copy, layers, x, whole_pass=False)
                for name, (inputs, *_) in captured.items():
                    layer, weight, bias = layers[name], f"{name}.weight", f"{name}.bias"
                    moving_bias = bias in trainable
                    terms = [
                        _affine(
                            layer,
                            inputs,
                            centre[weight],
                            centre[bias] if moving_bias else layer.bias,
                        )
                    ]
                    terms += [
                        _affine(layer, inputs, step[weight], step[bias] if moving_bias else None)
                        for step in steps
                    ]
                    built._basis[name].append(torch.stack(terms))
        for name, layer in layers.items():
            layer.forward = functools.partial(built._forward, name, norms.get(name), modules)
        agrees = check_points is None or built._agrees(
            model, layout, origin, directions, check_points, example
        )
        if not agrees:
            return None, "the precomputed outputs did not reproduce the model's"
        return built, ""

    def select(self, coefficients: Sequence[float], batch: int) -> None:
        """Evaluate the next forward pass at θ₀ + Σ c_k d_k on batch number ``batch``."""
        self._coefficients = [float(c) for c in coefficients]
        self._batch = batch

    def _forward(
        self, name: str, norm_name: str | None, modules: dict[str, nn.Module], x: Tensor
    ) -> Tensor:
        basis = self._basis[name][self._batch]
        if len(x) != basis.shape[1]:
            raise RuntimeError(
                f"precomputed layer {name} was given {len(x)} examples; batch "
                f"{self._batch} has {basis.shape[1]}"
            )
        first, *rest = self._coefficients  # a slice has one direction at least
        out = torch.add(basis[0], basis[1], alpha=first)
        for c, term in zip(rest, basis[2:], strict=True):
            out.add_(term, alpha=c)
        if norm_name is None:
            return out
        scale, shift = batchnorm_affine(modules[norm_name])
        shape = (-1, *([1] * (out.dim() - 2)))
        return out.mul_(scale.reshape(shape)).add_(shift.reshape(shape))

    def _agrees(
        self,
        model: nn.Module,
        layout: ParamLayout,
        origin: Tensor,
        directions: Tensor,
        points: Tensor,
        example: Tensor,
    ) -> bool:
        basis = {n: b[0] for n, b in self._basis.items()}
        held = self._basis
        self._basis = {n: [b[:, : len(example)]] for n, b in basis.items()}
        try:
            # the loop leaves the unused tensors as they are: NaN proves nothing reads them
            poison = {
                name: torch.full_like(value, float("nan"))
                for name, value in layout.unflatten(origin).items()
                if name in self.unused
            }
            rtol = CHECK_RTOL.get(origin.dtype, 1e-2)
            points = torch.cat([torch.zeros_like(points[:1]), points])  # θ₀: finite outputs
            with torch.no_grad(), tensors_swapped(model, layout.names) as load:
                for point in points:
                    load(layout.unflatten(origin + point.to(directions) @ directions))
                    expected = model(example)
                    load(poison)
                    self.select(point.tolist(), 0)
                    found = self.model(example)
                    if not (isinstance(expected, Tensor) and isinstance(found, Tensor)):
                        return False
                    finite = expected[torch.isfinite(expected)]
                    scale = float(finite.abs().max()) if finite.numel() else 0.0
                    tolerance = {"rtol": rtol, "atol": rtol * scale, "equal_nan": True}
                    if not torch.allclose(found, expected, **tolerance):
                        return False
        finally:
            self._basis = held
            self.select([0.0] * len(directions), 0)
        return True
