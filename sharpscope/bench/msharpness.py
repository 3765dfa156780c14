"""``sharpscope bench msharpness``: vectorized m-sharpness against a per-subset loop.

Same model, data and settings in the same run. The reference is the loop a researcher
writes by hand from SAM's own perturbation step (:func:`sam_loop`): for each subset of m
examples, on the model as given, the loss and its gradient, ε = ρ g/‖g‖ added to the
weights in place, the loss at w + ε, the weights put back, and the 0-1 errors at both
(sharpscope reports the error increase too). sharpscope's path is ``m_sharpness`` with its
defaults (``torch.func.vmap`` over subsets of ``grad`` of ``functional_call``, in chunks,
on a copy with BatchNorm folded). ``ratio`` is sharpscope's time / the loop's;
``extra.speedup`` its inverse. Target (issue 5): speedup ≥ 3 at m = 8 on CPU; m = 1, 32,
128 are reported too. The adaptive Auto-PGD case (5 steps, no hand loop of it) is
compared with sharpscope's own per-subset loop (``vectorize=False``, the same ascent on
the same folded copy): that ratio is the effect of the vectorization alone.

Model and data: the registry's ``cnn1d`` with BatchNorm on MNIST-1D (1024 training
examples; 256 with ``quick``). Timings are in float32, the dtype of real use, and IEEE
float32 for both (TF32 off, :mod:`sharpscope.precision`, as the analyses run). The
values must agree to 1e-5 relative: ``accuracy`` is the float32 relative difference
of the two sharpness values, which float32 rounding of L(w+ε) and L(w) (~1e-7 of a
loss of ~2) can push to ~1e-5 when the sharpness is ~1e-2; so the same model and
data are also run in float64 (``extra.float64_relative_difference``, ~1e-13), which
is what ``values_agree_1e-5`` checks. CPU timings use one thread (on small machines
intra-op threading of small kernels adds more noise than speed); the thread count is
recorded. GPU rows are added when CUDA is available.
"""

from __future__ import annotations

from typing import Any

import torch

from ..analysis.msharpness import m_sharpness
from ..precision import ieee_float32
from ._common import (
    BenchRow,
    OnRows,
    RowLog,
    bench_devices,
    interleaved_median,
    synced,
    torch_threads,
)

TARGET_SPEEDUP_M8 = 3.0
MODEL_SPEC = {"name": "cnn1d", "norm": "batch"}


def bench_model(dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 0) -> Any:
    """The benchmark network: registry cnn1d with BatchNorm, non-trivial running stats."""
    from ..registry import build_model

    torch.manual_seed(seed)
    model = build_model(MODEL_SPEC, (40,), 10)
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(0.1 * torch.randn(module.num_features, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=generator))
    return model.to(device, dtype).eval()


