"""``sharpscope bench spectrum``: top-5 Hessian eigenvalues against PyHessian, and costs.

CPU case (issue 4, item 8): the registry's ``cnn`` with BatchNorm (3,010 parameters) on
all 1,797 scikit-learn digits, trained for 300 seeded SGD steps (lr 0.05, momentum 0.9,
batch 64) so the spectrum is a trained network's, analysed in eval mode with
cross-entropy, the whole data set as one batch. In the same process:

* ``sharpscope.top_eigenvalues(model, data, k=5)`` (defaults: Lanczos, tol 1e-5, HVP
  mode chosen automatically) against ``pyhessian.hessian(model, criterion, data=(x, y),
  cuda=False).eigenvalues(top_n=5)`` (its defaults: tol 1e-3, maxIter 100; its
  single-batch mode, which reuses the gradient graph, like sharpscope). Both are checked
  against the eigenvalues of the exact dense float64 Hessian
  (``torch.autograd.functional.hessian``, P reverse passes); accuracy is the largest
  relative error of the five (PyHessian's power iteration with deflation finds the
  eigenvalue of largest magnitude that is left, so its five are also compared with the
  five of largest magnitude: ``reference_accuracy_largest_magnitude``). Each timed
  sharpscope call chooses its HVP mode afresh, as the first ``sharpscope spectrum`` run of
  a configuration on a machine does (``extra.sharpscope_hvp_mode_seconds``); a later run
  reuses the remembered choice (:mod:`sharpscope.curvature.mode_cache`): in the same
  process, ``extra.sharpscope_warm_seconds``; in a later process, which reads it from the
  disk cache (a private one here) and runs one trial product,
  ``extra.sharpscope_later_process_seconds``. Repeats are interleaved, median wall time;
  ``ratio`` is sharpscope's time over PyHessian's (target <= 0.25, i.e. >= 4x faster)
  and sharpscope must be at least as accurate. A second reference row gives PyHessian
  with tol 1e-6 (closer to sharpscope's accuracy, at most 100 products per eigenvalue).
* per analysis (top-5, trace by Hutch++ with 99 probes, SLQ density 10 x 90): wall time
  (the CPU case: median of 3 calls, SLQ one) in gradient-pass equivalents (``ratio`` =
  time / time of one plain gradient pass over the data on the model as given), the HVP
  count (the HVP mode chosen afresh in each call), and the peak memory (CUDA:
  ``max_memory_allocated``; CPU: the peak of glibc's bytes in use (``mallinfo2``) above
  the starting value, sampled every 5 ms, or of the resident set size off glibc --
  ``tracemalloc`` does not see tensor memory).
* per HVP mode (forward-over-reverse, reverse-over-reverse with the graph reused,
  reverse with a fresh graph, and vmapped blocks of 8): time of one HVP over the data
  divided by the time of one gradient pass. The operator folds eval-mode BatchNorm into
  the convolutions inside the differentiated function (:mod:`sharpscope.curvature.fold`;
  same Hessian); one more row gives the reused-graph product without folding.

On a GPU the same comparison also runs on a ResNet-20 on CIFAR-sized random-label data
(2,048 images 3 x 32 x 32, Gaussian inputs, uniform labels), without a dense check, in
IEEE float32 (TF32 off, see :mod:`sharpscope.precision`) for both, one timed repeat (the
answers compared with sharpscope's top-5, largest and largest-magnitude), and
SLQ with 4 probes x 90 steps (on a ResNet-20, SLQ 10 x 90 is two thirds of the whole run:
about 3,200 of 4,800 gradient-pass equivalents).
``quick`` shrinks everything (a width-4 CNN on 256 digits, one repeat) for smoke tests.
"""

from __future__ import annotations

import copy
import ctypes
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..curvature import clear_mode_cache
from ..curvature.mode_cache import without_disk_cache
from ..curvature.pyhessian_backend import import_pyhessian
from ..determinism import deterministic_algorithms
from ..precision import ieee_float32
from ._common import (
    BenchRow,
    OnRows,
    RowLog,
    bench_devices,
    interleaved_median,
    progress_note,
    synced,
    torch_threads,
)

