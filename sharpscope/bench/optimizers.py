"""``sharpscope bench optimizers``: step time of each optimizer against SGD.

Case: the registry's ``cnn1d`` with BatchNorm on MNIST-1D inputs ``(40,)``, one fixed
batch of 128 training examples, cross-entropy, base SGD (lr 0.05, momentum 0.9, weight
decay 5e-4). Every variant gets its own copy of the same initial model; the repeats of
all variants are interleaved and the median step time is reported as a ratio to SGD's
(two passes are the floor of a two-pass variant: 2.0).

Targets (issue 3, CPU): SAM <= 2.2, ASAM <= 2.3, VaSSO <= 2.3, SAM-ON <= 2.2,
bSAM <= 2.4, LETS <= 3.2 (default diagonal hypergradient).

Each row's ``extra`` carries ``closure_calls_per_step`` (measured by counting the
closure's calls), ``gradient_passes_per_step`` (closure calls plus the optimizer's own
passes, e.g. LETS's validation pass), ``target_ratio`` and ``meets_target``. The accuracy
column is a correctness check of the timed configuration on the same case: the largest
weight and BatchNorm-statistic difference after 3 steps from the spec's update written
out tensor by tensor (float32 rounding, about 1e-7): for SAM, ASAM, VaSSO and SAM-ON the
two-pass step at the timed ρ with ``torch.optim.SGD`` as the base; for LETS the same
SAM step at ``rho_lr = 0`` (the learned radius held); for bSAM its own update with the
same noise.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..optim import BatchClosure, build_optimizer
from ._common import (
    BenchRow,
    OnRows,
    RowLog,
    bench_devices,
    interleaved_median,
    synced,
    torch_threads,
)

__all__ = ["run", "TARGETS"]

#: ratio to SGD that each variant must stay under (issue 3).
TARGETS: dict[str, float] = {
    "sam": 2.2,
    "asam": 2.3,
    "vasso": 2.3,
    "samon": 2.2,
    "bsam": 2.4,
    "lets": 3.2,
}
BATCH_SIZE = 128
#: intra-op threads during the benchmark
THREADS = 1
_BASE = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
CASE = "cnn1d(norm=batch) mnist1d batch=128"


def _case(
    device: str = "cpu",
) -> tuple[nn.Module, Tensor, Tensor, list[tuple[Tensor, Tensor]], int]:
    """Model, one training batch, validation batches, training-set size, on ``device``."""
    from ..data import load_data
    from ..registry import build_model

    torch.manual_seed(0)
    data = load_data("mnist1d", "train")
    model = build_model({"name": "cnn1d", "norm": "batch"}, (40,), 10)
    inputs, targets = data.inputs.to(device), data.targets.to(device)
    x, y = inputs[:BATCH_SIZE], targets[:BATCH_SIZE]
    val = [
        (inputs[i : i + BATCH_SIZE], targets[i : i + BATCH_SIZE])
        for i in range(BATCH_SIZE, 5 * BATCH_SIZE, BATCH_SIZE)
    ]
    return model.to(device), x, y, val, len(data.targets)


def _specs() -> dict[str, dict[str, Any]]:
    return {
        "sgd": dict(_BASE),
        "sam": {"name": "sam", "rho": 0.05, "base": _BASE},
        "asam": {"name": "asam", "rho": 0.5, "base": _BASE},
        "vasso": {"name": "vasso", "rho": 0.05, "theta": 0.9, "base": _BASE},
        "samon": {"name": "samon", "rho": 0.5, "base": _BASE},
        "bsam": {"name": "bsam", "lr": 0.05, "rho": 0.01},
        "lets": {"name": "lets", "rho": 0.05, "hypergrad": "diag", "base": _BASE},
    }


class _CountingClosure(BatchClosure):
    calls = 0.0

    def __call__(self, chunk_index: int | None = None, num_chunks: int | None = None) -> Tensor:
        type(self).calls += 1.0 if chunk_index is None else 1.0 / float(num_chunks or 1)
        return super().__call__(chunk_index, num_chunks)


def _ascent(name: str, opt: Any, params: list[Tensor], g: list[Tensor], state: dict) -> list:
    """The spec's ascent step ε (optimizers.md §1, §2, §4) for the timed configuration."""
    rho = float(opt.rho)

    def along(direction: list[Tensor], scaled: list[Tensor]) -> list[Tensor]:
        # ε = ρ · direction / ‖scaled‖ over the tensors given (0 when the norm is 0)
        norm = torch.sqrt(sum((t.double() ** 2).sum() for t in scaled))
        return [rho * t / (norm + 1e-12).to(t.dtype) for t in direction]

    if name in ("sam", "lets"):  # LETS at rho_lr = 0 keeps its radius: a SAM step
        return along(g, g)
    if name == "asam":  # elementwise T = |w| + η on every tensor: ε = ρ T² g / ‖T g‖
        scale = [p.abs() + opt.eta for p in params]
        return along([t * t * gi for t, gi in zip(scale, g)], [t * gi for t, gi in zip(scale, g)])
    if name == "vasso":  # d ← (1 − θ) d + θ g (d starts at the first g); ε = ρ d / ‖d‖
        d = state.get("d")
        d = (
            list(g)
            if d is None
            else [(1 - opt.theta) * di + opt.theta * gi for di, gi in zip(d, g)]
        )
        state["d"] = d
        return along(d, d)
    # SAM-ON (T = I): only the normalization layers' affine parameters move (the case's
    # normalization layers are BatchNorm1d)
    norm_ids = {
        id(q) for m in opt.model.modules() if isinstance(m, nn.BatchNorm1d) for q in m.parameters()
    }
    chosen = [i for i, p in enumerate(opt.model.parameters()) if id(p) in norm_ids]
    eps = [torch.zeros_like(p) for p in params]
    for i, e in zip(chosen, along([g[i] for i in chosen], [g[i] for i in chosen])):
        eps[i] = e
    return eps


