"""Pieces every command shares: one-line errors, spec flags, loading analysis inputs.

The analysis commands (``spectrum``, ``msharpness``, ``landscape``) declare their
data-loading flags with the ``*Opt`` aliases below and load through
:func:`load_inputs_from_flags`, so the flags read the same in every command.

Commands decorate their function with :func:`guarded`, which turns a
:class:`~sharpscope.errors.SharpscopeError`, a missing file or running out of memory
into one line on stderr and exit code 2 (``sharpscope --debug ...`` shows the
traceback instead).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import torch
import typer
from rich.console import Console
from torch import nn

from ..data import DataSplit, load_data, recorded_data_spec
from ..data.batches import Batch, as_batches
from ..data.fingerprint import reading_as_trained, warn_if_not_as_trained
from ..device_memory import is_out_of_memory
from ..distributed import PeerLost, check_same_data, launched_as_main, lost_peer, peer_lost
from ..errors import SharpscopeError, check_loss_value
from ..registry import LossFn, check_trusted_factories, get_loss, is_factory_path
from ..results import RunMeta

console = Console(stderr=True, soft_wrap=True)
DEBUG = {"enabled": False}
F = TypeVar("F", bound=Callable[..., Any])


# What else bounds a command's memory, named in its out-of-memory line.
MEMORY_FLAGS = {
    "msharpness": "a smaller --chunk-size (subsets per vectorized call)",
    "landscape": "a smaller --chunk-size (grid points per vectorized call)",
    "spectrum": "--basis-device cpu (the Lanczos basis)",
}


def out_of_memory_line(exc: BaseException, command: str) -> str:
    """The one line for a command that ran out of memory: the flags that bound its memory,
    and ``--device cpu`` only when a GPU ran out."""
    if command == "train":
        hints = ["a smaller --batch-size N", "fewer --samples N"]
    else:
        hints = [
            "a smaller --batch-size N (the analyses read all examples as one batch unless "
            "given one)",
            "fewer --samples N",
        ]
    if command in MEMORY_FLAGS:
        hints.append(MEMORY_FLAGS[command])
    if isinstance(exc, torch.OutOfMemoryError):
        hints.append("--device cpu")
    return f"out of memory; try {', '.join(hints[:-1])} or {hints[-1]}"


def show_warning_in_one_line(
    message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
) -> None:
    """``warnings.showwarning`` for the command line: ``warning: message`` on stderr
    (on a line of its own above a progress bar). Under torchrun rank 0 alone prints
    them: every rank meets the same settings and data, and the same line came N times."""
    from tqdm import tqdm

    if not launched_as_main():
        return

    text = str(message).splitlines()[0] if str(message) else category.__name__
    tqdm.write(f"warning: {text}", file=sys.stderr)


def fail(message: str, code: int = 2) -> None:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, Slurm's time limit, ``timeout``) raised as an interrupt, so that
    a command stops as on Ctrl-C: partial results saved and named, one line."""


def interrupt_exit_code(exc: BaseException) -> int:
    """The shell's convention: 128 + the signal number (SIGINT 130, SIGTERM 143); 1 when
    another torchrun process was lost (:class:`~sharpscope.distributed.PeerLost`)."""
    if isinstance(exc, PeerLost):
        return 1
    return 128 + (signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT)


def stop_reason(exc: BaseException) -> str:
    """How the line of a stopped command begins: "interrupted", which process was lost, or,
    for SIGTERM under torchrun, that the launcher stopped it (it stops every process when
    one of them fails, often before the others notice the lost peer themselves)."""
    if isinstance(exc, PeerLost):
        return str(exc)
    if isinstance(exc, Terminated) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return (
            "interrupted by SIGTERM (torchrun stops every process when one of them fails, "
            "or the job was cancelled)"
        )
    return "interrupted"


