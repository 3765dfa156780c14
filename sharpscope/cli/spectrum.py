"""``sharpscope spectrum CKPT``: top eigenvalues, trace and density of a checkpoint's Hessian.

Load (checkpoint or bare state_dict + ``--model``/``--data``/``--loss``), call
:func:`sharpscope.analysis.spectrum`, print and save. Under ``torchrun
--nproc_per_node N`` every rank takes a shard of the data and the products are
all-reduced; only rank 0 prints and writes files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import SharpscopeError, check_choice, check_seed
from ._common import (
    BatchSizeOpt,
    CkptArg,
    DataOpt,
    DataOptOpt,
    DataRootOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    LossOpt,
    ModelOpt,
    ModelOptOpt,
    NoProgressOpt,
    SamplesOpt,
    SplitOpt,
    TrustFactoriesOpt,
    check_counts,
    check_not_the_checkpoint,
    check_number,
    check_output_file,
    console,
    echo,
    fail,
    guarded,
    interrupt_exit_code,
    load_inputs_from_flags,
    path_option,
    progress_bar,
    seed_option,
    speaks_for_the_job,
    stop_reason,
)

SeedOpt = seed_option("the start vectors and probes (trace: seed+1, density: seed+2)")


def _choices() -> dict[str, tuple[str, ...]]:
    """Each choice flag's values, as the library defines them (one list per rule)."""
    from ..analysis.spectrum import BACKENDS, TRACE_METHODS
    from ..curvature.lanczos import WHICH
    from ..curvature.operator import BN_MODES, HVP_MODES
    from ..curvature.slq import KERNELS

    return {
        "backend": BACKENDS,
        "which": WHICH,
        "dtype": ("float32", "float64"),
        "trace_method": TRACE_METHODS,
        "kernel": KERNELS,
        "hvp_mode": HVP_MODES,
        "bn_mode": BN_MODES,
    }


def _check_choice(flag: str, value: str) -> None:
    check_choice(f"--{flag.replace('_', '-')}", value, _choices()[flag])


# What each trace method accepts as --trace-probes (sharpscope.curvature.trace).
TRACE_PROBES = {
    "hutchpp": "a multiple of 3, at least 6 (Hutch++ splits them in three; default 99)",
    "hutchinson": "at least 2 (default 100)",
}


def check_trace_probes(method: str, probes: int | None) -> None:
    """Refuse a ``--trace-probes`` count that ``method`` cannot use, before any work.

    >>> check_trace_probes("hutchpp", 9), check_trace_probes("hutchinson", 2)
    (None, None)
    >>> check_trace_probes("hutchpp", 4)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: --trace-probes 4 does not suit --trace-method hutchpp: \
give a multiple of 3, at least 6 (Hutch++ splits them in three; default 99)
    """
    from ..curvature.trace import check_trace_budget

    if probes is None:
        return
    try:
        check_trace_budget(method, probes)
    except SharpscopeError:  # the same rule, said in the flags' words
        raise SharpscopeError(
            f"--trace-probes {probes} does not suit --trace-method {method}: "
            f"give {TRACE_PROBES[method]}"
        ) from None


