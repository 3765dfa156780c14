"""``sharpscope bench NAME``: speed against a reference, in the same run, as ratios."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import SharpscopeError
from ._common import (
    check_output_file,
    console,
    fail,
    guarded,
    interrupt_exit_code,
    path_option,
    refuse_torchrun,
    stop_reason,
)

BENCHMARKS = ("optimizers", "spectrum", "msharpness", "landscape")


def register(app: typer.Typer) -> None:
    """Add ``sharpscope bench``."""

    @app.command("bench")
    @guarded
    def bench_command(
        name: str = typer.Argument(
            ..., metavar="NAME", help="optimizers, spectrum, msharpness or landscape."
        ),
        json_out: Annotated[
            Optional[Path], path_option("--json", "Write the rows as a JSON list.")
        ] = None,
        quick: bool = typer.Option(
            False,
            "--quick",
            help="Smaller cases and fewer repeats (a smoke test; ratios not comparable with "
            "full runs).",
        ),
        device: str = typer.Option(
            "auto", "--device", help="auto (the CPU, and CUDA when present), cpu or cuda."
        ),
    ) -> None:
        """Time sharpscope against its reference on the same model and data; print ratios."""
        from ..bench._common import bench_devices, mark_quick, print_rows, write_rows

        refuse_torchrun("bench", "it times one process; start it as `sharpscope bench NAME`")
        if name not in BENCHMARKS:
            raise SharpscopeError(
                f"unknown benchmark '{name}'; choose one of: {', '.join(BENCHMARKS)}"
            )
        module_name = f"sharpscope.bench.{name}"
        if importlib.util.find_spec(module_name) is None:
            raise SharpscopeError(f"benchmark '{name}' is not built yet in this version")
        check_output_file("--json", json_out, example="bench.json")
        devices = bench_devices(device)
        console.print(
            f"running benchmark '{name}'{' (quick)' if quick else ''} on {', '.join(devices)} ..."
        )
        module = importlib.import_module(module_name)
        kept: list = []

        def record(rows: list) -> None:
            # --json is rewritten after each new row: a run stopped part-way keeps its rows
            kept[:] = mark_quick(rows, quick)
            if json_out is not None:
                write_rows(kept, json_out)

        try:
            rows = mark_quick(module.run(quick=quick, devices=devices, on_rows=record), quick)
        except KeyboardInterrupt as exc:
            if json_out is None or not kept:
                raise
            fail(
                f"{stop_reason(exc)}; the {len(kept)} rows measured before are in {json_out}",
                code=interrupt_exit_code(exc),
            )
        title = f"sharpscope bench {name}"
        if quick:
            title += (
                " --quick (a smoke test: small cases, ratios not comparable, targets not judged)"
            )
        print_rows(rows, title=title)
        if json_out is not None:
            write_rows(rows, json_out)
            console.print(f"wrote {json_out}")
