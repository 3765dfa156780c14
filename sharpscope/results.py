"""Typed, saveable results.

Every analysis returns a frozen dataclass derived from :class:`Result`. A result
knows how to turn itself into plain JSON (``to_dict``/``to_json``) and how to save
and load itself (``.json`` keeps everything as lists; ``.npz`` keeps arrays as
arrays). Metadata lives inside the file, in :class:`RunMeta`, never in its name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import stat
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch

from . import __version__
from .errors import SharpscopeError, first_line


@dataclass(frozen=True)
class RunMeta:
    """Where a result came from: enough to reproduce it."""

    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    data: dict[str, Any] | None = None
    num_samples: int | None = None
    seed: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    mode: str = "eval"
    num_params: int | None = None
    version: str = __version__
    extra: dict[str, Any] = field(default_factory=dict)


def to_jsonable(value: Any) -> Any:
    """Convert tensors, arrays, dataclasses and numpy scalars to plain JSON values.

    >>> to_jsonable({"a": torch.tensor([1.5, 2.0]), "b": np.float64(3.0)})
    {'a': [1.5, 2.0], 'b': 3.0}
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, torch.Tensor):
        return to_jsonable(value.detach().cpu().numpy())
    if isinstance(value, np.ndarray):
        return [to_jsonable(v) for v in value.tolist()] if value.ndim else to_jsonable(value.item())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())  # a NumPy NaN or infinity is handled as a float's
    if isinstance(value, float) and not np.isfinite(value):
        return None if np.isnan(value) else (1e308 if value > 0 else -1e308)
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def csv_cell(value: Any) -> str:
    """One CSV cell: ``None`` and NaN empty, infinities ``inf``/``-inf`` (as pandas and
    ``float()`` read them), booleans ``true``/``false``, tensors and NumPy values as plain
    numbers, lists and dicts as JSON text (NaN inside them as ``null``).

    >>> [csv_cell(v) for v in (None, float("nan"), -np.inf, True, np.float32(0.5), 3)]
    ['', '', '-inf', 'true', '0.5', '3']
    >>> csv_cell({"rho": [0.5, float("nan")], "ok": True})
    '{"rho": [0.5, null], "ok": true}'
    """
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)) and value.ndim == 0:
        value = value.item()  # a 0-d tensor or array, a NumPy scalar
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return "" if math.isnan(value) else repr(value)
    value = to_jsonable(value)
    return json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def rows_to_csv_bytes(rows: list[dict[str, Any]] | Any, columns: list[str] | None = None) -> bytes:
    r"""Rows of dicts as CSV bytes, each value written by :func:`csv_cell`; the columns are
    ``columns``, or the union of the rows' keys in first-seen order.

    >>> rows_to_csv_bytes([{"a": 1, "b": float("nan")}, {"a": 2, "c": "x", "b": -np.inf}]).decode()
    'a,b,c\n1,,\n2,-inf,x\n'
    """
    import csv
    import io

    if columns is None:
        seen: dict[str, None] = {}
        for row in rows:
            for key in row:
                seen.setdefault(key, None)
        columns = list(seen)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([csv_cell(row.get(column)) for column in columns])
    return buffer.getvalue().encode()


def _umask() -> int:
    """The process's umask: from ``/proc/self/status`` on Linux (no side effect), else by
    setting it and setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """What ``open(path, "w")`` would leave: an existing file keeps its mode, a new one
    gets 0666 less the umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(data))


def write_json(path: str | os.PathLike, obj: Any, indent: int = 2) -> None:
    """Write ``obj`` (tensors, arrays and dataclasses allowed) as JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(to_jsonable(obj), indent=indent) + "\n").encode())


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then rename it to ``path``.

    A reader never sees a half-written file, and an interrupted write leaves the
    previous file in place. The file gets the permissions ``open()`` would give it (an
    existing file's own, else 0666 less the umask), not :func:`tempfile.mkstemp`'s 0600.
    A symbolic link is written through, as ``open()`` would: its target gets the data.
    So is a device, a pipe or a socket (``/dev/null``, a FIFO), not atomically: a rename
    would replace it with a plain file. ``/dev/stdout``, ``/dev/stderr`` and ``/dev/fd/N``
    go to this process's own descriptor, where it writes now (a log that stdout appends to
    keeps its lines; reopening the path would truncate it).
    """
    path = Path(path)
    descriptor = _own_descriptor(path)
    if descriptor is not None:  # /dev/stdout: this process's stream, where it points now
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        with os.fdopen(os.dup(descriptor), "wb") as handle:
            write(handle)
        return
    if _is_special_file(path):
        try:
            with open(path, "wb") as handle:
                write(handle)
        except OSError as exc:  # /dev/full
            _name_the_file(exc, path)
            raise
        return
    if path.is_symlink():
        path = Path(os.path.realpath(path))
    if path.is_dir():
        raise SharpscopeError(f"{path} is a folder; give a file name to write to")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:  # the folder takes no new file: name the file asked for, not ours
        raise SharpscopeError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            _name_the_file(exc, path)
        raise