def check_plot_path(plot: Path | None) -> None:
    """``--plot PATH``: ``PATH``, ``PATH.pdf`` or ``PATH.png`` (both files are written),
    and both files writable. A suffix of letters other than those reads as another file
    format and is refused; other dots belong to the name.

    >>> check_plot_path(Path("sam_rho0.05"))
    >>> check_plot_path(Path("density.jpg"))
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: --plot density.jpg: the plot is written as PATH.pdf \
and PATH.png, so give a path ending in .pdf, .png or no suffix, e.g. density.pdf
    """
    from ..plotting.style import FIGURE_SUFFIXES, beside, figure_base

    if plot is None:
        return
    if plot.is_dir():  # as --json: a folder is no file name (PATH.pdf would land beside it)
        raise SharpscopeError(
            f"--plot {plot} is a folder; give a file name, e.g. {plot / 'density.pdf'}"
        )
    if plot.suffix[1:].isalpha() and plot.suffix not in FIGURE_SUFFIXES:
        raise SharpscopeError(
            f"--plot {plot}: the plot is written as PATH.pdf and PATH.png, so give a path "
            f"ending in .pdf, .png or no suffix, e.g. {plot.with_suffix('.pdf')}"
        )
    for suffix in FIGURE_SUFFIXES:
        check_output_file("--plot", beside(figure_base(plot), suffix), example="density.pdf")


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def summary_lines(result) -> list[str]:
    """The lines ``sharpscope spectrum`` prints on stdout."""
    lines = []
    which = result.top.which
    eigs = ", ".join(f"{v:.6g}" for v in result.eigenvalues.tolist())
    # Every `which` lists its eigenvalues in descending order, as the JSON does.
    label = {
        "LA": "top {k} eigenvalues",
        "SA": "{k} most negative eigenvalues (descending: the most negative last)",
        "LM": "{k} eigenvalues of largest |λ| (descending)",
    }[which].format(k=result.top.k)
    lines.append(f"{label}: {eigs}")
    if which == "LA":
        lines.append(f"lambda_max: {_fmt(result.lambda_max)}")
        lines.append(f"lambda_5: {_fmt(result.lambda_5)}")
        lines.append(f"lambda_max/lambda_5: {_fmt(result.ratio)}")
    else:
        lines.append(
            f"lambda_max, lambda_5, lambda_max/lambda_5: n/a with --which {which} "
            "(they are defined from the largest eigenvalues, --which LA)"
        )
    if result.trace_estimate is not None:
        lines.append(
            f"trace: {result.trace:.6g} +- {_fmt(result.trace_stderr)} "
            f"({result.trace_estimate.method})"
        )
    skipped = [part for part in ("trace", "density") if part not in result.parts]
    if skipped:
        lines.append(f"skipped: {', '.join(skipped)}")
    # the time is the whole call's: data on the device, the pre-flight and the HVP mode timing
    lines.append(
        f"hvp_count: {result.hvp_count:g} full passes; {result.seconds:.2f} s in all, setup included"
    )
    if not all(result.top.converged):
        bad = [i + 1 for i, c in enumerate(result.top.converged) if not c]
        advice = (
            "PyHessian's power iteration stops on a 1e-3 relative change"
            if result.top.backend == "pyhessian"
            else "raise --max-steps or --tol"
        )
        lines.append(
            f"warning: eigenvalue(s) {bad} have residuals above tol {result.top.tol:g} ({advice})"
        )
    deflated = () if result.density is None else result.density.deflated_converged
    if not all(deflated):
        lines.append(
            f"warning: {sum(not c for c in deflated)} of the {len(deflated)} deflated "
            "eigenvalues did not converge (the density is of the rest along inexact directions)"
        )
    return lines


def parse_skip(
    values: list[str] | None, *, deflate: int = 0, plot: Path | None = None
) -> frozenset[str]:
    """``--skip`` values (repeated or comma-separated) as a checked set of parts.

    >>> sorted(parse_skip(["trace,density"]))
    ['density', 'trace']
    >>> parse_skip(["density"], plot=Path("d.pdf"))
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: --plot draws the density, which --skip density leaves out
    """
    from ..analysis.spectrum import check_skip

    parts = [p.strip() for value in values or () for p in value.split(",") if p.strip()]
    try:
        skipped = check_skip(parts, deflate=deflate)
    except SharpscopeError as exc:
        raise SharpscopeError(f"--skip: {exc}".replace("deflate ", "--deflate ")) from None
    if "density" in skipped and plot is not None:
        raise SharpscopeError("--plot draws the density, which --skip density leaves out")
    return skipped


