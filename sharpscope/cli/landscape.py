"""``sharpscope landscape CKPT``: loss-landscape slices around a checkpoint (Li et al. 2018).

``--directions`` is ``random`` (filter-normalized), ``eigen`` (top Hessian
eigenvectors), a second checkpoint (linear interpolation) or a folder of checkpoints
(PCA of the training trajectory). Writes ``OUT/landscape.npz`` incrementally (an
interrupted run resumes when started again with the same settings) and the plots
``OUT/landscape_1d`` or ``OUT/landscape_contour`` and ``OUT/landscape_surface`` as PDF
and PNG. Under ``torchrun --nproc_per_node N`` the grid points are split across the
processes; rank 0 writes the files.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..errors import SharpscopeError, check_choice, check_seed
from ..locking import locked_on_main, make_folder, transient_lock
from ..progress import resumable_updates
from ._common import (
    BatchSizeOpt,
    CkptArg,
    DataOpt,
    DataOptOpt,
    DataRootOpt,
    DeviceOpt,
    DtypeOpt,
    LossOpt,
    ModelOpt,
    ModelOptOpt,
    NoProgressOpt,
    SamplesOpt,
    SplitOpt,
    TrustFactoriesOpt,
    check_counts,
    check_number,
    check_output_file,
    check_output_folder,
    console,
    echo,
    fail,
    guarded,
    interrupt_exit_code,
    load_inputs_from_flags,
    parse_options,
    path_option,
    progress_bar,
    seed_option,
    speaks_for_the_job,
    spec_from_flag,
    stop_reason,
)

SeedOpt = seed_option("the random directions and the eigen solver's start")

RESULT_FILE = "landscape.npz"
#: held by a running ``landscape`` in its --out folder, and removed when it ends
LOCK_FILE = "landscape.lock"


def resolve_directions(
    directions: str,
    ckpt: Path,
    inputs: Any,
    model_spec: dict | None,
    data_spec: dict | None,
    trust_factories: bool = False,
) -> Any:
    """``random``/``eigen`` as they are; a file -> its checkpoint; a folder -> its checkpoints
    (a model factory one of them names is imported only with ``trust_factories``). Loaded
    checkpoints, not bare models: the landscape records their paths and hashes."""
    from ..io import is_sharpscope_checkpoint, load_checkpoint, safe_load

    if directions in ("random", "eigen"):
        return directions
    path = Path(directions)

    def load(file: Path) -> Any:
        # A sharpscope checkpoint is built from its own spec, so that a different
        # architecture is reported as such; a bare state_dict takes the main model's spec.
        if model_spec is None and is_sharpscope_checkpoint(safe_load(file)):
            return load_checkpoint(file, data_spec=data_spec, trust_factories=trust_factories)
        return load_checkpoint(
            file,
            model_spec=model_spec or inputs.checkpoint.spec,
            data_spec=data_spec or inputs.checkpoint.data_spec,
        )

    if path.is_file():
        return load(path)
    if path.is_dir():
        own = ckpt.resolve()
        # the analysed checkpoint stays: it is the trajectory's end (its row θ − θ is 0),
        # counted once whether or not an epoch_NNN.pt repeats it
        files = sorted(path.glob("*.pt"))
        if not files:
            raise SharpscopeError(f"--directions folder {path} holds no .pt checkpoints")
        loaded = _distinct_weights([load(p) for p in files])
        loaded.sort(key=lambda c: (c.epoch is None, c.epoch or 0, str(c.path)))
        many = "checkpoint" if len(loaded) == 1 else "checkpoints"
        console.print(f"PCA of a trajectory of {len(loaded)} {many} from {path}")
        outside = _weights_key(inputs.checkpoint.model) not in {
            _weights_key(c.model) for c in loaded
        }
        if outside and own.parent != path.resolve():
            console.print(
                f"note: {ckpt} is not among the checkpoints of {path}: the trajectory is "
                "projected around a model outside it"
            )
        return loaded  # Checkpoints: an error can name the file
    raise SharpscopeError(
        f"--directions must be random, eigen, a checkpoint file or a folder of checkpoints; "
        f"'{directions}' is none of these"
    )


#: options that shape no direction of a kind: (flag, default) and why
_UNUSED_OPTIONS = {
    "pca": (
        [("--span", 1.0), ("--norm", "filter")],
        "a PCA trajectory's axes cover its checkpoints and its components have unit norm",
    ),
    "eigen": (
        [("--norm", "filter"), ("--bias", "ignore")],
        "Hessian eigenvectors have unit norm over every trainable parameter",
    ),
    "interpolation": (
        [("--norm", "filter"), ("--bias", "ignore")],
        "the interpolation direction is the difference of the two models as it is",
    ),
}


def unused_options_note(kind: str, given: dict[str, Any]) -> str | None:
    """A note naming the flags given away from their defaults that ``kind``'s directions
    ignore (a 2-D interpolation's second, random direction does use --norm and --bias).

    >>> unused_options_note("pca", {"--span": 5.0, "--norm": "filter", "--bias": "keep"})
    "note: --span does not apply here: a PCA trajectory's axes cover its checkpoints and its components have unit norm"
    """
    if kind not in _UNUSED_OPTIONS:
        return None
    flags, why = _UNUSED_OPTIONS[kind]
    unused = [flag for flag, default in flags if given.get(flag, default) != default]
    if not unused:
        return None
    verb = "does" if len(unused) == 1 else "do"
    return f"note: {' and '.join(unused)} {verb} not apply here: {why}"


def _weights_key(model: Any) -> tuple[tuple[str, ...], str]:
    """A model's tensor names and a hash of their values (in float64, so a copy cast to
    another dtype or device has the same key): equal keys, equal weights."""
    from ..analysis._functional import fingerprint

    state = model.state_dict()
    return tuple(state), fingerprint(*(t.double() for t in state.values()))


def _distinct_weights(checkpoints: list[Any]) -> list[Any]:
    """Each set of weights once: ``last.pt`` repeats the last ``epoch_NNN.pt``, and a point
    counted twice would weigh twice in the PCA."""
    kept, seen = [], set()
    for checkpoint in sorted(checkpoints, key=lambda c: str(c.path)):  # epoch_* before last
        key = _weights_key(checkpoint.model)
        if key not in seen:
            seen.add(key)
            kept.append(checkpoint)
    return kept


def hold_out_folder(out: Path, held: contextlib.ExitStack) -> None:
    """Create ``out`` if needed and lock ``OUT/landscape.lock`` until ``held`` closes, so that
    a second ``landscape`` into the folder is refused instead of writing its own points over
    the first one's file (the last writer won; the other's result was lost). A lock file
    (not the folder itself, which ``train`` locks) lets a landscape go into a run's folder
    while it trains. The lock file, and the folders made here that are then empty (a run
    that stopped before writing anything), are removed when ``held`` closes."""
    held.callback(make_folder(out))  # removes them after the lock file is gone
    busy = (
        f"another `sharpscope landscape` is writing into {out}; wait for it to finish or "
        "use another --out"
    )
    held.enter_context(transient_lock(out / LOCK_FILE, busy))


def interrupted_message(path: Path, reason: str = "interrupted") -> str:
    """What to say when a run is interrupted (``reason``) after it wrote ``path``: how far
    it got and that the same command resumes it."""
    try:
        from ..analysis.landscape import LandscapeResult

        saved = LandscapeResult.load(path).computed
        kept = f"{int(saved.sum())}/{saved.numel()} points are saved in {path}"
    except Exception:  # a file we cannot read says nothing about the run; still resumable
        kept = f"the points computed so far are saved in {path}"
    return f"{reason}; {kept}: run the same command again to resume"


def summary_lines(result: Any) -> list[str]:
    """What ``sharpscope landscape`` prints on stdout."""
    import torch

    shape = "x".join(str(n) for n in result.loss.shape)
    lines = [f"{result.direction_kind} {result.dims}-D landscape, grid {shape}"]
    finite = torch.isfinite(result.loss)
    if bool(finite.any()):
        flat = torch.where(finite, result.loss, torch.inf).argmin()
        index = tuple(int(i) for i in torch.unravel_index(flat, result.loss.shape))
        where = ", ".join(f"{float(a[i]):.4g}" for a, i in zip(result.axes, index))
        lines.append(f"min loss {float(result.loss[index]):.6g} at ({where})")
    if result.cosine is not None:
        lines.append(f"cosine between the directions: {result.cosine:.3g}")
    done = int(result.computed.sum())
    # a resumed run computes only the points its earlier file lacks
    loaded = int(result.meta.extra.get("points_loaded", 0))
    computed_now = int(result.meta.extra.get("points_evaluated", done - loaded))
    counts = f"{done}/{result.computed.numel()} points"
    if loaded:
        counts += f": {computed_now} computed in {result.seconds:.2f} s, {loaded} loaded from "
        counts += "the earlier run"
    else:
        counts += f" computed in {result.seconds:.2f} s"
    lines.append(counts + ("" if result.complete else " (incomplete: run again to resume)"))
    return lines


def register(app: typer.Typer) -> None:
    """Add ``sharpscope landscape``."""

    @app.command("landscape")
    @guarded
    def landscape_command(
        ckpt: CkptArg,
        dims: int = typer.Option(2, "--dims", help="1 or 2."),
        grid: int = typer.Option(41, "--grid", help="Points per axis (≥ 3)."),
        span: float = typer.Option(
            1.0,
            "--span",
            help="Axes [-span, span], with 0 among the points: an even --grid drops +span "
            "(span 1, grid 4: -1, -0.5, 0, 0.5). Interpolation: about [-span/2, 1+span/2], "
            "with 0 and 1 among the points, in steps of 1/m (a small --grid can leave "
            "one side short: span 2, grid 5: -2 .. 2). PCA axes cover the trajectory "
            "instead.",
        ),
        directions: str = typer.Option(
            "random",
            "--directions",
            help="random, eigen, CKPT2 (interpolation) or a folder of checkpoints (PCA).",
        ),
        norm: str = typer.Option(
            "filter",
            "--norm",
            help="Direction normalization: filter, layer, element, none (random directions, "
            "and the second one of a 2-D interpolation).",
        ),
        bias: str = typer.Option(
            "ignore",
            "--bias",
            help="Biases and BN parameters: ignore, keep, normalize (random directions and a "
            "2-D interpolation's second one; ignore also leaves them out of a PCA).",
        ),
        states: Optional[bool] = typer.Option(
            None,
            "--states/--no-states",
            help="With --directions CKPT2 (interpolation) only: interpolate the BN running "
            "statistics too [default: yes when the model has them].",
        ),
        model: ModelOpt = None,
        data: DataOpt = None,
        loss: LossOpt = None,
        samples: SamplesOpt = None,
        batch_size: BatchSizeOpt = None,
        split: SplitOpt = "train",
        data_root: DataRootOpt = None,
        model_opt: ModelOptOpt = None,
        data_opt: DataOptOpt = None,
        device: DeviceOpt = "auto",
        dtype: DtypeOpt = "float32",
        trust_factories: TrustFactoriesOpt = False,
        seed: SeedOpt = 0,
        chunk_size: Optional[int] = typer.Option(
            None, "--chunk-size", help="Grid points per vectorized call [default: automatic]."
        ),
        vectorize: Optional[bool] = typer.Option(
            None,
            "--vectorize/--no-vectorize",
            help="vmap over grid points, or a loop [default: the loop on CPU; on a GPU vmap, "
            "unless one point's forward pass already fills the GPU]. --no-vectorize on a GPU "
            "leaves BatchNorm unfolded: resume a slice with the option it was started with.",
        ),
        save_every: float = typer.Option(
            30.0,
            "--save-every",
            help="Seconds (>= 0) between incremental writes of landscape.npz; 0: after every "
            "block.",
        ),
        max_points: Optional[int] = typer.Option(
            None, "--max-points", help="Stop after about N new points (resume later)."
        ),
        out: Annotated[
            Path, path_option("--out", "Output folder (landscape.npz and plots).")
        ] = Path("landscape"),
        plots: bool = typer.Option(True, "--plots/--no-plots", help="Write PDF and PNG plots."),
        no_progress: NoProgressOpt = False,
    ) -> None:
        """Loss and accuracy on 1-D or 2-D slices around a checkpoint."""
        from ..analysis.directions import BIAS_MODES, NORMS, check_same_model
        from ..analysis.landscape import MIN_GRID, landscape
        from ..distributed import init_from_env

        check_choice("--norm", norm, NORMS)
        check_choice("--bias", bias, BIAS_MODES)
        if dims not in (1, 2):
            raise SharpscopeError(f"--dims must be 1 or 2, got {dims}")
        if grid < MIN_GRID:
            raise SharpscopeError(f"--grid must be at least {MIN_GRID} points per axis, got {grid}")
        # Every number and the output folder are checked before the checkpoint is loaded.
        check_number("--span", span, minimum=0, inclusive=False)
        check_number("--save-every", save_every, minimum=0, hint=" (seconds; 0: after every block)")
        check_counts(
            {
                "--max-points": max_points,
                "--chunk-size": chunk_size,
                "--samples": samples,
                "--batch-size": batch_size,
            }
        )
        if states and (directions in ("random", "eigen") or Path(directions).is_dir()):
            raise SharpscopeError(
                "--states moves BatchNorm statistics between two models: it is for "
                "interpolation only (--directions CKPT2)"
            )
        check_seed("--seed", seed)
        check_output_folder("--out", out, holds=f"{RESULT_FILE} and the plots")
        check_output_file("--out", out / RESULT_FILE, fixed_name=True)
        dist = init_from_env(device)
        # held to the last plot; taken before the inputs load, so a second run stops at once
        with locked_on_main(out, hold_out_folder, device):
            model_options = parse_options(model_opt, "--model-opt")
            data_options = parse_options(data_opt, "--data-opt")
            inputs = load_inputs_from_flags(
                ckpt,
                model=model,
                data=data,
                loss=loss,
                split=split,
                samples=samples,
                batch_size=batch_size,
                device=str(dist.device),
                seed=seed,
                data_root=data_root,
                model_opt=model_opt,
                data_opt=data_opt,
                dtype=dtype,
                trust_factories=trust_factories,
            )
            chosen = resolve_directions(
                directions,
                ckpt,
                inputs,
                spec_from_flag(model, model_options),
                spec_from_flag(data, data_options),
                trust_factories,
            )
            check_same_model(inputs.model, chosen)  # before the bar and the first point
            kind = (
                chosen if isinstance(chosen, str) else "pca" if isinstance(chosen, list) else None
            )
            if kind is None and dims == 1:
                kind = "interpolation"  # in 2-D its second direction is random: all flags apply
            note = unused_options_note(kind or "", {"--span": span, "--norm": norm, "--bias": bias})
            if note and dist.is_main:
                console.print(note)
            loss_spec = inputs.loss_spec
            path = out / RESULT_FILE
            if dist.is_main:  # a resume is named on the bar once the earlier file is accepted
                console.print(
                    f"landscape of {ckpt} on {inputs.meta.num_samples} examples, "
                    f"{dist.world_size} process{'es' if dist.world_size > 1 else ''}"
                )
            bar = progress_bar(
                grid**dims, "point", "landscape", enabled=dist.is_main and not no_progress
            )
            try:
                with bar:
                    result = landscape(
                        inputs.model,
                        inputs.batches,
                        dims,
                        grid=grid,
                        span=span,
                        directions=chosen,
                        norm=norm,  # type: ignore[arg-type]
                        bias=bias,  # type: ignore[arg-type]
                        states=states,
                        loss=loss_spec,
                        seed=seed,
                        chunk_size=chunk_size,
                        out=path,
                        save_every=save_every,
                        max_points=max_points,
                        vectorize=vectorize,
                        meta=inputs.meta,
                        distributed=dist.enabled,
                        progress=resumable_updates(bar),
                    )
            except KeyboardInterrupt as exc:
                if speaks_for_the_job(exc, dist.is_main) and path.is_file():
                    fail(interrupted_message(path, stop_reason(exc)), code=interrupt_exit_code(exc))
                raise
            if not dist.is_main:
                return
            for line in summary_lines(result):
                echo(line)
            console.print(f"wrote {path}")
            if plots:
                from ..plotting.landscape import save_landscape_plots

                written = save_landscape_plots(result, out)
                console.print(f"wrote {', '.join(str(p) for p in written)}")
