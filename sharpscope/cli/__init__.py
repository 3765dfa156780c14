"""The ``sharpscope`` command line (interface.md, "Commands").

Each command lives in its own module ``sharpscope/cli/<name>.py`` with a
``register(app)`` function; a command whose module is not there yet says so in one
line and exits non-zero.
"""

from __future__ import annotations

import importlib
import importlib.util
import warnings

import typer

from ..allocator import tune_cpu_allocator
from ._common import DEBUG, fail, show_warning_in_one_line

COMMANDS = {
    "train": "Train a model with SGD/Adam or a sharpness-aware optimizer.",
    "spectrum": "Hessian spectrum of a checkpoint: top eigenvalues, trace, density.",
    "msharpness": "m-sharpness of a checkpoint (SAM paper definition).",
    "landscape": "Loss-landscape slices around a checkpoint.",
    "study": "Run and report flatness-versus-generalization studies.",
    "figures": "Regenerate the figures from the quick studies.",
    "bench": "Benchmarks against reference implementations, as ratios.",
}

app = typer.Typer(
    name="sharpscope",
    help="Train with sharpness-aware optimizers and measure loss geometry.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain help text: with rich markup on, "[default: 10]" in a help string is eaten as a tag
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks for errors."),
) -> None:
    """Train with sharpness-aware optimizers and measure loss geometry."""
    DEBUG["enabled"] = debug
    if not debug:  # "warning: ..." in one line, not the file, line and source of the warning
        warnings.showwarning = show_warning_in_one_line
    tune_cpu_allocator()  # keep freed CPU memory for reuse (SHARPSCOPE_MALLOC=default: off)


def _not_built(name: str, help_text: str) -> None:
    @app.command(
        name,
        help=f"{help_text} (not built yet)",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    def _command(ctx: typer.Context) -> None:
        fail(f"'sharpscope {name}' is not built yet in this version")


for _name, _help in COMMANDS.items():
    _module = f"{__name__}.{_name}"
    if importlib.util.find_spec(_module) is not None:
        importlib.import_module(_module).register(app)
    else:
        _not_built(_name, _help)


def main() -> None:
    """Console entry point."""
    app()
