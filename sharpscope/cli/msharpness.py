"""``sharpscope msharpness CKPT``: m-sharpness of a checkpoint (SAM paper definition).

Load (checkpoint or bare state_dict + ``--model``/``--data``/``--loss``), call
:func:`sharpscope.analysis.msharpness.m_sharpness`, print one summary line and
optionally write the result JSON (interface.md: ``m``, ``rho``, ``adaptive``,
``steps``, ``sharpness``, ``meta`` and more).
"""

from __future__ import annotations

from typing import Optional

import typer

from ..data.batches import num_examples
from ..errors import check, check_choice, check_seed
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
    guarded,
    load_inputs_from_flags,
    progress_bar,
    seed_option,
)

SeedOpt = seed_option("the random starts (--random-start only)")


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
        f"in {result.num_subsets} subset{'s' if result.num_subsets != 1 else ''} "
        f"({result.seconds:.2f} s)"
    )


def register(app: typer.Typer) -> None:
    """Add ``sharpscope msharpness``."""

    @app.command("msharpness")
    @guarded
    def msharpness_command(
        ckpt: CkptArg,
        m: int = typer.Option(
            128,
            "--m",
            "--subset-size",
            help="Subset size m (SAM paper §4.1); --subset-size under torchrun, whose own "
            "parser takes --m for its options.",
        ),
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
        projection: Optional[str] = typer.Option(
            None,
            "--projection",
            help="Adaptive L2 with --steps >= 2: exact (Euclidean projection onto the "
            "ellipsoid, as Andriushchenko et al.; not rescaling-invariant, can stall below "
            "the maximum: 91-98% of it at the minimum of a quadratic) or rescale (ascent in "
            "the coordinates delta/|w|: invariant, reaches the maximum)  [default: exact].",
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
            None, "--chunk-size", help="Subsets per vectorized call [default: automatic]."
        ),
        vectorize: Optional[bool] = typer.Option(
            None,
            "--vectorize/--no-vectorize",
            help="vmap over subsets, or a Python loop [default: vmap, or the loop with a "
            "warning for a model vmap cannot trace].",
        ),
        json_out: JsonOpt = None,
        no_progress: NoProgressOpt = False,
    ) -> None:
        """m-sharpness: mean over subsets of m examples of the worst loss increase within ρ."""
        from ..analysis.msharpness import NORMS, PROJECTIONS, check_subset_size, m_sharpness
        from ..distributed import init_from_env

        check_choice("--norm", norm, NORMS)
        if projection is not None:
            check_choice("--projection", projection, PROJECTIONS)
            check(
                adaptive and norm == "l2",
                "--projection applies to --adaptive --norm l2 only (the other balls have "
                "one projection)",
            )
        # Every number and the output path are checked before the checkpoint is loaded.
        check_number("--rho", rho, minimum=0, inclusive=False)
        check_number("--eta", eta, minimum=0)
        check(eta == 0 or adaptive, "--eta applies to --adaptive only (the scale |w| + η)")
        check_counts(
            {
                "--m/--subset-size": m,  # torchrun users can only type the second
                "--steps": steps,
                "--restarts": restarts,
                "--chunk-size": chunk_size,
                "--samples": samples,
                "--batch-size": batch_size,
            }
        )
        check_seed("--seed", seed)
        check_output_file("--json", json_out)
        check_not_the_checkpoint("--json", json_out, ckpt)
        dist = init_from_env(device)  # under torchrun the subsets are split over the ranks
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
        loss_spec = inputs.loss_spec
        examples = num_examples(inputs.batches)
        if examples:  # else m-sharpness says the data is empty
            check_subset_size(m, examples)  # one line, before the status line
        if dist.is_main:
            processes = f", {dist.world_size} processes" if dist.enabled else ""
            console.print(
                f"m-sharpness of {ckpt} on {inputs.meta.num_samples} examples "
                f"({inputs.device}{processes})"
            )
        subsets = examples // m if m >= 1 else None
        if dist.is_main and subsets and examples % m:
            console.print(
                f"note: the last {examples % m} of the {examples} examples are left out: "
                f"the {subsets} disjoint subsets of m = {m} take {subsets * m} (analysis.md §5)"
            )
        bar = progress_bar(  # none without a subset: m-sharpness then refuses m in one line
            subsets,
            "subset",
            "m-sharpness",
            enabled=dist.is_main and not no_progress and bool(subsets),
        )
        with bar:
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
                projection=projection or "exact",  # type: ignore[arg-type]
                chunk_size=chunk_size,
                vectorize=vectorize,
                meta=inputs.meta,
                distributed=dist.enabled,
                progress=bar.update,
            )
        if not dist.is_main:
            return
        echo(summary_line(result))
        if json_out is not None:
            result.save(json_out)
            console.print(f"wrote {json_out}")