__all__ = ["run", "TARGET_RATIO"]

#: sharpscope's time / PyHessian's time must stay under this (>= 4x faster).
TARGET_RATIO = 0.25
#: intra-op threads for the CPU case (1: stable timings on a shared machine)
THREADS = 1
K = 5


@dataclass
class _Case:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    num_params: int


def _train(model: nn.Module, x: Tensor, y: Tensor, steps: int, seed: int = 0) -> nn.Module:
    """Seeded SGD (lr 0.05, momentum 0.9, batch 64) so the spectrum is realistic.

    Deterministic kernels (:func:`~sharpscope.determinism.deterministic_algorithms`, as
    ``train --deterministic``), so that the GPU case is the same network in every run (two
    runs on an H200 with the default kernels gave lambda_max 5,499 and 2,016).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    with deterministic_algorithms():
        for _ in range(steps):
            idx = torch.randint(0, len(y), (min(64, len(y)),), generator=gen, device="cpu")
            idx = idx.to(x.device)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def _digits_case(quick: bool) -> _Case:
    from ..data import load_data
    from ..registry import build_model

    data = load_data("digits", "all")  # all 1,797 images, (N, 1, 8, 8) in [0, 1]
    x, y = data.inputs, data.targets
    torch.manual_seed(0)
    spec = {"name": "cnn", "norm": "batch", **({"width": 4} if quick else {})}
    if quick:
        x, y = x[:256], y[:256]
    model = _train(build_model(spec, (1, 8, 8), 10), x, y, steps=100 if quick else 300)
    num_params = sum(p.numel() for p in model.parameters())
    name = f"cnn(norm=batch{', width=4' if quick else ''}) digits N={len(y)} P={num_params}"
    return _Case(name, model, x, y, num_params)


def _resnet_case(quick: bool) -> _Case:
    from ..registry import build_model

    n = 512 if quick else 2048
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 32, 32, generator=gen).cuda()
    y = torch.randint(0, 10, (n,), generator=gen).cuda()
    torch.manual_seed(0)
    model = build_model({"name": "resnet20"}, (3, 32, 32), 10).cuda()
    model = _train(model, x, y, steps=20 if quick else 100)
    num_params = sum(p.numel() for p in model.parameters())
    return _Case(f"resnet20 random-label cifar-size N={n} P={num_params}", model, x, y, num_params)


def exact_spectrum(case: _Case) -> np.ndarray:
    """All eigenvalues of the dense float64 Hessian (independent of sharpscope's HVPs)."""
    from torch.func import functional_call

    model = copy.deepcopy(case.model).double().eval()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    x = case.x.double()

    def mean_loss(flat: Tensor) -> Tensor:
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[start : start + shape.numel()].reshape(shape)
            start += shape.numel()
        return nn.functional.cross_entropy(functional_call(model, (params, buffers), (x,)), case.y)

    H = torch.autograd.functional.hessian(mean_loss, theta)
    return torch.linalg.eigvalsh(0.5 * (H + H.T)).cpu().numpy()


def top_of(values: Any, k: int = K, which: str = "LA") -> np.ndarray:
    """The k largest (``LA``) or largest-magnitude (``LM``) values, in decreasing order.

    >>> top_of([3.0, -5.0, 1.0, 4.0], k=2, which="LA").tolist()
    [4.0, 3.0]
    >>> top_of([3.0, -5.0, 1.0, 4.0], k=2, which="LM").tolist()
    [4.0, -5.0]
    """
    values = np.asarray(values, dtype=np.float64)
    key = values if which == "LA" else np.abs(values)
    return np.sort(values[np.argsort(-key, kind="stable")][:k])[::-1]


def _rel_error(found: Any, exact: np.ndarray, which: str = "LA") -> float:
    """Largest relative difference between the top values of ``found`` and ``exact``.

    Both sets are picked by ``which`` and compared in decreasing order, so two sets of
    largest-magnitude values match however their signs interleave.
    """
    found, exact = top_of(found, len(exact), which), top_of(exact, len(exact), which)
    return float(np.max(np.abs(found - exact) / np.abs(exact)))


class _PeakMemory:
    """Peak memory of a block: CUDA allocations, or sampled malloc bytes in use on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.measure = ""

    @contextmanager
    def track(self) -> Iterator[_PeakMemory]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield self
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - start
            self.measure = "cuda max_memory_allocated above start"
            return
        in_use = _malloc_in_use()
        start = in_use()
        peak = [start]
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.005):
                peak[0] = max(peak[0], in_use())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            peak[0] = max(peak[0], in_use())
            self.peak_bytes = peak[0] - start
            self.measure = in_use.__doc__ or ""


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloc_in_use() -> Callable[[], int]:
    """A function returning the bytes in use now: glibc's allocator, else the RSS."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2

        def glibc() -> int:
            """peak glibc malloc bytes in use above start (mallinfo2, sampled every 5 ms)"""
            info = libc.mallinfo2()
            return int(info.uordblks + info.hblkhd)

        glibc()
        return glibc
    except (OSError, AttributeError):
        page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

        def rss() -> int:
            """peak resident set size above start (sampled every 5 ms)"""
            try:
                with open("/proc/self/statm") as handle:
                    return int(handle.read().split()[1]) * page
            except OSError:
                return 0

        return rss


def _pyhessian_call(case: _Case, tol: float) -> Callable[[], list[float]]:
    hessian = import_pyhessian().hessian

    criterion = nn.CrossEntropyLoss()
    cuda = case.x.is_cuda

    def call() -> list[float]:
        torch.manual_seed(0)
        for p in case.model.parameters():
            p.grad = None
        try:
            engine = hessian(case.model, criterion, data=(case.x, case.y), cuda=cuda)
            values, _ = engine.eigenvalues(top_n=K, tol=tol)
        finally:
            for p in case.model.parameters():
                p.grad = None
        return values

    return call


@contextmanager
def first_run() -> Iterator[None]:
    """As the first run of a configuration on a machine: no HVP mode remembered, in the
    process or on disk (:mod:`sharpscope.curvature.mode_cache`), so the call times both."""
    clear_mode_cache()
    with without_disk_cache():
        yield


@contextmanager
def later_process(folder: str) -> Iterator[None]:
    """As a later process on the same machine: nothing remembered in the process, the disk
    cache of HVP modes on and in ``folder`` (a private one, not the user's)."""
    from ..curvature.mode_cache import ENV_SWITCH

    clear_mode_cache()
    before = {name: os.environ.get(name) for name in ("SHARPSCOPE_CACHE", ENV_SWITCH)}
    os.environ["SHARPSCOPE_CACHE"], os.environ[ENV_SWITCH] = folder, "1"
    try:
        yield
    finally:  # the process keeps the choice, as a later run in the same process would
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _top5_rows(case: _Case, repeats: int, dense: bool) -> list[BenchRow]:
    """sharpscope's top-5 against PyHessian's; on the CPU case also PyHessian at tol 1e-6.

    The GPU case times each once after one untimed call of sharpscope's, which runs
    cuDNN's kernel search (the reverse-mode kernels PyHessian uses are among those it
    tries); the timed call still chooses its HVP mode. PyHessian's reverse-over-reverse product costs about 14.5 gradient
    passes on a ResNet-20 on an H200 (sharpscope's forward-over-reverse 2.1), so its
    up-to-500-product tol-1e-6 run and a warm-up call would take over ten minutes.
    """
    from ..analysis.spectrum import top_eigenvalues

    results: dict[str, Any] = {}

    def ours() -> None:
        # as the first `sharpscope spectrum` run of this configuration on this machine
        # pays it: the HVP mode is chosen afresh
        with first_run():
            results["sharpscope"] = top_eigenvalues(case.model, (case.x, case.y), k=K)

    def ours_warm() -> None:  # a later run in the same process (mode remembered there)
        top_eigenvalues(case.model, (case.x, case.y), k=K)

    modes_folder = tempfile.mkdtemp(prefix="sharpscope-bench-modes-")  # the user's file untouched

    def ours_later_process() -> None:  # a later process: the mode read from the file, one trial
        with later_process(modes_folder):
            top_eigenvalues(case.model, (case.x, case.y), k=K)

    def theirs() -> None:
        results["pyhessian"] = _pyhessian_call(case, 1e-3)()

    def theirs_tight() -> None:
        results["pyhessian-tol1e-6"] = _pyhessian_call(case, 1e-6)()

    import warnings

    fns = {"sharpscope": ours, "pyhessian": theirs}
    if dense:  # the CPU case
        fns["pyhessian-tol1e-6"] = theirs_tight
        fns["sharpscope-warm"] = ours_warm
        fns["sharpscope-later-process"] = ours_later_process  # its warm-up writes the file
    else:
        ours()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # PyHessian's backward(create_graph)
            times = interleaved_median(
                {name: synced(fn, case.x.device.type) for name, fn in fns.items()},
                repeats=repeats,
                warmup=1 if dense else 0,
            )
    finally:
        shutil.rmtree(modes_folder, ignore_errors=True)
    ours_result = results["sharpscope"]
    if dense:
        spectrum = exact_spectrum(case)
        exact, exact_lm = top_of(spectrum, K, "LA"), top_of(spectrum, K, "LM")
        ours_err: float | None = _rel_error(ours_result.eigenvalues, exact)
    else:  # no dense answer (GPU case): agreement with sharpscope's own answers
        exact = None
        exact_lm = top_eigenvalues(case.model, (case.x, case.y), k=K, which="LM").eigenvalues
        ours_err = None
    rows = []
    for reference in [name for name in fns if not name.startswith("sharpscope")]:
        ref_values = results[reference]
        ref_err = _rel_error(ref_values, ours_result.eigenvalues if exact is None else exact)
        # power iteration with deflation finds the largest magnitude left, so PyHessian's
        # five are also compared with the five of largest magnitude
        ref_err_lm = _rel_error(ref_values, np.asarray(exact_lm), "LM")
        ratio = times["sharpscope"] / times[reference]
        rows.append(
            BenchRow(
                case=case.name,
                variant="sharpscope top_eigenvalues(k=5)",
                seconds=times["sharpscope"],
                reference=f"{reference} eigenvalues(top_n=5)",
                reference_seconds=times[reference],
                ratio=ratio,
                accuracy_measure="max rel. error of top-5 vs dense fp64 eigvalsh"
                if exact is not None
                else "",  # no dense answer: only the reference's agreement is known
                accuracy=ours_err,
                extra={
                    "speedup": 1.0 / ratio,
                    "reference_accuracy": ref_err,
                    "reference_accuracy_measure": "reference's max rel. error"
                    if exact is not None
                    else "reference's max rel. difference to sharpscope's top-5",
                    "reference_accuracy_largest_magnitude": ref_err_lm,
                    "largest_magnitude_eigenvalues": np.asarray(exact_lm).tolist(),
                    # the target is against PyHessian's defaults; the other rows inform
                    "target_ratio": TARGET_RATIO if reference == "pyhessian" else None,
                    "meets_target": bool(
                        ratio <= TARGET_RATIO
                        and (ours_err is None or ref_err is None or ours_err <= ref_err)
                    )
                    if reference == "pyhessian"
                    else None,
                    "sharpscope_eigenvalues": ours_result.eigenvalues.tolist(),
                    "reference_eigenvalues": [float(v) for v in ref_values],
                    "exact_eigenvalues": None if exact is None else exact.tolist(),
                    # the timed call chose its HVP mode (hvp_mode_seconds); a later run
                    # reuses the remembered choice: in the process (warm), or read from the
                    # disk cache with one trial product (a later process)
                    "sharpscope_hvp_mode_seconds": ours_result.meta.extra.get("hvp_mode_seconds"),
                    "sharpscope_warm_seconds": times.get("sharpscope-warm"),
                    "sharpscope_later_process_seconds": times.get("sharpscope-later-process"),
                    "sharpscope_hvps": ours_result.hvp_count,
                    "sharpscope_hvp_mode": ours_result.meta.extra.get("hvp_mode"),
                    "sharpscope_bn_folded": ours_result.meta.extra.get("bn_folded"),
                    "sharpscope_converged": ours_result.converged,
                    "repeats": repeats,
                    "threads": torch.get_num_threads(),
                    "device": str(case.x.device),
                },
            )
        )
    return rows


def _grad_seconds(case: _Case, repeats: int) -> float:
    """The unit of cost: one plain gradient pass over the data, on the model as given
    (forward, mean cross-entropy, ``torch.autograd.grad`` of every trainable tensor)."""
    params = [p for p in case.model.parameters() if p.requires_grad]

    def grad() -> Any:
        loss = nn.functional.cross_entropy(case.model(case.x), case.y)
        return torch.autograd.grad(loss, params)

    return interleaved_median({"grad": synced(grad, case.x.device.type)}, repeats=repeats)["grad"]


def _cost_rows(
    case: _Case, grad_seconds: float, quick: bool, slq_probes: int = 10, repeats: int = 1
) -> list[BenchRow]:
    """Wall time of each analysis in gradient passes: the median of ``repeats`` calls
    (SLQ: one), the peak memory of the first."""
    from ..analysis.spectrum import hessian_trace, spectral_density, top_eigenvalues

    data = (case.x, case.y)
    probes, steps = (2, 30) if quick else (slq_probes, 90)
    analyses: dict[str, Callable[[], Any]] = {
        "top_eigenvalues(k=5)": lambda: top_eigenvalues(case.model, data, k=K),
        "hessian_trace(hutchpp, 99)": lambda: hessian_trace(case.model, data),
        f"spectral_density({probes} x {steps})": lambda: spectral_density(
            case.model, data, num_probes=probes, num_lanczos_steps=steps
        ),
    }
    rows = []
    for name, call in analyses.items():
        memory = _PeakMemory(case.x.device)

        def fresh(call: Callable[[], Any] = call) -> Any:
            with first_run():  # each call chooses its HVP mode, as a first run does
                return call()

        timed = synced(fresh, case.x.device.type)
        with memory.track():
            start = time.perf_counter()
            result = timed()
            times = [time.perf_counter() - start]
        for _ in range(0 if name.startswith("spectral_density") else repeats - 1):
            start = time.perf_counter()
            timed()
            times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        rows.append(
            BenchRow(
                case=case.name,
                variant=name,
                seconds=seconds,
                reference="one full gradient pass",
                reference_seconds=grad_seconds,
                ratio=seconds / grad_seconds,
                accuracy_measure="",
                accuracy=None,
                extra={
                    "gradient_pass_equivalents": seconds / grad_seconds,
                    "hvp_count": result.hvp_count,
                    "seconds_per_hvp_in_grad_passes": seconds / grad_seconds / result.hvp_count,
                    "peak_memory_bytes": memory.peak_bytes,
                    "memory_measure": memory.measure,
                    "hvp_mode": result.meta.extra.get("hvp_mode"),
                },
            )
        )
    return rows


def _mode_rows(case: _Case, grad_seconds: float, repeats: int) -> list[BenchRow]:
    from ..curvature import HessianOperator

    data = (case.x, case.y)
    gen = torch.Generator().manual_seed(0)
    block = {"max_block_size": 8}  # so hvp_block vmaps 8 vectors at once on any device
    ops = {
        "forward-over-reverse": HessianOperator(case.model, data, hvp_mode="forward", **block),
        "reverse-over-reverse (graph reused)": HessianOperator(
            case.model, data, hvp_mode="reverse", **block
        ),
        "reverse-over-reverse (fresh graph)": HessianOperator(
            case.model, data, hvp_mode="reverse", reuse_graph=False
        ),
        "reverse-over-reverse (graph reused), BatchNorm not folded": HessianOperator(
            case.model, data, hvp_mode="reverse", fold_bn=False
        ),
    }
    dim = next(iter(ops.values())).dim
    v = torch.randn(dim, generator=gen, dtype=torch.float64).to(case.x.device)
    V = torch.randn(8, dim, generator=gen, dtype=torch.float64).to(case.x.device)
    fns: dict[str, Callable[[], Any]] = {}
    for name, op in ops.items():
        fns[name] = lambda op=op: op.hvp(v)
    fns["forward-over-reverse, vmap block of 8 (per vector)"] = lambda: ops[
        "forward-over-reverse"
    ].hvp_block(V)
    fns["reverse-over-reverse (graph reused), batched block of 8 (per vector)"] = lambda: ops[
        "reverse-over-reverse (graph reused)"
    ].hvp_block(V)
    fns = {name: synced(fn, case.x.device.type) for name, fn in fns.items()}
    times = interleaved_median(fns, repeats=repeats)
    rows = []
    for name, seconds in times.items():
        per_vector = seconds / (8 if "block" in name else 1)
        rows.append(
            BenchRow(
                case=case.name,
                variant=f"HVP {name}",
                seconds=per_vector,
                reference="one full gradient pass",
                reference_seconds=grad_seconds,
                ratio=per_vector / grad_seconds,
                accuracy_measure="",
                accuracy=None,
                extra={"hvp_over_gradient": per_vector / grad_seconds},
            )
        )
    return rows


def run(
    quick: bool = False,
    devices: list[str] | None = None,
    on_rows: OnRows | None = None,
) -> list[BenchRow]:
    """Run the spectrum benchmark; rows as described in the module docstring.

    ``devices``: ``"cpu"`` runs the digits case, ``"cuda"`` the ResNet-20 case
    (default :func:`bench_devices` ``("auto")``: the CPU, and CUDA when available);
    ``on_rows``: called with all rows so far after each group of rows.
    """
    devices = bench_devices() if devices is None else devices
    import_pyhessian()  # the reference is an optional extra: say so before any work
    rows = RowLog(on_rows)
    if "cpu" in devices:
        with torch_threads(THREADS):
            _case_rows(rows, _digits_case(quick), 1 if quick else 5, quick, dense=True)
    if "cuda" in devices:
        # sharpscope's analyses run in IEEE float32 (sharpscope.precision); so does the
        # reference here, for the same arithmetic
        with ieee_float32():
            _case_rows(rows, _resnet_case(quick), 1, quick, dense=False)
    return list(rows)


def _case_rows(rows: RowLog, case: _Case, top5_repeats: int, quick: bool, dense: bool) -> None:
    """Every row of one case, added to ``rows``: against PyHessian, costs, HVP modes
    (progress on stderr)."""
    start = time.perf_counter()
    rows += _top5_rows(case, top5_repeats, dense=dense)
    progress_note(f"{case.name}: top-5 against PyHessian ({time.perf_counter() - start:.0f} s)")
    grad_seconds = _grad_seconds(case, 3 if quick else 7)
    # SLQ's cost is linear in the probes; on the GPU case 4 keep the run inside a short lease
    rows += _cost_rows(
        case, grad_seconds, quick, slq_probes=10 if dense else 4, repeats=3 if dense else 1
    )
    progress_note(f"{case.name}: costs ({time.perf_counter() - start:.0f} s)")
    rows += _mode_rows(case, grad_seconds, 3 if quick or not dense else 7)
    progress_note(f"{case.name}: HVP modes ({time.perf_counter() - start:.0f} s)")