def _name_the_file(exc: OSError, path: Path) -> None:
    """Give a write's error (disk full, a file-size limit) the name of the file asked
    for, which the error of a write() call lacks."""
    if exc.errno is not None and exc.filename is None:
        exc.filename = str(path)


def _own_descriptor(path: Path) -> int | None:
    """The descriptor that ``path`` names in this process: 1 for ``/dev/stdout``, 2 for
    ``/dev/stderr``, N for ``/dev/fd/N`` or ``/proc/self/fd/N``; else None.

    >>> _own_descriptor(Path("/dev/stdout")), _own_descriptor(Path("/dev/fd/7"))
    (1, 7)
    >>> _own_descriptor(Path("out/result.json")) is None
    True
    """
    text = str(path)
    if text in ("/dev/stdout", "/dev/stderr"):
        return 1 if text == "/dev/stdout" else 2
    found = re.fullmatch(r"/(?:dev/fd|proc/self/fd)/(\d+)", text)
    return int(found.group(1)) if found else None


def _is_special_file(path: Path) -> bool:
    """Whether ``path`` (its symbolic links followed) is neither a regular file nor a
    folder: a character or block device, a FIFO or a socket."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # missing, or a dangling link: a file is made
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def _short(value: Any, most: int = 6) -> str:
    """A short text of a result's field for :meth:`Result.summary`.

    >>> _short(torch.tensor([1.0, 2.5])), _short(torch.zeros(3, 40)), _short({"a": 1})
    ('[1, 2.5]', '<tensor 3x40>', '{1 key}')
    """
    if isinstance(value, Result):
        return value.summary()
    if isinstance(value, (torch.Tensor, np.ndarray)):
        shape = tuple(value.shape)
        if len(shape) <= 1 and (not shape or shape[0] <= most):
            values = value.tolist()  # bfloat16 too, which NumPy has no type for
            return _short(values, most)
        return f"<tensor {'x'.join(map(str, shape))}>"
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        if len(value) > most:
            return f"[{', '.join(_short(v) for v in value[:3])}, ... {len(value)} items]"
        return f"[{', '.join(_short(v) for v in value)}]"
    if isinstance(value, dict):
        return f"{{{len(value)} key{'s' if len(value) != 1 else ''}}}"
    return repr(value)


@dataclass(frozen=True)
class Result:
    """Base class of analysis results.

    Subclasses are frozen dataclasses; their fields may be tensors, arrays, numbers,
    strings, dicts, lists or a :class:`RunMeta` named ``meta``.
    """

    kind: ClassVar[str] = "result"

    def summary(self) -> str:
        """One short line of the fields: a few values of small tensors and lists, the
        shape of larger ones, the size of dicts; ``meta`` left out (``repr`` shows all).

        ``print(result)``, Jupyter and IPython show a result with it, so that a cell
        ending in a result does not print every direction, sample and timing.
        """
        parts = [
            f"{f.name}={_short(getattr(self, f.name))}"
            for f in dataclasses.fields(self)
            if f.name != "meta"
        ]
        return f"{type(self).__name__}({', '.join(parts)})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:
        printer.text(self.summary())

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # IPython takes a class's own __repr__ (which @dataclass writes) before an
        # inherited _repr_pretty_: each subclass holds its own, found first
        super().__init_subclass__(**kwargs)
        if "_repr_pretty_" not in cls.__dict__:  # a subclass's own is kept
            cls._repr_pretty_ = Result._repr_pretty_  # type: ignore[method-assign]

    def __str__(self) -> str:  # print(result); repr() keeps every value
        return self.summary()

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dictionary of every field (tensors become lists)."""
        out = to_jsonable(self)
        out["kind"] = self.kind
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """The result as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent)

    def save(self, path: str | os.PathLike) -> Path:
        """Save to ``.json`` (default) or ``.npz`` (arrays stay binary).

        An ``.npz`` holds the JSON's keys: its arrays under their own names and the
        rest as JSON text in ``__json__``. A class with a file layout of its own
        (:meth:`to_dict` overridden, as :class:`~sharpscope.analysis.spectrum.Spectrum`
        with interface.md's keys) keeps that layout: its top-level lists of numbers
        (``eigenvalues``, ...) become arrays, everything else is in ``__json__`` under
        the JSON's names."""
        path = Path(path)
        if path.suffix == ".npz":
            arrays, scalars = self._npz_parts()
            arrays["__json__"] = np.array(json.dumps(scalars))
            import io

            buffer = io.BytesIO()
            np.savez_compressed(buffer, **arrays)
            atomic_write_bytes(path, buffer.getvalue())
        else:
            atomic_write_bytes(path, (self.to_json() + "\n").encode())
        return path

    def _npz_parts(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The arrays and the JSON-able rest of an ``.npz`` save (:meth:`save`)."""
        arrays: dict[str, np.ndarray] = {}
        scalars: dict[str, Any] = {}
        if type(self).to_dict is not Result.to_dict:  # the class's own layout, as its JSON
            for key, value in self.to_dict().items():
                array = _number_list_array(getattr(self, key, None), value)
                if array is None:
                    scalars[key] = value
                else:
                    arrays[key] = array
            return arrays, scalars
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (torch.Tensor, np.ndarray)):
                arrays[f.name] = np.asarray(to_numpy(value))
            else:
                scalars[f.name] = to_jsonable(value)
        scalars["kind"] = self.kind
        return arrays, scalars

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """Rebuild a result from :meth:`to_dict` output (lists become tensors)."""
        kwargs: dict[str, Any] = {}
        hints = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in hints.items():
            if name not in data:
                continue
            value = data[name]
            type_name = str(f.type)
            if name == "meta" and isinstance(value, dict):
                value = RunMeta(**value)
            elif value is None and type_name == "float":
                value = math.nan  # JSON's null for a NaN scalar
            elif "Tensor" in type_name and value is not None:
                array = np.asarray(value)  # a mask stays bool; numbers become float64
                value = torch.as_tensor(array if array.dtype == bool else array.astype(np.float64))
            kwargs[name] = value
        return cls(**kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Result:
        """Load a result saved with :meth:`save`.

        Raises:
            SharpscopeError: a missing or unreadable file, or one holding another kind of
                result (the error names the class that loads it).
        """
        path = Path(path)
        if not path.is_file():
            what = "is a folder, not a result file" if path.is_dir() else "not found"
            raise SharpscopeError(f"result file {path} {what}")
        try:
            record = read_record(path)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            # not JSON, a cut-off or foreign .npz (numpy's own text would suggest pickle)
            why = "" if "pickle" in str(exc) else f": {first_line(exc) or type(exc).__name__}"
            raise SharpscopeError(
                f"cannot read {path} as a result saved by sharpscope{why}"
            ) from exc
        if isinstance(record, dict) and {"measure", "columns", "epoch"} <= record.keys():
            record = _study_record_result(path, record, cls.kind)
        kind = record.get("kind") if isinstance(record, dict) else None
        if not isinstance(record, dict) or (kind is not None and kind != cls.kind):
            owner = _result_classes().get(kind) if isinstance(kind, str) else None
            how = f"; load it with {owner.__module__}.{owner.__name__}.load" if owner else ""
            held = f"a result of kind '{kind}'" if isinstance(kind, str) else "no result"
            raise SharpscopeError(f"{path} holds {held}, not '{cls.kind}'{how}")
        try:
            return cls.from_dict(record)
        except (KeyError, TypeError, ValueError) as exc:
            raise SharpscopeError(
                f"cannot read {path} as {cls.__name__}: {first_line(exc) or type(exc).__name__}"
            ) from exc


def _number_list_array(original: Any, value: Any) -> np.ndarray | None:
    """A JSON value that is a non-empty list of numbers (or of bools) as an array, else
    None; the ``original`` tensor or array it came from when there is one (its dtype and
    ±∞ kept; JSON's null is NaN and ±1e308 is ±∞ otherwise).

    >>> _number_list_array(None, [1.0, None, 1e308]).tolist(), _number_list_array(None, [True])
    ([1.0, nan, inf], array([ True]))
    >>> _number_list_array(None, ["a"]) is None, _number_list_array(None, []) is None
    (True, True)
    """
    if not isinstance(value, list) or not value:
        return None
    if isinstance(original, (torch.Tensor, np.ndarray)) and original.shape == (len(value),):
        return np.asarray(to_numpy(original))
    if all(isinstance(v, bool) for v in value):
        return np.array(value, dtype=bool)
    if all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in value):
        return np.array(
            [math.nan if v is None else _json_float(repr(float(v))) for v in value],
            dtype=np.float64,
        )
    return None


def _study_record_result(path: Path, record: dict[str, Any], kind: str) -> dict[str, Any]:
    """The result that a study's analysis record (``runs/<id>/analysis/epoch_NNN/*.json``:
    measure, columns, result, ...) holds, when it holds one result of ``kind``.

    Raises:
        SharpscopeError: the record holds no such single result (it names what it holds).
    """
    inner = record.get("result")
    if isinstance(inner, dict) and inner.get("kind") == kind:
        return inner
    several = inner.get("results") if isinstance(inner, dict) else None
    held = (
        f"'result' -> 'results' holds {len(several)} results, each for from_dict; "
        if isinstance(several, list)
        else ""
    )
    if record["measure"] == "landscape":
        held = "the slices are the landscape_*.npz files beside it, for LandscapeResult.load; "
    raise SharpscopeError(
        f"{path} is a study's analysis record of '{record['measure']}', not one '{kind}' "
        f"result: read its JSON ({held}'columns' holds what results.csv shows)"
    )


def _result_classes() -> dict[str, type[Result]]:
    """kind -> the Result subclass that writes it (the analyses' modules imported)."""
    from .analysis import correlation, landscape, measures, msharpness, spectrum  # noqa: F401

    found: dict[str, type[Result]] = {}
    pending = list(Result.__subclasses__())
    while pending:
        klass = pending.pop()
        found.setdefault(klass.kind, klass)
        pending.extend(klass.__subclasses__())
    return found


def _json_float(text: str) -> float:
    """A JSON number as :func:`to_jsonable` meant it: ±1e308 (how it writes ±∞, which JSON
    has no token for) is ±∞ again.

    >>> _json_float("1e+308"), _json_float("-1e308"), _json_float("2.5")
    (inf, -inf, 2.5)
    """
    value = float(text)
    return math.copysign(math.inf, value) if abs(value) >= 1e308 else value


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """The plain dict of a saved result: a ``.json`` file, or a ``.npz`` whose arrays
    stand beside the scalars stored in its ``__json__`` entry."""
    path = Path(path)
    if path.suffix != ".npz":
        return json.loads(path.read_text(), parse_float=_json_float)
    with np.load(path, allow_pickle=False) as archive:
        text = str(archive["__json__"]) if "__json__" in archive.files else "{}"
        data = json.loads(text, parse_float=_json_float)
        data.update({key: archive[key] for key in archive.files if key != "__json__"})
    return data


def read_metrics_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (one JSON object per line).

    A cut-off last line (a run killed while appending, or still writing) is dropped, as
    ``train --resume`` does; any other line that is not JSON raises.

    Raises:
        SharpscopeError: a line before the last that is not JSON.
    """
    path = Path(path)
    text = path.read_text()
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for index, (number, line) in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if index == len(lines) and not text.endswith("\n"):  # cut off while appending
                break
            raise SharpscopeError(f"{path}:{number} is not JSON ({exc.msg})") from exc
    return rows


def eval_rows(rows: list[dict[str, Any]] | Any) -> list[dict[str, Any]]:
    """The per-epoch evaluation rows of a metrics log (``kind`` eval, or no ``kind``)."""
    return [r for r in rows if r.get("kind", "eval") == "eval" and "epoch" in r]


def to_numpy(value: Any) -> np.ndarray:
    """A tensor or array as a CPU numpy array."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
