"""``sharpscope figures``: regenerate every figure of figures/ from the quick studies."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ._common import (
    check_counts,
    check_output_folder,
    console,
    fail,
    guarded,
    interrupt_exit_code,
    path_option,
    refuse_torchrun,
    stop_reason,
)


def _log(message: str) -> None:
    console.print(message, highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``sharpscope figures``."""

    @app.command("figures")
    @guarded
    def figures_command(
        out: Annotated[Path, path_option("--out", "Where the figures go.")] = Path("figures"),
        cache: Annotated[
            Path,
            path_option(
                "--cache", "Study folders of the quick reproductions (reused when present)."
            ),
        ] = Path("runs") / "studies",
        only: Optional[list[str]] = typer.Option(
            None, "--only", help="Reproductions to make (a-f, quick); repeatable (default: all)."
        ),
        workers: Optional[int] = typer.Option(
            None,
            "--workers",
            help="Local worker processes, at least 1 (default: one per GPU, else one per CPU "
            "core).",
        ),
    ) -> None:
        """Run the quick reproductions (cached) and write their figures, data beside each."""
        from ..study.executors import default_workers

        refuse_torchrun("figures", "it starts its own worker processes (--workers N)")
        check_counts({"--workers": workers})
        from ..study.reproductions import make_figures

        check_output_folder("--out", out, holds="the figures and their data")
        check_output_folder("--cache", cache, holds="the study folders of the reproductions")
        if workers is None:
            workers = default_workers()
        try:
            written = make_figures(out, cache=cache, only=only, workers=workers, log=_log)
        except KeyboardInterrupt as exc:  # the finished study runs are on disk: say so
            fail(
                f"{stop_reason(exc)}; the study runs finished so far are kept in {cache}: "
                "run the same command again to go on from there",
                code=interrupt_exit_code(exc),
            )
        figures = {Path(p).stem for p in written if Path(p).suffix == ".pdf"}
        _log(f"{len(figures)} figures ({len(written)} files) written to {out}")