def _two_pass_spec_check(name: str, spec: dict[str, Any], model, x, y, val, num_data) -> float:
    """max |w| difference after 3 steps (weights and BatchNorm statistics) between ``name``
    at its timed ρ and the spec's two-pass step written out (optimizers.md §0): pass 1 at
    ``w`` (updates the statistics), ``ε`` by the variant's rule, pass 2 at ``w + ε`` (the
    statistics restored afterwards), ``torch.optim.SGD`` with the pass-2 gradient at ``w``.
    LETS runs at ``rho_lr = 0`` (its learned radius stays put), where it is a SAM step.
    """
    loss_fn = nn.functional.cross_entropy
    ref, test = copy.deepcopy(model), copy.deepcopy(model)
    timed = dict(spec, rho_lr=0.0) if name == "lets" else dict(spec)
    opt = build_optimizer(timed, test, num_data=num_data, val_batches=val)
    base = {k: v for k, v in _BASE.items() if k != "name"}
    sgd = torch.optim.SGD(ref.parameters(), **base)
    params = list(ref.parameters())
    state: dict[str, Any] = {}
    for _ in range(3):
        opt.step(BatchClosure(test, loss_fn, x, y))
        g = list(torch.autograd.grad(loss_fn(ref(x), y), params))
        with torch.no_grad():
            eps = _ascent(name, opt, [p.detach() for p in params], g, state)
            w = [p.detach().clone() for p in params]
            running = {k: v.clone() for k, v in ref.named_buffers()}
            for p, e in zip(params, eps):
                p.add_(e)
        ge = torch.autograd.grad(loss_fn(ref(x), y), params)
        with torch.no_grad():
            ref.load_state_dict(running, strict=False)  # only pass 1 moves the statistics
            for p, wi, gi in zip(params, w, ge):
                p.copy_(wi)
                p.grad = gi
        sgd.step()
    return _state_difference(ref, test)


def _bsam_spec_check(spec: dict[str, Any], model, x, y, num_data: int) -> float:
    """max |w| difference after 3 steps (weights and BatchNorm statistics) between the
    bSAM optimizer and the spec's update (optimizers.md §5) written out tensor by tensor,
    with the same noise draws.

    Pass 1 runs at ``m + xi / sqrt(N s)`` and updates the BatchNorm running statistics;
    pass 2 runs at ``m + rho g / s`` with them restored afterwards (bn_policy "first").
    Float32 both; the two differ only by the rounding of the optimizer's fused updates.
    """
    loss_fn = nn.functional.cross_entropy
    ref, test = copy.deepcopy(model), copy.deepcopy(model)
    opt = build_optimizer(dict(spec), test, num_data=num_data)
    group = opt.param_groups[0]
    lr, (b1, b2), rho = group["lr"], group["betas"], opt.rho
    n, delta, gamma = group["num_data"], group["prior_precision"], group["damping"]
    params = [p for p in ref.parameters() if p.requires_grad]
    s = [torch.full_like(p, group["s_init"]) for p in params]
    gbar = [torch.zeros_like(p) for p in params]
    generator = torch.Generator(device=x.device).manual_seed(opt.seed)

    def gradients_at(points: list[Tensor]) -> list[Tensor]:
        with torch.no_grad():
            for p, value in zip(params, points):
                p.copy_(value)
        return list(torch.autograd.grad(loss_fn(ref(x), y), params))

    for _ in range(3):
        opt.step(BatchClosure(test, loss_fn, x, y))
        m = [p.detach().clone() for p in params]
        xi = torch.randn(sum(p.numel() for p in params), generator=generator, device=x.device)
        xi = [d.view_as(p) for d, p in zip(xi.split([p.numel() for p in params]), params)]
        g = gradients_at([mi + di / torch.sqrt(n * si) for mi, di, si in zip(m, xi, s)])
        running = {k: v.clone() for k, v in ref.named_buffers()}
        ge = gradients_at([mi + rho * gi / si for mi, gi, si in zip(m, g, s)])
        ref.load_state_dict(running, strict=False)  # pass 2 leaves the statistics alone
        with torch.no_grad():
            for i, p in enumerate(params):
                gbar[i] = b1 * gbar[i] + (1 - b1) * (ge[i] + delta / n * m[i])
                p.copy_(m[i] - lr * gbar[i] / s[i])
                s[i] = b2 * s[i] + (1 - b2) * (torch.sqrt(s[i]) * g[i].abs() + delta / n + gamma)
    return _state_difference(ref, test)


