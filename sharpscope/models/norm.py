"""Normalization layers by name, and the option checking shared by the model zoo.

Every normalization layer the zoo builds is a stock PyTorch module, so code that finds
norm layers by module type (SAM-ON's set ``N``, BatchNorm handling in the two-pass
optimizers, ``eval()``-mode analysis) sees all of them:

========  ========================  ==========================================
name      on features ``(N, F)``    on conv features ``(N, C, L)``/``(N, C, H, W)``
========  ========================  ==========================================
batch     ``nn.BatchNorm1d(F)``     ``nn.BatchNorm1d(C)`` / ``nn.BatchNorm2d(C)``
layer     ``nn.LayerNorm(F)``       ``nn.GroupNorm(1, C)``
group     ``nn.GroupNorm(G, F)``    ``nn.GroupNorm(G, C)``, ``G = num_groups(C)``
none      ``nn.Identity()``         ``nn.Identity()``
========  ========================  ==========================================

"layer" on conv features is ``GroupNorm(1, C)``: per example, mean and variance over
all of ``(C, *spatial)`` -- layer normalization as defined by Ba et al. (2016) -- with a
per-channel scale and shift (Wu & He, 2018, Sec. 3.1 call this the LN limit of GN).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import SharpscopeError, caller_level

NORM_CHOICES: tuple[str, ...] = ("batch", "layer", "group", "none")

#: The zoo's normalization types (what ``norm_layer`` can return). :func:`is_norm_layer`
#: counts InstanceNorm and RMSNorm as well, as SAM-ON's set ``N`` does.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
)

#: Upper bound on the number of groups, the default of Wu & He (2018).
MAX_GROUPS = 32


def num_groups(num_channels: int) -> int:
    """Groups used by ``norm="group"``: the largest divisor of C that is at most 32
    and leaves at least two channels per group (one channel per group would be
    instance normalization).

    >>> [num_groups(c) for c in (16, 32, 64, 160, 640, 3)]
    [8, 16, 32, 32, 32, 1]
    """
    limit = min(MAX_GROUPS, max(1, num_channels // 2))
    return max(g for g in range(1, limit + 1) if num_channels % g == 0)


def norm_layer(kind: str, num_features: int, *, spatial_dims: int) -> nn.Module:
    """A normalization layer for ``num_features`` features or channels.

    Args:
        kind: "batch", "layer", "group" or "none" (see the module table).
        num_features: F for vector features, C for conv features.
        spatial_dims: 0 for ``(N, F)`` inputs, 1 for ``(N, C, L)``, 2 for ``(N, C, H, W)``.

    Returns:
        A stock ``nn`` module; ``nn.Identity`` for "none".

    Raises:
        SharpscopeError: for an unknown ``kind``.

    >>> layer = norm_layer("layer", 8, spatial_dims=2)
    >>> type(layer).__name__, layer.num_groups, layer.num_channels
    ('GroupNorm', 1, 8)
    """
    if spatial_dims not in (0, 1, 2):
        raise ValueError(f"spatial_dims must be 0, 1 or 2, got {spatial_dims}")
    if kind == "batch":
        return nn.BatchNorm2d(num_features) if spatial_dims == 2 else nn.BatchNorm1d(num_features)
    if kind == "layer":
        return nn.LayerNorm(num_features) if spatial_dims == 0 else nn.GroupNorm(1, num_features)
    if kind == "group":
        return nn.GroupNorm(num_groups(num_features), num_features)
    if kind == "none":
        return nn.Identity()
    raise SharpscopeError(f"unknown norm '{kind}'; choose one of: {', '.join(NORM_CHOICES)}")


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer as SAM-ON finds them (optimizers.md,
    its set ``N``): BatchNorm (any, SyncBatchNorm too), LayerNorm, GroupNorm, InstanceNorm
    and RMSNorm -- the types of :data:`NORM_TYPES` and more, so that a user's own model is
    read as ``SAMON`` reads it.

    >>> is_norm_layer(nn.GroupNorm(1, 4)), is_norm_layer(nn.InstanceNorm2d(4))
    (True, True)
    >>> is_norm_layer(nn.Linear(2, 2))
    False
    """
    from ..optim.samon import NORM_LAYER_TYPES  # one list: the optimizer's

    return isinstance(module, NORM_LAYER_TYPES)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One keyword option of a model factory.

    ``kind`` is ``int``, ``float`` or ``str``; a ``str`` option must be one of
    ``choices`` (matched case-insensitively). Numbers must lie in ``[low, high]``
    (``high_open`` makes the upper bound exclusive). Strings such as ``"16"`` from a
    command line are converted.
    """

    default: Any
    kind: type = int
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    high_open: bool = False

    def describe(self) -> str:
        if self.choices:
            return "|".join(self.choices) + f" (default {self.default})"
        rng = ""
        if self.low is not None and self.high is None:
            rng = f" >= {self.low:g}"
        elif self.high is not None:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            rng = f" in [{lo}, {self.high:g}{')' if self.high_open else ']'}"
        return f"{self.kind.__name__}{rng} (default {self.default})"


def _coerce(value: Any, option: Option) -> Any:
    """``value`` as the option's type, or raise ``ValueError`` with the reason."""
    if option.kind is str:
        if value is None and "none" in option.choices:
            return "none"  # the command line reads `norm=none` as None
        if not isinstance(value, str):
            raise ValueError("expected a string")
        for choice in option.choices:
            if value.strip().lower() == choice.lower():  # "norm= layer" from a shell
                return choice
        raise ValueError("not a valid choice")
    if isinstance(value, bool):
        raise ValueError(f"expected {option.kind.__name__}, got a bool")
    if isinstance(value, str):
        try:
            value = float(value.strip()) if option.kind is float else int(value.strip())
        except ValueError:
            raise ValueError(f"expected {option.kind.__name__}") from None
    if option.kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError("expected an integer")
    elif option.kind is float:
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError("expected a finite number")
        value = float(value)
    too_low = option.low is not None and value < option.low
    too_high = option.high is not None and (
        value >= option.high if option.high_open else value > option.high
    )
    if too_low or too_high:
        raise ValueError("out of range")
    return value