def refuse_torchrun(command: str, because: str) -> None:
    """One line for a command that is not run under torchrun (studies, figures,
    benchmarks), where every rank would run it in full, into the same folder, each
    refusing the others' lock or stalling in a collective."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SharpscopeError(f"`sharpscope {command}` does not run under torchrun: {because}")


def speaks_for_the_job(exc: BaseException, is_main: bool) -> bool:
    """Whether this process says (and keeps) what a stopped command saved: rank 0 on an
    interrupt; every survivor when another process was lost, as that may be rank 0."""
    return is_main or isinstance(exc, PeerLost)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_once(signum: int, frame: Any) -> None:
    """The first Ctrl-C or SIGTERM stops the command (KeyboardInterrupt, :class:`Terminated`);
    later ones are ignored, so that a second Ctrl-C cannot cut short the saving of the
    finished work and the line that says what was kept. So is the first one when it comes
    while a lost torchrun process is being handled."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)
    handled = sys.exc_info()[1]
    if isinstance(handled, PeerLost) or (isinstance(handled, RuntimeError) and lost_peer(handled)):
        # already stopping for a lost process, and saving what is finished: torchrun's
        # SIGTERM to the survivors must not cut that short (it did, under load)
        return
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def guarded(fn: F) -> F:
    """Run a command so that user errors end in one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        in_main = threading.current_thread() is threading.main_thread()
        # a signal ignored from the start (a background job's SIGINT) stays ignored
        watched = [n for n in STOP_SIGNALS if in_main and signal.getsignal(n) != signal.SIG_IGN]
        previous = {n: signal.signal(n, _stop_once) for n in watched}
        try:
            return fn(*args, **kwargs)
        except SharpscopeError as exc:
            if DEBUG["enabled"]:
                raise
            fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        except FileNotFoundError as exc:
            if DEBUG["enabled"]:
                raise
            fail(f"file not found: {exc.filename or exc}")
        except OSError as exc:  # a folder where a file belongs, no permission, disk full, ...
            if DEBUG["enabled"]:
                raise
            fail(os_error_line(exc))
        except RuntimeError as exc:
            if DEBUG["enabled"]:
                raise
            if lost_peer(exc):  # a collective outside the commands' checked blocks
                lost = peer_lost(exc)
                fail(stop_reason(lost), code=interrupt_exit_code(lost))
            if not is_out_of_memory(exc):
                raise
            fail(out_of_memory_line(exc, fn.__name__.removesuffix("_command")))
        except KeyboardInterrupt as exc:
            if isinstance(exc, PeerLost):  # every survivor says it: rank 0 may be the lost one
                fail(stop_reason(exc), code=interrupt_exit_code(exc))
            if not launched_as_main():  # under torchrun rank 0 says it, once
                raise typer.Exit(interrupt_exit_code(exc)) from None
            fail(stop_reason(exc), code=interrupt_exit_code(exc))
        finally:
            for number, handler in previous.items():
                # None: a handler installed outside Python, which we cannot restore
                signal.signal(number, signal.SIG_DFL if handler is None else handler)

    return wrapper  # type: ignore[return-value]


def os_error_line(exc: OSError) -> str:
    """One line for an :class:`OSError`: what was wrong with the path and what is needed.

    The commands check their output paths first (:func:`check_output_file`,
    :func:`check_output_folder`); this covers the paths they could not foresee.
    """
    name = exc.filename
    if isinstance(exc, FileExistsError) and name is not None and not Path(name).is_dir():
        return f"{name} is a file, where a folder is needed; give a folder path (new or existing)"
    if isinstance(exc, NotADirectoryError) and name is not None:
        blocking = _nearest_existing(Path(name))
        return (
            f"{blocking} is a file, not a folder, so {name} cannot be made or read; "
            "give a path whose folders are folders"
        )
    if isinstance(exc, IsADirectoryError) and name is not None:
        return f"{name} is a folder, where a file is needed; give a file name"
    where = f": {name}" if name else ""
    return f"{exc.strerror or exc}{where}"


def _nearest_existing(path: Path) -> Path:
    """``path`` itself or the closest of its parents that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_writable_place(flag: str, path: Path) -> None:
    """Refuse ``path`` when the closest existing folder above it is a file or not writable."""
    above = _nearest_existing(path.parent)
    if not above.is_dir():
        raise SharpscopeError(
            f"{flag} {path}: {above} is a file, not a folder, so nothing can be written "
            "under it; give a path inside a folder"
        )
    if not os.access(above, os.W_OK | os.X_OK):
        raise SharpscopeError(
            f"{flag} {path}: no permission to write in {above}; choose another place"
        )
    # permissions are not all: a read-only mount, /proc or a full quota refuse a new file
    try:
        fd, probe = tempfile.mkstemp(dir=above, prefix=".sharpscope-probe-")
    except OSError as exc:
        raise SharpscopeError(
            f"{flag} {path}: cannot write in {above} ({exc.strerror or exc}); choose another place"
        ) from exc
    os.close(fd)
    os.unlink(probe)


