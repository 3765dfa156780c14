"""``sharpscope bench msharpness``: vectorized m-sharpness against the per-subset loop.

Same model, data and settings in the same run; the only difference is how the
per-subset maximizations are run: ``torch.func.vmap`` over subsets of ``grad`` of
``functional_call`` (in chunks), or the straightforward Python loop over subsets: set
the model's own parameters to θ + δ, plain autograd (:meth:`sharpscope.analysis.msharpness.Subsets.looped`).
Both run the identical ascent on the same BatchNorm-folded copy of the model
(:func:`sharpscope.curvature.fold.fold_batchnorm`), so the ratio is the effect of the
vectorization alone. ``ratio`` is vectorized time / loop time;
``extra.speedup`` its inverse. Target (issue 5): speedup ≥ 3 at m = 8 on CPU; m = 1,
32, 128 are reported too.

Model and data: the registry's ``cnn1d`` with BatchNorm on MNIST-1D (1024 training
examples; 256 with ``quick``). Timings are in float32, the dtype of real use. The
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


def _pair(model: Any, data: Any, kwargs: dict, device: str) -> dict[str, Any]:
    return {
        "vmap": synced(lambda: m_sharpness(model, data, **kwargs), device),
        "loop": synced(lambda: m_sharpness(model, data, vectorize=False, **kwargs), device),
    }


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
    with torch_threads(1):
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
                rel64 = _relative(fast64.sharpness, slow64.sharpness)
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
                        reference="per-subset loop",
                        reference_seconds=times["loop"],
                        ratio=times["vmap"] / times["loop"],
                        accuracy_measure="relative difference of the sharpness (float32)",
                        accuracy=_relative(fast.sharpness, slow.sharpness),
                        extra={
                            "speedup": speedup,
                            "float64_relative_difference": rel64,
                            "values_agree_1e-5": rel64 <= 1e-5,
                            "sharpness": fast.sharpness,
                            "target_speedup": TARGET_SPEEDUP_M8 if targeted else None,
                            "meets_target": (speedup >= TARGET_SPEEDUP_M8)
                            if targeted and device == "cpu"
                            else None,
                            "dtype": "float32",
                            "threads": torch.get_num_threads(),
                            "repeats": reps,
                            "num_subsets": fast.num_subsets,
                        },
                    )
                )
    return rows