def _state_difference(mine: nn.Module, theirs: nn.Module) -> float:
    """The largest difference between two models' weights and BatchNorm statistics."""
    a, b = mine.state_dict(), theirs.state_dict()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def run(
    quick: bool = False,
    devices: list[str] | None = None,
    on_rows: OnRows | None = None,
) -> list[BenchRow]:
    """Time one step of every optimizer against SGD; see the module docstring.

    Runs with ``torch.set_num_threads(THREADS)`` (restored afterwards): the model is
    tiny, so intra-op threads add only scheduling noise on a shared machine (the same
    setting applies to SGD and to every variant).

    Args:
        quick: fewer repeats (for CI and tests).
        devices: where to run (default :func:`bench_devices` ``("auto")``: the CPU, and
            CUDA when available). The targets are the CPU's; on a GPU a step of this
            small model is bound by kernel launches, so its rows are reported without one.

    Returns:
        One :class:`BenchRow` per sharpness-aware variant and device (reference ``sgd``).
    """
    devices = bench_devices() if devices is None else devices
    rows = RowLog(on_rows)
    with torch_threads(THREADS):
        for device in devices:
            rows += _run(quick, device)
    return list(rows)


def _run(quick: bool, device: str) -> list[BenchRow]:
    model, x, y, val, num_data = _case(device)
    loss_fn = nn.functional.cross_entropy
    specs = _specs()
    models = {name: copy.deepcopy(model) for name in specs}
    opts = {
        name: build_optimizer(spec, models[name], num_data=num_data, val_batches=val)
        for name, spec in specs.items()
    }

    def stepper(name: str, steps: int) -> Callable[[], None]:
        net, opt = models[name], opts[name]

        def fn() -> None:
            for _ in range(steps):
                opt.step(BatchClosure(net, loss_fn, x, y))

        return synced(fn, device)

    # many short interleaved samples: a burst of load from other processes then lands
    # on every variant alike and the median ignores it
    steps = 1
    repeats = 15 if quick else 151
    seconds = interleaved_median(
        {name: stepper(name, steps) for name in specs}, repeats=repeats, warmup=3
    )
    per_step = {name: t / steps for name, t in seconds.items()}

    # passes per step, counted on separate (untimed) steps
    passes: dict[str, tuple[float, float]] = {}
    for name in specs:
        net, opt = models[name], opts[name]
        _CountingClosure.calls = 0.0
        before = opt.gradient_passes
        for _ in range(3):
            opt.step(_CountingClosure(net, loss_fn, x, y))
        passes[name] = (_CountingClosure.calls / 3, (opt.gradient_passes - before) / 3)

    rows = []
    for name in specs:
        if name == "sgd":
            continue
        if name == "bsam":
            measure = "max|w - w_spec| (weights, BN stats)"
            accuracy = _bsam_spec_check(specs[name], model, x, y, num_data)
        else:
            measure = "max|w - w_spec| (weights, BN stats)"
            accuracy = _two_pass_spec_check(name, specs[name], model, x, y, val, num_data)
        ratio = per_step[name] / per_step["sgd"]
        rows.append(
            BenchRow(
                case=CASE if device == "cpu" else f"{CASE} {device}",
                variant=name,
                seconds=per_step[name],
                reference="sgd",
                reference_seconds=per_step["sgd"],
                ratio=ratio,
                accuracy_measure=measure,
                accuracy=accuracy,
                extra={
                    "closure_calls_per_step": round(passes[name][0], 3),
                    "gradient_passes_per_step": round(passes[name][1], 3),
                    "reference_passes_per_step": round(passes["sgd"][1], 3),
                    "target_ratio": TARGETS[name] if device == "cpu" else None,
                    "meets_target": ratio <= TARGETS[name] if device == "cpu" else None,
                    "device": device,
                    "repeats": repeats,
                    "steps_per_repeat": steps,
                    "threads": torch.get_num_threads(),
                    "spec": specs[name],
                },
            )
        )
    return rows