def check_output_file(
    flag: str, path: Path | None, example: str = "result.json", fixed_name: bool = False
) -> None:
    """Refuse an output file that could not be written, before any work is done: an
    existing folder of that name, or a file where one of its folders should be.
    ``fixed_name``: the command names the file inside the folder ``flag`` gives, so the
    advice is to move the folder away, not to give a file name.

    >>> check_output_file("--json", None)  # not given: nothing to check
    """
    if path is None:
        return
    path = Path(path)
    if str(path) == "-":  # not stdout: the one-line summary goes there, and a file named '-'
        raise SharpscopeError(
            f"{flag} -: results are written to files, not to stdout (which holds the printed "
            f"summary); give a file name, e.g. {example}"
        )
    if path.is_dir() and fixed_name:
        raise SharpscopeError(
            f"{flag} {path.parent}: {path} is a folder, where the result file goes; "
            f"move it away or choose another {flag}"
        )
    if path.is_dir():
        raise SharpscopeError(f"{flag} {path} is a folder; give a file name, e.g. {path / example}")
    _check_writable_place(flag, path)


def check_not_the_checkpoint(flag: str, path: Path | None, ckpt: str | Path) -> None:
    """Refuse an output file that is the checkpoint being analysed (a folder given as
    the checkpoint stands for its ``last.pt``): writing there would replace the weights."""
    if path is None:
        return
    source = Path(ckpt)
    source = source / "last.pt" if source.is_dir() else source
    same = (
        os.path.samefile(source, path)
        if source.exists() and Path(path).exists()
        else source.resolve() == Path(path).resolve()
    )
    if same:
        raise SharpscopeError(
            f"{flag} {path} is the checkpoint being analysed; writing there would replace "
            "it: choose another file"
        )


def check_output_folder(flag: str, path: Path | None, holds: str) -> None:
    """Refuse an output folder that could not be made or written, before any work is
    done: an existing file of that name, or a file where one of its parents should be.
    ``holds`` says what the folder is for."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SharpscopeError(
            f"{flag} {path} is a file; it must be a folder (new or existing) to hold {holds}"
        )
    if not path.exists():
        _check_writable_place(flag, path)


def check_number(
    flag: str,
    value: float | None,
    *,
    minimum: float,
    inclusive: bool = True,
    hint: str = "",
) -> None:
    """Refuse NaN, infinities and values below ``minimum`` (or at it, when not
    ``inclusive``), in one line naming the flag; ``None`` (not given) passes.

    >>> check_number("--probes", 2, minimum=1)
    >>> check_number("--tol", float("nan"), minimum=0, inclusive=False)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: --tol must be a finite number > 0, got nan
    """
    if value is None:
        return
    above = value >= minimum if inclusive else value > minimum
    if math.isfinite(value) and above:
        return
    kind = "an integer" if isinstance(value, int) else "a finite number"
    bound = f"{'>=' if inclusive else '>'} {minimum:g}"
    raise SharpscopeError(f"{flag} must be {kind} {bound}, got {value:g}{hint}")


def check_counts(counts: dict[str, int | None], minimum: int = 1) -> None:
    """:func:`check_number` for several integer flags with the same lower bound."""
    for flag, value in counts.items():
        check_number(flag, value, minimum=minimum)


def parse_value(text: str) -> Any:
    """A command-line option value as int, float, bool, None, list or string.

    >>> [parse_value(v) for v in ("3", "0.5", "true", "none", "[1, 2]", "batch")]
    [3, 0.5, True, None, [1, 2], 'batch']
    """
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.strip().startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            pass
    return text


def parse_options(pairs: list[str] | None, flag: str) -> dict[str, Any]:
    """``["width=16", "norm=batch"]`` -> ``{"width": 16, "norm": "batch"}``."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SharpscopeError(f"{flag} takes KEY=VALUE, got '{pair}'")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def spec_from_flag(
    name: str | None, options: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """A spec dict from a ``--model``/``--data``/``--loss`` value and its options."""
    if name is None:
        return None
    spec: dict[str, Any] = {"factory": name} if is_factory_path(name) else {"name": name}
    spec.update(options or {})
    return spec