def register(app: typer.Typer) -> None:
    """Add ``sharpscope spectrum``."""

    @app.command("spectrum")
    @guarded
    def spectrum_command(
        ckpt: CkptArg,
        model: ModelOpt = None,
        data: DataOpt = None,
        loss: LossOpt = None,
        k: int = typer.Option(5, "--k", help="Number of top eigenvalues."),
        probes: int = typer.Option(10, "--probes", help="SLQ probes n_v for the density."),
        lanczos_steps: int = typer.Option(
            90, "--lanczos-steps", help="Lanczos steps m per SLQ probe."
        ),
        samples: SamplesOpt = None,
        batch_size: BatchSizeOpt = None,
        device: DeviceOpt = "auto",
        seed: SeedOpt = 0,
        json_out: JsonOpt = None,
        plot: Annotated[
            Optional[Path],
            path_option(
                "--plot",
                "Write the density plot as PATH.pdf and PATH.png (PATH may end in .pdf or "
                ".png; either way both are written).",
            ),
        ] = None,
        backend: str = typer.Option(
            "sharpscope", "--backend", help="sharpscope or pyhessian (top-k and trace)."
        ),
        which: str = typer.Option(
            "LA",
            "--which",
            help="LA (largest), SA (most negative) or LM (largest |λ|); listed in descending "
            "order. lambda_max, lambda_5 and ratio are defined from the largest (LA) and are "
            "null with SA or LM.",
        ),
        dtype: DtypeOpt = "float32",
        trust_factories: TrustFactoriesOpt = False,
        eigenvectors: Annotated[
            Optional[Path], path_option("--eigenvectors", "Save the top-k eigenvectors to OUT.npz.")
        ] = None,
        tol: float = typer.Option(
            1e-5, "--tol", help="Relative Ritz-residual tolerance (> 0) of the top-k."
        ),
        max_steps: Optional[int] = typer.Option(
            None,
            "--max-steps",
            help="Most Lanczos steps for top-k (at least --k) [default: max(100, 2k + 10)].",
        ),
        trace_method: str = typer.Option(
            "hutchpp", "--trace-method", help="hutchpp or hutchinson."
        ),
        trace_probes: Optional[int] = typer.Option(
            None,
            "--trace-probes",
            help="Trace budget: Hutch++ a multiple of 3, >= 6; Hutchinson >= 2 "
            "[default: 99 Hutch++, 100 Hutchinson].",
        ),
        kernel: str = typer.Option(
            "ghorbani", "--kernel", help="Density smoothing: ghorbani, papyan or log."
        ),
        deflate: int = typer.Option(
            0, "--deflate", help="Deflate the top-N (N >= 0) before SLQ; 0: none."
        ),
        split: SplitOpt = "train",
        data_root: DataRootOpt = None,
        model_opt: ModelOptOpt = None,
        data_opt: DataOptOpt = None,
        hvp_mode: str = typer.Option(
            "auto", "--hvp-mode", help="auto (time both), forward or reverse."
        ),
        bn_mode: str = typer.Option(
            "eval", "--bn-mode", help="eval (running statistics) or batch (opt-in)."
        ),
        weight_decay: float = typer.Option(
            0.0, "--weight-decay", help="Add (wd/2)|θ|² to the loss (shifts λ by wd; wd >= 0)."
        ),
        basis_device: Optional[str] = typer.Option(
            None, "--basis-device", help="Keep the Lanczos basis there (e.g. cpu)."
        ),
        restart_size: Optional[int] = typer.Option(
            None,
            "--restart-size",
            help="Thick-restart Lanczos with at most N basis vectors (2k+10 suggested).",
        ),
        block_size: Optional[int] = typer.Option(
            None,
            "--block-size",
            help="Block Lanczos with N start vectors: finds eigenvalues repeated up to N "
            "times (a mean-MSE Hessian repeats each C times, for C outputs); --max-steps "
            "then counts products.",
        ),
        skip: Optional[list[str]] = typer.Option(
            None,
            "--skip",
            metavar="<part>",
            help="Skip trace and/or density (repeatable or comma-separated; the top-k "
            "always runs): '--skip trace,density' gives λ1..λk in ~1/20 to 1/70 of the "
            "default's Hessian-vector products. Skipped parts are null in --json.",
        ),
        no_progress: NoProgressOpt = False,
    ) -> None:
        """Top-k Hessian eigenvalues, trace and spectral density of a checkpoint."""
        from ..analysis.spectrum import check_sizes_fit, spectrum
        from ..distributed import init_from_env

        for flag, value in (
            ("backend", backend),
            ("which", which),
            ("dtype", dtype),
            ("trace_method", trace_method),
            ("kernel", kernel),
            ("hvp_mode", hvp_mode),
            ("bn_mode", bn_mode),
        ):
            _check_choice(flag, value)
        if eigenvectors is not None and eigenvectors.suffix != ".npz":
            raise SharpscopeError(f"--eigenvectors must name a .npz file, got '{eigenvectors}'")
        # Every count and output path is checked here, before the checkpoint is loaded:
        # the analysis itself would find a bad one only after the parts before it ran.
        check_counts(
            {
                "--k": k,
                "--probes": probes,
                "--lanczos-steps": lanczos_steps,
                "--samples": samples,
                "--batch-size": batch_size,
            }
        )
        check_number("--deflate", deflate, minimum=0, hint=" (0: no deflation)")
        skipped = parse_skip(skip, deflate=deflate, plot=plot)
        if block_size is not None:
            from ..analysis.spectrum import check_block_options

            check_number("--block-size", block_size, minimum=1)
            try:
                check_block_options(
                    block_size, backend, restart_size, return_eigenvectors=eigenvectors is not None
                )
            except SharpscopeError as exc:
                raise SharpscopeError(
                    str(exc)
                    .replace("block_size (block Lanczos)", "--block-size")
                    .replace("take eigenvectors", "take --eigenvectors")
                    .replace("take restart_size", "take --restart-size")
                    .replace("take backend", "take --backend")
                ) from None
        check_number("--tol", tol, minimum=0, inclusive=False, hint=" (default 1e-05)")
        check_number("--weight-decay", weight_decay, minimum=0)
        if backend == "sharpscope" and "trace" not in skipped:  # PyHessian's: own budget
            check_trace_probes(trace_method, trace_probes)
        from ..analysis.spectrum import default_max_steps

        if max_steps is None:
            max_steps = default_max_steps(k)
        elif max_steps < k:
            raise SharpscopeError(
                f"--max-steps {max_steps} is fewer than --k {k}: Lanczos finds at most one "
                f"eigenvalue per step; use --max-steps {default_max_steps(k)} or leave it out"
            )
        if restart_size is not None and restart_size <= k:
            raise SharpscopeError(
                f"--restart-size {restart_size} must be larger than --k {k}: the thick "
                f"restarts keep the k wanted vectors and add new ones (2k + 10 = {2 * k + 10} "
                "suggested)"
            )
        check_seed("--seed", seed)
        if basis_device is not None:  # checked as --device is, before the work
            from ..distributed import pick_device

            try:
                pick_device(basis_device)
            except SharpscopeError as exc:
                message = str(exc).replace("--device", "--basis-device")
                raise SharpscopeError(f"--basis-device: {message}") from None
            if basis_device.strip().lower() == "auto":
                basis_device = None  # the default: where the products are computed
        check_output_file("--json", json_out)
        check_not_the_checkpoint("--json", json_out, ckpt)
        check_output_file("--eigenvectors", eigenvectors, example="eigenvectors.npz")
        check_plot_path(plot)

        dist = init_from_env(device)
        # Data stays on the CPU here: each rank moves only its own shard to its device.
        inputs = load_inputs_from_flags(
            ckpt,
            model=model,
            data=data,
            loss=loss,
            split=split,
            samples=samples,
            batch_size=batch_size,
            device="cpu",
            seed=seed,
            data_root=data_root,
            model_opt=model_opt,
            data_opt=data_opt,
            dtype=dtype,
            trust_factories=trust_factories,
        )
        num_params = inputs.meta.num_params
        if num_params == 0:  # not "use k <= 0", which --k refuses
            raise SharpscopeError(
                "the model has no trainable parameters (all requires_grad=False?): there is "
                "no Hessian to analyse"
            )
        if num_params is not None:  # before the pre-flight's work
            check_sizes_fit(
                num_params,
                k=k,
                block_size=block_size,
                deflate=deflate,
                option=lambda name: "--" + name.replace("_", "-"),
            )
        net = inputs.model.to(dist.device)
        loss_spec = inputs.loss_spec
        if dist.is_main:
            console.print(
                f"spectrum of {ckpt} on {inputs.meta.num_samples} examples "
                f"({dist.world_size} process{'es' if dist.world_size > 1 else ''}, {dist.device})"
            )
        # Progress in Hessian-vector products: top-k (≤ max_steps), trace, density.
        expected = (
            min(max_steps, inputs.meta.num_params or max_steps)
            + (0 if "trace" in skipped else trace_probes or 99)
            + (0 if "density" in skipped else probes * lanczos_steps)
        )
        bar = progress_bar(expected, "hvp", "spectrum", enabled=dist.is_main and not no_progress)
        # Before the first product the pre-flight runs (two gradient passes, the HVP mode
        # timing with --hvp-mode auto): say so, and start the rate and ETA after it.
        bar.set_description_str("spectrum (pre-flight: gradient passes, HVP mode timing)")
        first = [True]

        def advance(n: int) -> None:
            if first[0]:
                first[0] = False
                bar.set_description_str("spectrum", refresh=False)
                bar.reset(total=bar.total)
            bar.update(n)

        try:
            with bar:
                result = spectrum(
                    net,
                    inputs.batches,
                    k,
                    loss_spec,
                    which=which,  # type: ignore[arg-type]
                    tol=tol,
                    max_steps=max_steps,
                    trace_method=trace_method,
                    trace_probes=trace_probes,
                    num_probes=probes,
                    num_lanczos_steps=lanczos_steps,
                    kernel=kernel,  # type: ignore[arg-type]
                    deflate=deflate,
                    return_eigenvectors=eigenvectors is not None,
                    seed=seed,
                    device=dist.device,
                    basis_device=basis_device,
                    restart_size=restart_size,
                    block_size=block_size,
                    backend=backend,
                    skip=skipped,
                    meta=inputs.meta,
                    hvp_mode=hvp_mode,
                    bn_mode=bn_mode,
                    weight_decay=weight_decay,
                    distributed=dist.enabled,  # under torchrun the ranks share the data
                    progress=advance,
                )
                # The total assumed every Lanczos step; converged early, it ends where it did.
                bar.total = bar.n
                bar.refresh()
        except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: keep the finished parts
            partial = getattr(exc, "partial_result", None)
            # rank 0 keeps them; when a process was lost (perhaps rank 0), every survivor
            # does: each holds the same all-reduced parts, and the writes are atomic
            if partial is None or json_out is None or not speaks_for_the_job(exc, dist.is_main):
                raise
            partial.save(json_out)
            stopped = partial.meta.extra["interrupted_in"]
            fail(
                f"{stop_reason(exc)} during the {stopped}; {json_out} holds the parts finished "
                f"before it ({', '.join(partial.parts)}), the rest null",
                code=interrupt_exit_code(exc),
            )
        if not dist.is_main:
            return
        for line in summary_lines(result):
            echo(line)
        if json_out is not None:
            result.save(json_out)
            console.print(f"wrote {json_out}")
        if plot is not None:
            from ..plotting.spectrum import save_spectrum_plot

            written = save_spectrum_plot(result, plot)
            console.print(f"wrote {', '.join(str(p) for p in written[:2])}")
        if eigenvectors is not None:
            result.top.save(eigenvectors)
            console.print(f"wrote {eigenvectors}")
