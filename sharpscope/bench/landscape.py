"""``sharpscope bench landscape``: grid points several at a time against a per-point loop.

Same model, data, directions and grid in the same run; the only difference is how the
points are evaluated: ``vmap(functional_call)`` over stacked parameter sets (chunks
of points per call), or a Python loop over points. ``ratio`` is sharpscope's time /
the reference loop's; ``extra.speedup`` its inverse; ``accuracy`` the largest relative
difference between the two loss grids (they must agree to 1e-5). Target (issue 5):
the 2-D landscape at least 2x faster than the loop on CPU, judged on the ``cnn1d-bn`` row
of the device's default path (``extra.meets_target``). The reference is the
per-point loop over the model as given; both sharpscope paths (vmap, and its CPU default,
the loop) evaluate a copy with BatchNorm folded into the convolutions
(:func:`sharpscope.curvature.fold.fold_batchnorm`); the loop row is the CPU default.

The reference is the loop of Li et al. (2018), written by hand (:func:`li_loop`): for
each grid point (a, b), the model's own weights set in place to θ₀ + a d₁ + b d₂, one
forward pass over the data, the loss and the number of correct predictions (sharpscope
reports the accuracy too). It is handed sharpscope's directions, made before the timing
(sharpscope's timed call makes its own), so that both evaluate the same points.

Cases: the registry's ``cnn1d`` with BatchNorm on MNIST-1D (the target case) and, for
contrast, the registry's ``mlp``, both on MNIST-1D, and an ``mlp`` (width 512) on
CIFAR-shaped inputs (3 x 32 x 32, random values: the timing does not depend on them),
whose 3072-wide first layer the CPU default precomputes once for the whole slice
(:mod:`sharpscope.analysis.input_layer`; the MNIST-1D models' first layers are too
cheap for that to pay); a 2-D filter-normalized random slice, 11 x 11 points over 1024
and over 128 examples (5 x 5 over 256 and 64 with ``quick``), IEEE float32 for both
(TF32 off, :mod:`sharpscope.precision`, as the analyses run). CPU timings use
one thread (recorded). With 1024 examples the work per point is large convolutions
running near the core's peak FLOP rate, which batching cannot shorten, and on CPU
PyTorch turns a vmapped convolution into a slower grouped one; vmap only pays where the
per-point work is small (128 examples). That is why
:func:`sharpscope.analysis.landscape.landscape` defaults to the loop on CPU and, on a
GPU, to vmap unless one point fills it (``extra.default_path``). GPU rows are added when
CUDA is available, with one more case there: the registry's ``resnet20`` on CIFAR-shaped
random inputs, whose points with 1,024 examples each fill the GPU, so that vmap's grouped
convolutions run slower than the loop (H200, session 23: 0.91x), and the GPU default is the loop
(:func:`sharpscope.analysis.landscape.default_vectorize`; with 128 examples, vmap 2.5x).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from ..analysis.landscape import default_vectorize, landscape
from ..optim._base import batchnorm_modules
from ..precision import ieee_float32
from ..registry import build_model
from ._common import (
    BenchRow,
    OnRows,
    RowLog,
    bench_devices,
    interleaved_median,
    synced,
    torch_threads,
)
from .msharpness import bench_data, bench_model

TARGET_SPEEDUP = 2.0


def _mlp(device: str, input_shape: tuple[int, ...] = (40,), width: int = 256) -> Any:
    torch.manual_seed(0)
    return build_model({"name": "mlp", "width": width}, input_shape, 10).to(device).eval()


IMAGE_SHAPE = (3, 32, 32)


def _image_data(samples: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Random CIFAR-shaped inputs and labels (seeded)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, *IMAGE_SHAPE, generator=generator)
    y = torch.randint(0, 10, (samples,), generator=generator)
    return x.to(device), y.to(device)


def li_loop(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    directions: torch.Tensor,
    axes: tuple[torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """The reference: a 2-D slice the straightforward way (Li et al. 2018). For each
    point, ``torch.add(θ₀, d₁, alpha=a, out=p)`` and ``p.add_(d₂, alpha=b)`` on every
    trainable tensor, the mean cross-entropy over ``data`` and the correct predictions;
    the weights are put back at the end. ``directions``: ``(2, P)`` in the order of
    ``model.parameters()``. Returns the ``(len(x), len(y))`` loss grid (float64)."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    origin = [p.detach().clone() for p in params]
    split = [d.to(x.device, x.dtype).split([p.numel() for p in params]) for d in directions]
    steps = [[d.view_as(p) for d, p in zip(parts, params)] for parts in split]
    xs, ys = axes[0].tolist(), axes[1].tolist()
    loss = torch.empty(len(xs), len(ys), dtype=torch.float64)
    correct = torch.empty(len(xs), len(ys), dtype=torch.float64)
    with torch.no_grad():
        for i, a in enumerate(xs):
            for j, b in enumerate(ys):
                for p, o, d1, d2 in zip(params, origin, *steps):
                    torch.add(o, d1, alpha=a, out=p)
                    p.add_(d2, alpha=b)
                out = model(x)
                loss[i, j] = float(torch.nn.functional.cross_entropy(out, y))
                correct[i, j] = float((out.argmax(1) == y).sum())
        torch._foreach_copy_(params, origin)
    return loss