@dataclass
class AnalysisInputs:
    """What an analysis command needs: the model, fixed batches, the loss and metadata."""

    model: nn.Module
    batches: list[Batch]
    loss_fn: LossFn
    meta: RunMeta
    checkpoint: Any
    split: DataSplit
    device: torch.device
    loss_spec: Any = "cross_entropy"


def load_analysis_inputs(
    ckpt: str | Path,
    model: str | None = None,
    data: str | None = None,
    loss: str | None = None,
    *,
    split: str = "train",
    samples: int | None = None,
    batch_size: int | None = None,
    device: str | None = "auto",
    seed: int = 0,
    data_root: str | None = None,
    model_options: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    dtype: str = "float32",
    trust_factories: bool = False,
) -> AnalysisInputs:
    """Load a checkpoint (or bare state_dict), its data and loss for an analysis.

    The model, data and loss default to the checkpoint's specs; ``--model``, ``--data``
    and ``--loss`` replace them (the first two are required for a bare state_dict). A
    ``module:function`` factory that the checkpoint names is imported only with
    ``trust_factories`` (``--trust-factories``). Options without a name
    (``--model-opt``/``--data-opt`` alone) override those keys of the checkpoint's
    specs. The model is then run once on a few examples (:func:`check_model_on_first_batch`),
    so that data the model does not take fail here, in one line.
    """
    from ..distributed import pick_device
    from ..io import load_checkpoint, recorded_specs

    model_spec = spec_from_flag(model, model_options)
    data_spec = spec_from_flag(data, data_options)
    if not trust_factories:  # every factory the file names and the flags leave, in one line
        given = {"model": model_spec, "data set": data_spec, "loss": loss}
        check_trusted_factories(recorded_specs(ckpt), ckpt, False, given=given)
    checkpoint = load_checkpoint(
        ckpt, model_spec=model_spec, data_spec=data_spec, trust_factories=trust_factories
    )
    if model_spec is None and model_options:
        # A bare state_dict was refused above (it needs --model), so this is a checkpoint
        # with its own spec: rebuild it with the options (wrong keys or weights that no
        # longer fit are one-line errors of load_checkpoint).
        checkpoint = load_checkpoint(
            ckpt, model_spec={**checkpoint.spec, **model_options}, data_spec=data_spec
        )
    spec = data_spec or checkpoint.data_spec
    if spec is None:
        raise SharpscopeError(f"{ckpt} records no data set: pass --data NAME or module:function")
    if data_spec is None and data_options:
        spec = {**spec, **data_options}
    config = checkpoint.raw.get("config") or {}
    if data_root is None:  # the CIFAR folder the run trained from, as its config recorded it
        data_root = config.get("data_root")
    elif "data_root" in spec and "data_root" not in (data_options or {}):
        # --data-root wins over the data_root that an older sharpscope recorded in the
        # checkpoint's data spec (as given, often relative), which load_data prefers
        spec = {k: v for k, v in spec.items() if k != "data_root"}
    chosen = pick_device(device)
    as_trained = "factory" in spec and spec["factory"] == (checkpoint.data_spec or {}).get(
        "factory"
    )  # the run's own factory: read it as training did, and say if its data changed
    with reading_as_trained(config.get("seed") if as_trained else None):
        split_data = load_data(spec, split, samples=samples, seed=seed, data_root=data_root)
    if as_trained and launched_as_main():
        warn_if_not_as_trained(
            split_data.source_summary,
            checkpoint.raw.get("data_summary"),
            spec["factory"],
            str(ckpt),
        )
    check_same_data(split_data.inputs, split_data.targets, f"{split} data")
    if split == "test" and split_data.test_is_train:
        raise SharpscopeError(
            f"--split test needs a test set: the data factory {spec['factory']} gives one "
            'set (analysed as train); return {"train": ..., "test": ...} from it, or give '
            "the test data as its own --data factory"
        )
    torch_dtype = {"float32": torch.float32, "float64": torch.float64}.get(dtype)
    if torch_dtype is None:
        raise SharpscopeError(f"unknown dtype '{dtype}'; choose float32 or float64")
    net = checkpoint.model.to(chosen, torch_dtype)
    inputs = (
        split_data.inputs.to(torch_dtype)
        if split_data.inputs.is_floating_point()
        else split_data.inputs
    )
    batches = as_batches((inputs, split_data.targets), batch_size, chosen)
    loss_spec = loss or checkpoint.raw.get("loss") or "cross_entropy"
    meta = RunMeta(
        checkpoint=str(Path(ckpt).resolve()),  # absolute, as data_root: readable from anywhere
        checkpoint_sha256=checkpoint.sha256,
        data=recorded_data_spec(spec, split, samples, seed, split_data),
        num_samples=len(split_data),
        seed=seed,
        dtype=dtype,
        device=str(chosen),
        num_params=sum(p.numel() for p in net.parameters() if p.requires_grad),
        extra={"model": checkpoint.spec, **trained_precision(checkpoint, dtype)},
    )
    loss_fn = get_loss(loss_spec)
    try:
        check_model_on_first_batch(net, batches, loss_fn)
    except SharpscopeError as exc:
        mismatch = _data_mismatch(checkpoint, split_data)
        if mismatch is None:
            raise
        raise SharpscopeError(f"{exc}; {mismatch}") from exc
    return AnalysisInputs(net, batches, loss_fn, meta, checkpoint, split_data, chosen, loss_spec)