def resolve_options(
    model: str, options: Mapping[str, Any], spec: Mapping[str, Option]
) -> dict[str, Any]:
    """Check a factory's keyword options against ``spec`` and fill in defaults.

    Raises:
        SharpscopeError: one line naming the bad option and what would be valid.

    >>> spec = {"width": Option(8, int, low=1), "norm": Option("batch", str, ("batch", "none"))}
    >>> resolve_options("cnn", {"width": "16", "norm": "None"}, spec)
    {'width': 16, 'norm': 'none'}
    >>> resolve_options("cnn", {"norm": None}, spec)["norm"]
    'none'
    >>> resolve_options("cnn", {"depht": 2}, spec)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: model 'cnn' has no option 'depht'; valid options: \
width=int >= 1 (default 8), norm=batch|none (default batch)
    """
    valid = ", ".join(f"{name}={opt.describe()}" for name, opt in spec.items())
    unknown = [name for name in options if name not in spec]
    if unknown:
        raise SharpscopeError(
            f"model '{model}' has no option '{unknown[0]}'; valid options: {valid}"
        )
    out: dict[str, Any] = {}
    for name, opt in spec.items():
        if name not in options:
            out[name] = opt.default
            continue
        try:
            out[name] = _coerce(options[name], opt)
        except ValueError as exc:
            raise SharpscopeError(
                f"model '{model}': option {name}={options[name]!r} is invalid ({exc}); "
                f"expected {name}={opt.describe()}"
            ) from None
    return out


#: the registry models that take inputs of each rank (per example), named when a model
#: refuses a shape
MODELS_FOR_RANK = {
    1: ("cnn1d", "mlp"),
    2: ("cnn1d", "mlp"),
    3: ("cnn", "resnet", "resnet20", "resnet32", "resnet56", "wrn", "vit", "mlp"),
}


def check_input_shape(
    model: str, input_shape: Sequence[int], num_classes: int, ranks: Sequence[int], expected: str
) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints whose length is one of ``ranks``.

    Raises:
        SharpscopeError: naming the shape the model expects (``expected``, e.g. "(C, H, W)").
    """
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise SharpscopeError(
            f"model '{model}': input shape {input_shape!r} is not a tuple of ints; "
            f"expected {expected}"
        ) from None
    if len(shape) not in ranks or any(s < 1 for s in shape):
        raise SharpscopeError(
            f"model '{model}' expects inputs of shape {expected} (per example), got {shape}"
            + (
                f"; the models for inputs like these are {', '.join(MODELS_FOR_RANK[len(shape)])}"
                if len(shape) in MODELS_FOR_RANK
                else ""
            )
        )
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise SharpscopeError(
            f"model '{model}': num_classes must be a positive integer, got {num_classes!r}"
        )
    if len(shape) == 3 and expected.startswith("(C, H, W)"):
        warn_if_channels_last(model, shape)
    return shape


#: channel counts of images stored channels-last: grey, RGB, RGBA
_IMAGE_CHANNELS = (1, 3, 4)


def warn_if_channels_last(model: str, shape: tuple[int, int, int]) -> None:
    """Warn when a ``(C, H, W)`` model is built for a shape that reads as ``(H, W, C)``.

    Images saved by NumPy or PIL are channels-last; ``(32, 32, 3)`` taken as ``(C, H, W)``
    builds a network with 32 input channels over 32 × 3 pixels, which trains without
    an error. The rule: a last axis of 1, 3 or 4 and a first axis that is not.

    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_if_channels_last("resnet20", (32, 32, 3))
    ...     warn_if_channels_last("resnet20", (3, 32, 32))
    >>> [str(w.message)[:60] for w in caught]
    ["model 'resnet20': inputs of shape (32, 32, 3) look channels-"]
    """
    if shape[2] in _IMAGE_CHANNELS and shape[0] not in _IMAGE_CHANNELS:
        warnings.warn(
            f"model '{model}': inputs of shape {shape} look channels-last (H, W, C); it "
            f"takes (C, H, W) per example, so it was built for {shape[0]} channels of "
            f"{shape[1]} x {shape[2]} pixels: convert the images with x.permute(0, 3, 1, 2)",
            RuntimeWarning,
            stacklevel=caller_level(),
        )


def kaiming_init_(module: nn.Module) -> None:
    """He et al. (2015) normal init for every conv (fan_out, ReLU gain, as torchvision's
    ResNet), zero conv biases, and unit scale / zero shift for norm layers. Linear
    layers keep PyTorch's default init."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