def bench_data(samples: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> Any:
    """The first ``samples`` MNIST-1D training examples (seeded shuffle)."""
    from ..data import load_data

    split = load_data("mnist1d", "train", samples=samples, seed=0)
    return split.inputs.to(device, dtype), split.targets.to(device)


def sam_loop(model: torch.nn.Module, data: Any, m: int, rho: float) -> float:
    """m-sharpness with one ascent step, the straightforward way: for each subset S of m
    consecutive examples, L_S(w + ρ g/‖g‖) − L_S(w) with g = ∇L_S(w) (SAM's own step,
    Foret et al. 2021, on the model as given), the weights set in place and put back;
    the 0-1 errors at w and w + ε are counted as sharpscope counts them. Returns the
    mean over the n // m subsets."""
    x, y = data
    params = [p for p in model.parameters() if p.requires_grad]
    subsets = len(y) // m
    total, error_increase = 0.0, 0
    for start in range(0, subsets * m, m):
        xs, ys = x[start : start + m], y[start : start + m]
        out = model(xs)
        loss = torch.nn.functional.cross_entropy(out, ys)
        grads = torch.autograd.grad(loss, params)
        scale = rho / torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        with torch.no_grad():
            origin = [p.detach().clone() for p in params]
            torch._foreach_add_(params, torch._foreach_mul(grads, scale))
            out_perturbed = model(xs)
            perturbed = torch.nn.functional.cross_entropy(out_perturbed, ys)
            torch._foreach_copy_(params, origin)
        total += float(perturbed) - float(loss.detach())
        error_increase += int((out_perturbed.argmax(1) != ys).sum() - (out.argmax(1) != ys).sum())
    return total / subsets


def _by_hand(case: dict[str, Any]) -> bool:
    """Whether ``case`` is SAM's one-step ascent, whose reference is :func:`sam_loop`
    (an adaptive or multi-step case is compared with sharpscope's own loop)."""
    return case.get("steps", 1) == 1 and not case.get("adaptive")


def _pair(model: Any, data: Any, kwargs: dict, device: str) -> dict[str, Any]:
    """sharpscope's default path and the reference: the hand loop for SAM's one-step
    ascent, sharpscope's own per-subset loop for the adaptive Auto-PGD case."""
    if _by_hand(kwargs):
        reference = lambda: sam_loop(model, data, kwargs["m"], kwargs["rho"])  # noqa: E731
    else:
        reference = lambda: m_sharpness(model, data, vectorize=False, **kwargs).sharpness  # noqa: E731
    return {
        "vmap": synced(lambda: m_sharpness(model, data, **kwargs).sharpness, device),
        "loop": synced(reference, device),
    }


def reference_name(case: dict[str, Any]) -> str:
    """The reference of ``case``, as the row names it."""
    if _by_hand(case):
        return "per-subset loop by hand (SAM's step, the model as given)"
    return "sharpscope's per-subset loop (same ascent, BatchNorm folded)"


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def run(
    quick: bool = False,
    devices: list[str] | None = None,
    on_rows: OnRows | None = None,
) -> list[BenchRow]:
    """Rows for m ∈ {1, 8, 32, 128} (steps = 1) and an adaptive Auto-PGD case.

    ``devices``: where to run (default :func:`bench_devices` ``("auto")``);
    ``on_rows``: called with all rows so far after each new row.
    """
    devices = bench_devices() if devices is None else devices
    samples = 256 if quick else 1024
    repeats = 2 if quick else 5
    cases: list[dict[str, Any]] = [{"m": m, "steps": 1} for m in (1, 8, 32, 128)]
    if not quick:
        cases.append({"m": 8, "steps": 5, "adaptive": True})
    rows = RowLog(on_rows)
    # one intra-op thread for every row (on CUDA the work is on the GPU anyway)
    # IEEE float32 for the references too, as the analyses run (on a GPU PyTorch's default
    # runs convolutions in TF32, 1e-3 relative: a faster reference, and values off by far
    # more than float32 rounding)
    with torch_threads(1), ieee_float32():
        for device in devices:
            # on a GPU the loop over 1,024 subsets is launch-bound and slow: 3 repeats
            reps = repeats if device == "cpu" else min(repeats, 3)
            model = bench_model(torch.float32, device)
            data = bench_data(samples, torch.float32, device)
            model64 = bench_model(torch.float64, device)
            data64 = bench_data(samples, torch.float64, device)
            for case in cases:
                kwargs = {"rho": 0.05, **case}
                fns = _pair(model, data, kwargs, device)
                times = interleaved_median(fns, repeats=reps)
                fast, slow = fns["vmap"](), fns["loop"]()
                checks = _pair(model64, data64, kwargs, device)
                fast64, slow64 = checks["vmap"](), checks["loop"]()
                rel64 = _relative(fast64, slow64)
                speedup = times["loop"] / times["vmap"]
                targeted = case["m"] == 8 and case["steps"] == 1
                name = "adaptive " if case.get("adaptive") else ""
                rows.append(
                    BenchRow(
                        case=(
                            f"{name}m-sharpness m={case['m']} steps={case['steps']}, "
                            f"cnn1d-bn mnist1d n={samples} {device}"
                        ),
                        variant="vmap over subsets",
                        seconds=times["vmap"],
                        reference=reference_name(case),
                        reference_seconds=times["loop"],
                        ratio=times["vmap"] / times["loop"],
                        accuracy_measure="relative difference of the sharpness (float32)",
                        accuracy=_relative(fast, slow),
                        extra={
                            "speedup": speedup,
                            "float64_relative_difference": rel64,
                            "values_agree_1e-5": rel64 <= 1e-5,
                            "sharpness": fast,
                            "target_speedup": TARGET_SPEEDUP_M8 if targeted else None,
                            "meets_target": (speedup >= TARGET_SPEEDUP_M8)
                            if targeted and device == "cpu"
                            else None,
                            "dtype": "float32",
                            "threads": torch.get_num_threads(),
                            "repeats": reps,
                            "num_subsets": samples // case["m"],
                        },
                    )
                )
    return rows