def trained_precision(checkpoint: Any, dtype: str) -> dict[str, Any]:
    """What a result's meta says of how the analysed weights were made, where it is not
    the analysis' float32/float64: the run's ``--precision`` (bf16, fp16) and the dtypes
    the file stores its weights in (a bare state_dict saved in bfloat16 is analysed as
    an exact float copy of its rounded weights)."""
    out: dict[str, Any] = {}
    precision = (checkpoint.raw.get("config") or {}).get("precision")
    if precision not in (None, "fp32"):
        out["trained_precision"] = precision
    weights = checkpoint.raw.get("state_dict", checkpoint.raw)
    stored = sorted(
        {
            str(t.dtype).removeprefix("torch.")
            for t in (weights.values() if isinstance(weights, Mapping) else ())
            if isinstance(t, torch.Tensor) and t.is_floating_point()
        }
    )
    if stored and stored != [dtype]:
        out["stored_dtypes"] = stored
    return out


def _data_mismatch(checkpoint: Any, data: DataSplit) -> str | None:
    """What differs between the data a checkpoint's model was built for (its recorded input
    shape and class count) and the data given, when the model failed on them: PyTorch's
    own line ("Target 80 is out of bounds", "mat1 and mat2 shapes cannot be multiplied")
    does not say it. None when they agree or nothing was recorded."""
    built = (checkpoint.input_shape, checkpoint.num_classes)
    given = (tuple(data.input_shape), data.num_classes)
    if None in built or (tuple(built[0]), built[1]) == given:
        return None
    return (
        f"the checkpoint's model was built for inputs of shape {tuple(built[0])} and "
        f"{built[1]} classes, and the data give inputs of shape {given[0]} and {given[1]} "
        "classes: analyse it on data like those it was trained on"
    )


def check_model_on_first_batch(model: nn.Module, batches: list[Batch], loss_fn: LossFn) -> None:
    """:func:`sharpscope.evaluation.check_model_on_data` on the first batch, for every
    analysis command alike (``spectrum``'s operator checks the full data again), and a
    NaN loss refused: it would make every analysis NaN."""
    from ..evaluation import check_model_on_data

    if batches:
        value = check_model_on_data(model, *batches[0], loss_fn)
        if value is not None:
            check_loss_value(value)


