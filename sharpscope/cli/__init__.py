"""The ``sharpscope`` command line (interface.md, "Commands").

Each command lives in its own module ``sharpscope/cli/<name>.py`` with a
``register(app)`` function; a command whose module is not there yet says so in one
line and exits non-zero.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import signal
import sys
import warnings
from typing import Any

import typer
from typer.core import TyperGroup

from ..allocator import tune_cpu_allocator
from ._common import DEBUG, fail, show_warning_in_one_line

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # pragma: no cover - older typer runs on click itself
    from click.exceptions import ClickException, UsageError  # type: ignore[no-redef]

COMMANDS = {
    "train": "Train a model with SGD/Adam or a sharpness-aware optimizer.",
    "spectrum": "Hessian spectrum of a checkpoint: top eigenvalues, trace, density.",
    "msharpness": "m-sharpness of a checkpoint (SAM paper definition).",
    "landscape": "Loss-landscape slices around a checkpoint.",
    "study": "Run and report flatness-versus-generalization studies.",
    "figures": "Regenerate the figures from the quick studies.",
    "bench": "Benchmarks against reference implementations, as ratios.",
}


def usage_error_line(exc: UsageError, command: str = "sharpscope") -> str:
    """A usage error (bad option value, unknown option, missing argument) as one line,
    ``error: <what was wrong>; see '<command> -h'``, instead of click's four (usage,
    hint, blank line, message). ``command``: the one to name when click's error carries
    no context (an option given without its value).

    >>> usage_error_line(UsageError("No such option: --bogus"))
    "error: No such option: --bogus; see 'sharpscope -h'"
    """
    message = " ".join(exc.format_message().split()).rstrip(".")
    command = exc.ctx.command_path if exc.ctx is not None else command
    return f"error: {message}; see '{command} -h'"


class OneLineErrors(TyperGroup):
    """The root command: usage errors end in one line on stderr and exit code 2 (like
    every other error, interface.md), for every subcommand; ``-h``/``--help`` and the
    help shown when no command is given are click's own."""

    def _command_named(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The (sub)command named on the command line, e.g. ``sharpscope study run``."""
        argv = kwargs.get("args") or (args[0] if args else None) or sys.argv[1:]
        path, command = ["sharpscope"], self
        for word in (str(a) for a in argv if not str(a).startswith("-")):
            commands = getattr(command, "commands", {})
            if word not in commands:
                break
            path.append(word)
            command = commands[word]
        return " ".join(path)

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            # Without standalone mode click raises usage errors instead of printing them;
            # an Exit (help, typer.Exit from a command) comes back as its exit code.
            code = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # no arguments: the help text
                exc.show()
            else:
                typer.echo(usage_error_line(exc, self._command_named(args, kwargs)), err=True)
            sys.exit(exc.exit_code)
        except ClickException as exc:
            typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        # Commands return None; an int is an exit code that an Exit carried.
        code = code if isinstance(code, int) else 0
        from ..distributed import abandon_process_group, leave_process_group

        # under torchrun leave together, or on errors as fast as possible (a single process
        # returns from either)
        if code == 0:
            leave_process_group(code)
        else:
            abandon_process_group(code)
        sys.exit(code)


app = typer.Typer(
    name="sharpscope",
    cls=OneLineErrors,
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
    # the commands only write figure files: no window, whatever MPLBACKEND says (a backend
    # that cannot load would fail after the work is done)
    os.environ["MPLBACKEND"] = "Agg"


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
    try:
        app()
    except SystemExit as exc:
        # stopped by a signal (exit 128 + its number): the process ends, and a second
        # Ctrl-C would only add an exit handler's traceback
        if exc.code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise
