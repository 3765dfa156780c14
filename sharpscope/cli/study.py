"""``sharpscope study run`` and ``sharpscope study report``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from ..distributed import PeerLost
from ._common import (
    check_counts,
    check_output_folder,
    console,
    fail,
    guarded,
    interrupt_exit_code,
    path_option,
    refuse_torchrun,
)

StudyDirArg = Annotated[
    Path, typer.Argument(metavar="DIR", help="A study folder made by `sharpscope study run`.")
]


def _log(message: str) -> None:
    console.print(message, highlight=False, markup=False)


def study_folder_config(folder: Path, out: Path | None) -> tuple[Any, Path]:
    """``study run DIR``: the config that the study folder DIR recorded (``study.json``,
    as ``config.toml`` shows it), to resume the study in DIR.

    Raises:
        SharpscopeError: DIR is no study folder, or ``--out`` names another folder.
    """
    from ..errors import SharpscopeError
    from ..study.config import study_config_from_dict
    from ..study.runner import read_study_dir

    meta = read_study_dir(folder)  # one line when DIR is not a study folder
    if out is not None and out.resolve() != folder.resolve():
        raise SharpscopeError(
            f"study run {folder} resumes the study in {folder}, but --out names {out}; leave "
            f"--out out, or run its config elsewhere: study run {folder / 'config.toml'} "
            f"--out {out}"
        )
    if not isinstance(meta.get("config"), dict):
        raise SharpscopeError(
            f"{folder / 'study.json'} holds no study config (its 'config' table is missing); "
            f"give the TOML file: study run CONFIG.toml --out {folder}"
        )
    try:
        config = study_config_from_dict(meta["config"], name=meta.get("name", "study"))
    except SharpscopeError as exc:
        raise SharpscopeError(f"{folder / 'study.json'}: {exc}") from exc
    check_config_file_unedited(folder, meta["config"])
    config.source = meta.get("source")  # study.json keeps naming the file it came from
    return config, folder


def check_config_file_unedited(folder: Path, recorded: dict[str, Any]) -> None:
    """Refuse ``study run DIR`` when ``DIR/config.toml`` no longer shows the config that
    ``study.json`` recorded: the run resumes the recorded one and rewrites the file, so a
    hand edit would be lost without a word. Applying the edit is ``study run
    DIR/config.toml --out DIR`` (which refuses changed training settings of runs already
    trained, and re-analyses for changed analysis settings).

    Raises:
        SharpscopeError: naming both files and both ways on.
    """
    from ..errors import SharpscopeError
    from ..study.config import tomllib
    from ..study.runner import config_toml_text

    path = folder / "config.toml"
    if not path.is_file():
        return
    try:
        shown = tomllib.loads(config_toml_text(recorded))
    except (ImportError, TypeError, ValueError):  # not written for this config either
        return
    try:
        edited = tomllib.loads(path.read_text()) != shown
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        edited = True
    if edited:
        raise SharpscopeError(
            f"{path} differs from the config that {folder / 'study.json'} recorded, which "
            f"'study run {folder}' resumes (and would write over the edit); undo the edit, "
            f"or delete {path}, to resume as recorded, or apply it: study run {path} --out "
            f"{folder}"
        )


def print_correlations(folder: Path) -> None:
    """Print the report's headline table on stdout: Kendall tau and Psi of every measure."""
    import csv

    from rich.console import Console
    from rich.table import Table

    path = folder / "correlations.csv"
    if not path.exists():
        return
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return

    def number(row: dict, key: str) -> str:
        value = row.get(key) or ""
        try:
            return f"{float(value):+.2f}"
        except ValueError:
            return "–"

    models = rows[0].get("num_models")
    table = Table(title=f"rank correlation of each measure with the gap ({models} models)")
    for column in ("measure", "gap", "Kendall tau", "95% interval", "granulated Psi"):
        table.add_column(column, justify="left" if column in ("measure", "gap") else "right")
    for row in rows:
        interval = f"[{number(row, 'tau_low')}, {number(row, 'tau_high')}]"
        tau, psi = number(row, "tau"), number(row, "psi_overall")
        table.add_row(row["measure"], row.get("gap", ""), tau, interval, psi)
    Console(width=None if sys.stdout.isatty() else 100).print(table)