# The flags every analysis command shares; ``name: Alias = default`` in a signature.
CkptArg = Annotated[
    Path, typer.Argument(metavar="CKPT", help="Checkpoint (.pt) or bare state_dict file.")
]
ModelOpt = Annotated[
    Optional[str],
    typer.Option("--model", help="Registry name or module:function (needed for a state_dict)."),
]
DataOpt = Annotated[
    Optional[str],
    typer.Option("--data", help="Registry name or module:function [default: the checkpoint's]."),
]
LossOpt = Annotated[
    Optional[str],
    typer.Option(
        "--loss",
        help="cross_entropy, mse or module:function [default: the checkpoint's loss, else "
        "cross_entropy].",
    ),
]
SamplesOpt = Annotated[
    Optional[int],
    typer.Option("--samples", help="Use the first N examples after a seeded shuffle."),
]
BatchSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size", help="Examples per batch the data is read in [default: all at once]."
    ),
]
SplitOpt = Annotated[
    str,
    typer.Option(
        "--split",
        help="train, test, val (a run's --val-fraction hold-out) or all (train and test) of "
        "a built-in data set; a --data factory gives one set.",
    ),
]
DataRootOpt = Annotated[
    Optional[str], typer.Option("--data-root", help="Folder holding the CIFAR files.")
]
ModelOptOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--model-opt",
        help="Model option KEY=VALUE (repeatable); without --model it overrides that key "
        "of the checkpoint's model spec.",
    ),
]
DataOptOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--data-opt",
        help="Data option KEY=VALUE (repeatable); without --data it overrides that key "
        "of the checkpoint's data spec.",
    ),
]
TrustFactoriesOpt = Annotated[
    bool,
    typer.Option(
        "--trust-factories",
        help="Import and call the module:function factories that the checkpoint names "
        "(its model, data or loss): code from the file's author. Off: such a checkpoint is "
        "refused unless --model/--data/--loss name them.",
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="float32 or float64.")]


def seed_option(draws: str) -> Any:
    """The ``--seed`` option of an analysis command whose random draws are ``draws``."""
    return Annotated[
        int,
        typer.Option(
            "--seed",
            help=f"Seed of the --samples subset and of {draws}; within a run's own "
            "--samples subset, of the draws only.",
        ),
    ]


def nonempty_path(text: str) -> Path:
    """A path option's value; an empty one (an unset variable in ``--out "$DIR"``) is a
    usage error: as a ``Path`` it would be ".", the working folder.

    >>> nonempty_path("runs/a")
    PosixPath('runs/a')
    """
    if not str(text).strip():
        raise typer.BadParameter("a path is needed, got an empty one")
    return Path(text)


def path_option(flag: str, help: str) -> Any:
    """The typer option of an output path ``flag``, refused when empty
    (:func:`nonempty_path`); its default goes on the parameter."""
    return typer.Option(flag, help=help, parser=nonempty_path, metavar="<path>")


JsonOpt = Annotated[Optional[Path], path_option("--json", "Write the result JSON.")]
NoProgressOpt = Annotated[
    bool, typer.Option("--no-progress", help="Hide the progress bar (e.g. stderr to a file).")
]


def load_inputs_from_flags(
    ckpt: str | Path,
    *,
    model: str | None,
    data: str | None,
    loss: str | None,
    split: str,
    samples: int | None,
    batch_size: int | None,
    device: str | None,
    seed: int,
    data_root: str | None,
    model_opt: list[str] | None,
    data_opt: list[str] | None,
    dtype: str,
    trust_factories: bool = False,
) -> AnalysisInputs:
    """:func:`load_analysis_inputs` from the raw flag values (``KEY=VALUE`` lists parsed)."""
    return load_analysis_inputs(
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
        trust_factories=trust_factories,
    )


def echo(line: str) -> None:
    """Print a result line on stdout; a reader that went away (``| head -1``) silences
    the rest of stdout instead of stopping the command before it writes its files."""
    try:
        typer.echo(line)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def progress_bar(total: int | None, unit: str, desc: str, enabled: bool = True) -> Any:
    """The live progress bar of the long analyses (:func:`sharpscope.progress.progress_bar`)."""
    from ..progress import progress_bar as bar

    return bar(total, unit, desc, enabled=enabled)
