"""``sharpscope msharpness CKPT``: m-sharpness of a checkpoint (SAM paper definition).

Load (checkpoint or bare state_dict + ``--model``/``--data``/``--loss``), call
:func:`sharpscope.analysis.msharpness.m_sharpness`, print one summary line and
optionally write the result JSON (interface.md: ``m``, ``rho``, ``adaptive``,
``steps``, ``sharpness``, ``meta`` and more).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import SharpscopeError
from ._common import console, guarded, parse_options


def summary_line(result) -> str:
    """The line ``sharpscope msharpness`` prints on stdout."""
    kind = "adaptive " if result.adaptive else ""
    steps = f"{result.steps} step{'s' if result.steps > 1 else ''}"
    error = (
        ""
        if result.error_increase != result.error_increase  # NaN: no class labels
        else f", 0-1 error increase {result.error_increase:.6g}"
    )
    return (
        f"{kind}m-sharpness (m={result.m}, rho={result.rho:g}, {result.norm}, {steps}): "
        f"{result.sharpness:.6g}{error} over {result.num_samples_used} examples "
        f"in {result.num_subsets} subsets ({result.seconds:.2f} s)"
    )


def register(app: typer.Typer) -> None:
    """Add ``sharpscope msharpness``."""

    @app.command("msharpness")
    @guarded
    def msharpness_command(
        ckpt: Path = typer.Argument(..., help="Checkpoint (.pt) or bare state_dict file."),
        m: int = typer.Option(128, "--m", help="Subset size m (SAM paper §4.1)."),
        rho: float = typer.Option(0.05, "--rho", help="Radius ρ > 0."),
        adaptive: bool = typer.Option(
            False, "--adaptive", help="Adaptive (ASAM) constraint ‖ε/|w|‖ ≤ ρ."
        ),
        steps: int = typer.Option(
            1,
            "--steps",
            help="Ascent steps: 1 is SAM's perturbation, ≥2 Auto-PGD (20 for studies).",
        ),
        norm: str = typer.Option("l2", "--norm", help="l2 or linf."),
        logit_normalize: bool = typer.Option(
            False, "--logit-normalize", help="Center and L2-normalize the logits before the loss."
        ),
        eta: float = typer.Option(0.0, "--eta", help="η of the adaptive scale |w| + η."),
        random_start: bool = typer.Option(
            False, "--random-start", help="Start each ascent at a random boundary point."
        ),
        restarts: int = typer.Option(1, "--restarts", help="Ascents per subset (random start)."),
        projection: str = typer.Option(
            "exact", "--projection", help="Adaptive L2: exact (ellipsoid) or rescale."
        ),
        model: Optional[str] = typer.Option(
            None, "--model", help="Registry name or module:function (needed for a state_dict)."
        ),
        data: Optional[str] = typer.Option(
            None, "--data", help="Registry name or module:function [default: the checkpoint's]."
        ),
        loss: Optional[str] = typer.Option(
            None, "--loss", help="cross_entropy, mse or module:function [default: cross_entropy]."
        ),
        samples: Optional[int] = typer.Option(
            None, "--samples", help="Use the first N examples after a seeded shuffle."
        ),
        batch_size: Optional[int] = typer.Option(
            None, "--batch-size", help="Batches the data is read in (subsets are of size m)."
        ),
        split: str = typer.Option("train", "--split", help="train or test."),
        data_root: Optional[str] = typer.Option(
            None, "--data-root", help="Folder holding the CIFAR files."
        ),
        model_opt: Optional[list[str]] = typer.Option(
            None, "--model-opt", help="Model option KEY=VALUE (repeatable)."
        ),
        data_opt: Optional[list[str]] = typer.Option(
            None, "--data-opt", help="Data option KEY=VALUE (repeatable)."
        ),
        device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1 ..."),
        dtype: str = typer.Option("float32", "--dtype", help="float32 or float64."),
        seed: int = typer.Option(0, "--seed", help="Seed of the subset and of random starts."),
        chunk_size: Optional[int] = typer.Option(
            None, "--chunk-size", help="Subsets per vectorized call [default: automatic]."
        ),
        vectorize: bool = typer.Option(
            True, "--vectorize/--no-vectorize", help="vmap over subsets, or a Python loop."
        ),
        json_out: Optional[Path] = typer.Option(None, "--json", help="Write the result JSON."),
    ) -> None:
        """m-sharpness: mean over subsets of m examples of the worst loss increase within ρ."""
        from ..analysis.msharpness import NORMS, PROJECTIONS, m_sharpness
        from ._common import load_analysis_inputs

        if norm not in NORMS:
            raise SharpscopeError(f"--norm must be one of {', '.join(NORMS)}, got '{norm}'")
        if projection not in PROJECTIONS:
            raise SharpscopeError(
                f"--projection must be one of {', '.join(PROJECTIONS)}, got '{projection}'"
            )
        if rho <= 0:
            raise SharpscopeError(f"--rho must be > 0, got {rho}")
        inputs = load_analysis_inputs(
            ckpt,
            model,
            data,
            loss,
            split=split,
            samples=samples,
            batch_size=batch_size,
            device=device,
            seed=seed,
            data_root=data_root,
            model_options=parse_options(model_opt, "--model-opt"),
            data_options=parse_options(data_opt, "--data-opt"),
            dtype=dtype,
        )
        loss_spec = loss or inputs.checkpoint.raw.get("loss") or "cross_entropy"
        console.print(
            f"m-sharpness of {ckpt} on {inputs.meta.num_samples} examples ({inputs.device})"
        )
        result = m_sharpness(
            inputs.model,
            inputs.batches,
            m,
            rho,
            adaptive,
            steps,
            norm=norm,  # type: ignore[arg-type]
            loss=loss_spec,
            seed=seed,
            logit_normalize=logit_normalize,
            eta=eta,
            random_start=random_start,
            restarts=restarts,
            projection=projection,  # type: ignore[arg-type]
            chunk_size=chunk_size,
            vectorize=vectorize,
            meta=inputs.meta,
        )
        typer.echo(summary_line(result))
        if json_out is not None:
            result.save(json_out)
            console.print(f"wrote {json_out}")