def register(app: typer.Typer) -> None:
    """Add the ``study`` sub-app with its ``run`` and ``report`` commands."""
    study = typer.Typer(
        name="study",
        help="Run and report flatness-versus-generalization studies.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )

    @study.command("run")
    @guarded
    def run_command(
        config: Optional[Path] = typer.Argument(
            None,
            metavar="CONFIG",
            help="Study config (TOML), a built-in name such as a-spectra-quick "
            "(`sharpscope study list` shows them), or a study folder to resume in place "
            "(the config it recorded). Omit with --quick.",
        ),
        quick: bool = typer.Option(
            False, "--quick", help="The built-in quick study: SGD vs SAM variants on MNIST-1D."
        ),
        out: Annotated[
            Optional[Path],
            path_option("--out", "Study folder (default: runs/studies/NAME); reused to resume."),
        ] = None,
        workers: Optional[int] = typer.Option(
            None,
            "--workers",
            help="Local worker processes (at least 1; default: one per GPU, else one per "
            "CPU core); with 2 or more each gets 1 CPU thread or 1 GPU, 1 runs in this "
            "process with all its threads; --executor local only.",
        ),
        executor: str = typer.Option(
            "local",
            "--executor",
            help="local, or slurm (submitit; parameters from the executor table of the "
            "config); submitit-local runs the submitit path on this machine, to try a config.",
        ),
        report: bool = typer.Option(
            True, "--report/--no-report", help="Write report.md after the runs."
        ),
        data_root: Optional[Path] = typer.Option(
            None,
            "--data-root",
            help="Folder holding the CIFAR files, for every run (overrides the config's "
            "data_root; a study folder may be resumed with another).",
        ),
    ) -> None:
        """Train and analyse every run of a sweep; write DIR/results.csv (and the report)."""
        from ..errors import SharpscopeError
        from ..study.config import builtin_config_names, load_builtin_config, load_study_config
        from ..study.executors import default_workers
        from ..study.report import write_report
        from ..study.runner import default_out, run_study

        refuse_torchrun(
            "study run",
            "it starts its own worker processes (--workers N, or --executor slurm)",
        )
        check_counts({"--workers": workers})
        if quick and config is not None:
            raise SharpscopeError("give either CONFIG.toml or --quick, not both")
        if workers is not None and executor != "local":
            raise SharpscopeError(
                f"--workers applies to --executor local; with {executor} every run is its own "
                "job (resources from the [executor] table of the config)"
            )
        holds = "the runs, results.csv and the report"
        check_output_folder("--out", out, holds=holds)
        if quick:
            study_config = load_builtin_config("quick")
        elif config is None:
            raise SharpscopeError(
                "missing CONFIG.toml; give a study config, a built-in name "
                f"({', '.join(builtin_config_names())}) or --quick"
            )
        elif config.is_dir():
            study_config, out = study_folder_config(config, out)
        elif not config.exists() and str(config) in builtin_config_names():
            study_config = load_builtin_config(str(config))
        elif not config.exists():
            raise SharpscopeError(
                f"study config not found: {config}; give a TOML file or a built-in name "
                f"({', '.join(builtin_config_names())})"
            )
        else:
            study_config = load_study_config(config)
        if data_root is not None:
            study_config.train["data_root"] = str(data_root)
        if out is None:  # the default folder is checked as a given one is
            out = default_out(study_config)
            check_output_folder("default --out", out, holds=holds)
        if workers is None:
            workers = default_workers() if executor == "local" else 1
        try:
            summary = run_study(study_config, out, workers=workers, executor=executor, log=_log)
        except KeyboardInterrupt as exc:  # the finished runs are on disk: say how to go on
            if not isinstance(exc, PeerLost):
                fail(
                    f"interrupted; the runs finished so far are kept in {out}: run the same "
                    "command again to resume the others",
                    code=interrupt_exit_code(exc),
                )
            raise
        _log(
            f"{len(summary.done)} runs done, {len(summary.skipped)} skipped, "
            f"{len(summary.failed)} failed (diverged), {len(summary.errors)} errors "
            f"in {summary.seconds:.0f} s"
        )
        _log(f"results: {summary.results}")
        if report:
            try:
                path = write_report(summary.out)
            except KeyboardInterrupt as exc:  # every run is on disk; the report alone is not
                if isinstance(exc, PeerLost):
                    raise
                fail(
                    f"interrupted while writing the report; the runs are finished in "
                    f"{summary.out}: `sharpscope study report {summary.out}` (or the same "
                    "command) writes it",
                    code=interrupt_exit_code(exc),
                )
            print_correlations(Path(summary.out))
            _log(f"report: {path}")
        if summary.errors:
            run_id, message = next(iter(summary.errors.items()))
            raise SharpscopeError(
                f"{len(summary.errors)} run(s) raised errors (rerun to retry them); "
                f"first: {run_id}: {message}"
            )

    @study.command("report")
    @guarded
    def report_command(
        folder: StudyDirArg,
        resamples: int = typer.Option(
            1000, "--resamples", help="Bootstrap resamples for the intervals (0: none)."
        ),
        figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the figures."),
    ) -> None:
        """Kendall tau and granulated Kendall of every measure; DIR/report.md with figures."""
        from ..study.report import write_report

        check_counts({"--resamples": resamples}, minimum=0)
        path = write_report(folder, resamples=resamples, figures=figures)
        print_correlations(folder)
        _log(f"report: {path}")

    @study.command("status")
    @guarded
    def status_command(
        folder: StudyDirArg,
    ) -> None:
        """Where every run of a study stands: done, training (epoch), failed, ..."""
        from collections import Counter

        from rich.console import Console
        from rich.table import Table

        from ..study.runner import run_states

        states = run_states(folder)
        table = Table(title=f"{folder}: {len(states)} runs")
        for column in ("run", "state", "epoch", "error"):
            table.add_column(column, overflow="fold")
        for row in states:
            done = "-" if row["epoch"] is None else str(row["epoch"])
            epoch = f"{done}/{row['epochs']}" if row["epochs"] else done
            table.add_row(row["run_id"], row["state"], epoch, row["error"])
        Console(width=None if sys.stdout.isatty() else 120).print(table)
        counts = Counter(row["state"] for row in states)
        _log(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
        from ..study.runner import study_running

        if counts.get("training") or counts.get("analysing"):
            if not study_running(folder):
                _log(
                    "no `sharpscope study run` is working in this folder: the runs shown as "
                    "training/analysing were interrupted; run the same command again to resume them"
                )

    @study.command("list")
    def list_command() -> None:
        """The built-in study configs (give a name to `study run`)."""
        from ..study.config import builtin_config_names, load_builtin_config

        for name in builtin_config_names():
            description = " ".join(load_builtin_config(name).description.split())
            short = description if len(description) <= 90 else description[:87] + "..."
            typer.echo(f"{name:32s} {short}")

    app.add_typer(study, name="study")