def _default_path(model: Any, data: tuple[torch.Tensor, torch.Tensor], device: str) -> str:
    """The path :func:`landscape` takes by default (:func:`default_vectorize`)."""
    vectorize, _ = default_vectorize(model, [data], torch.device(device))
    return "vmap" if vectorize else "loop"


def run(
    quick: bool = False,
    devices: list[str] | None = None,
    on_rows: OnRows | None = None,
) -> list[BenchRow]:
    """Rows: cnn1d-bn, mlp and mlp-512, vectorized and the loop against the reference loop,
    on each of ``devices``.

    ``devices``: where to run (default :func:`bench_devices` ``("auto")``);
    ``on_rows``: called with all rows so far after each new row.
    """
    devices = bench_devices() if devices is None else devices
    sizes, grid = ((64, 256), 5) if quick else ((128, 1024), 11)
    repeats = 2 if quick else 3
    rows = RowLog(on_rows)
    # one intra-op thread for every row (on CUDA the work is on the GPU anyway)
    # IEEE float32 for the references too, as the analyses run (on a GPU PyTorch's default
    # runs convolutions in TF32, 1e-3 relative: a faster reference, and values off by far
    # more than float32 rounding)
    with torch_threads(1), ieee_float32():
        for device, samples in itertools.product(devices, sizes):
            mnist1d = bench_data(samples, torch.float32, device)
            cases = {
                "cnn1d-bn": (bench_model(torch.float32, device), mnist1d, "mnist1d"),
                "mlp": (_mlp(device), mnist1d, "mnist1d"),
                "mlp-512": (
                    _mlp(device, IMAGE_SHAPE, width=512),
                    _image_data(samples, device),
                    "3x32x32 random",
                ),
            }
            if device == "cuda":
                # a real image network, GPU only (a CPU grid of it takes minutes)
                torch.manual_seed(0)
                resnet = build_model({"name": "resnet20"}, IMAGE_SHAPE, 10).to(device).eval()
                cases["resnet20"] = (resnet, _image_data(samples, device), "3x32x32 random")
            for name, (model, data, data_name) in cases.items():
                kwargs = {"grid": grid, "seed": 0}
                variants = {
                    "vmap": {"vectorize": True},
                    "loop": {"vectorize": False, "fold_bn": True},
                }
                fns = {
                    key: synced(
                        lambda m=model, d=data, kw={**kwargs, **options}: landscape(m, d, 2, **kw),
                        device,
                    )
                    for key, options in variants.items()
                }
                made = fns["loop"]()  # the directions and axes the reference is handed
                fns["reference"] = synced(
                    lambda m=model, d=data, r=made: li_loop(m, d, r.directions, (r.x, r.y)),
                    device,
                )
                times = interleaved_median(fns, repeats=repeats)
                results = {"vmap": fns["vmap"](), "loop": made}
                reference = fns["reference"]()
                # the target is on what a user gets: the device's default path
                default_path = _default_path(model, data, device)
                has_bn = bool(batchnorm_modules(model))
                for key, label in (
                    (
                        "vmap",
                        f"vmap over grid points ({'BatchNorm folded' if has_bn else 'no BatchNorm'})",
                    ),
                    (
                        "loop",
                        f"per-point loop, {'BatchNorm folded, ' if has_bn else ''}input layer "
                        "precomputed where it pays (the CPU default; on a GPU the default "
                        "where one point fills it)",
                    ),
                ):
                    diff = float(
                        (
                            (results[key].loss - reference).abs()
                            / reference.abs().clamp_min(1e-300)
                        ).max()
                    )
                    speedup = times["reference"] / times[key]
                    targeted = name == "cnn1d-bn" and key == default_path
                    rows.append(
                        BenchRow(
                            case=f"2-D landscape {grid}x{grid}, {name} {data_name} n={samples} "
                            f"{device}",
                            variant=label,
                            seconds=times[key],
                            reference="per-point loop by hand (Li et al.), the model as given",
                            reference_seconds=times["reference"],
                            ratio=times[key] / times["reference"],
                            accuracy_measure="max relative difference of the loss grid",
                            accuracy=diff,
                            extra={
                                "speedup": speedup,
                                "values_agree_1e-5": diff <= 1e-5,
                                "target_speedup": TARGET_SPEEDUP if targeted else None,
                                "meets_target": (speedup >= TARGET_SPEEDUP)
                                if targeted and device == "cpu"
                                else None,
                                "default_path": default_path,
                                "bn_folded": results[key].settings.get("bn_folded"),
                                "input_layers": results[key].settings.get("input_layers"),
                                # the loop takes points in blocks but evaluates one per call
                                "points_per_call": results[key].meta.extra["chunk_size"]
                                if results[key].meta.extra["vectorized"]
                                else 1,
                                "dtype": "float32",
                                "threads": torch.get_num_threads(),
                                "repeats": repeats,
                            },
                        )
                    )
    return rows
