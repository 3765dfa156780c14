"""The built-in data sets, read or generated offline.

* ``mnist1d``: Greydanus (2020), generated with ``mnist1d.data.make_dataset`` and its
  default arguments (5000 examples, the standard 4000/1000 split), cached as NPZ in
  ``$SHARPSCOPE_CACHE`` (default ``~/.cache/sharpscope``).
* ``digits``: scikit-learn's 8×8 digits (1797 images, pixel values / 16), split
  1437/360 by a fixed seeded permutation.
* ``cifar10``/``cifar100``: the python-pickle releases, read from a folder the user
  gives; the pickles are read with an unpickler that admits only the numpy array
  types they contain, so no code runs. Inputs are normalised with the usual
  per-channel means and standard deviations.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import SharpscopeError, first_line
from ..results import atomic_write_bytes


@dataclass(frozen=True)
class RawData:
    """Train and test tensors of one data set, before any option is applied."""

    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor
    num_classes: int
    # a factory's one data set serves as train and test (the test tensors are the train's)
    test_is_train: bool = False
    # a data factory's: data_summary of train (and test) as it returned them
    summary: list[float] | None = None


def cache_dir() -> Path:
    """Where generated data sets are cached."""
    # an empty value is unset (Path("") would be the working folder)
    return Path(os.environ.get("SHARPSCOPE_CACHE") or Path.home() / ".cache" / "sharpscope")


def load_mnist1d(_root: str | None = None) -> RawData:
    """MNIST-1D with the package's default arguments (4000 train / 1000 test, (40,) inputs)."""
    from mnist1d.data import get_dataset_args

    args = get_dataset_args()
    # the package's version too: another release may make other data from the same arguments
    made_by = (_package_version("mnist1d"), sorted(vars(args).items()))
    key = hashlib.sha256(repr(made_by).encode()).hexdigest()[:12]
    path = cache_dir() / f"mnist1d-{key}.npz"
    arrays = None
    if path.exists():
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in ("x", "y", "x_test", "y_test")}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error):
            arrays = None  # a damaged or truncated cache is rebuilt
        if arrays is not None and not _mnist1d_shaped(arrays, args):
            arrays = None  # a file of other arrays under the name (it trained on 10 examples)
    if arrays is None:
        from mnist1d.data import make_dataset

        data = make_dataset(args)
        arrays = {k: np.asarray(data[k]) for k in ("x", "y", "x_test", "y_test")}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except (OSError, SharpscopeError):
            pass  # read-only home or cache folder: generate again next time
    return RawData(
        torch.as_tensor(arrays["x"], dtype=torch.float32),
        torch.as_tensor(arrays["y"], dtype=torch.long),
        torch.as_tensor(arrays["x_test"], dtype=torch.float32),
        torch.as_tensor(arrays["y_test"], dtype=torch.long),
        10,
    )


def _package_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # imported from a source folder
        return "unknown"


def _mnist1d_shaped(arrays: dict[str, np.ndarray], args: Any) -> bool:
    """Whether cached arrays have the form ``args`` (mnist1d's dataset arguments) makes:
    ``num_samples`` examples split ``train_split`` : rest, inputs of ``final_seq_length``
    numbers, one label each.

    >>> from types import SimpleNamespace
    >>> args = SimpleNamespace(num_samples=5000, train_split=0.8, final_seq_length=40)
    >>> x, y = np.zeros((4000, 40)), np.zeros(4000)
    >>> _mnist1d_shaped({"x": x, "y": y, "x_test": x[:1000], "y_test": y[:1000]}, args)
    True
    >>> _mnist1d_shaped({"x": x[:10], "y": y[:10], "x_test": x[:1000], "y_test": y[:1000]}, args)
    False
    """
    x, y, xt, yt = (arrays[k] for k in ("x", "y", "x_test", "y_test"))
    return (
        x.shape[1:] == xt.shape[1:] == (args.final_seq_length,)
        and y.shape == (len(x),)
        and yt.shape == (len(xt),)
        and len(x) + len(xt) == args.num_samples
        and len(x) == int(args.num_samples * args.train_split)
        and all(np.issubdtype(a.dtype, np.number) for a in (x, y, xt, yt))
    )


def load_digits(_root: str | None = None) -> RawData:
    """scikit-learn digits as (N, 1, 8, 8) images in [0, 1], split 1437/360 (seed 0)."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    inputs = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    targets = torch.as_tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(0))
    num_test = 360
    test, train = order[:num_test].sort().values, order[num_test:].sort().values
    return RawData(inputs[train], targets[train], inputs[test], targets[test], 10)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler for the CIFAR files: numpy arrays, dicts, lists, bytes; nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
        # protocol 5 (pickle.HIGHEST_PROTOCOL) stores an array as bytes + dtype + shape
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):  # noqa: D102
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        if (module, name) in (("__builtin__", "bytes"), ("builtins", "bytes")):
            return _empty_bytes  # protocol 2 from Python 3 writes b"" as a call of bytes()
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()`` as protocol 2 calls it for an empty value; any other call is refused (a
    size argument would let a data file ask for any amount of memory)."""
    if args:
        raise pickle.UnpicklingError("refusing a call of bytes with arguments in a data file")
    return b""


def _read_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            data = _ArrayOnlyUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise SharpscopeError(f"{path} is not a readable CIFAR pickle file: {exc}") from exc
    except Exception as exc:
        # A few changed bytes make the unpickler raise almost anything: an opcode applied
        # to the wrong object (TypeError, AttributeError), a misspelt encoding name
        # (LookupError), a huge length field (MemoryError, OverflowError), ... (bugs B2,
        # session 28). Nothing it calls runs code: find_class still admits arrays only.
        raise SharpscopeError(
            f"{path} is not a readable CIFAR pickle file: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    if not isinstance(data, dict):
        raise SharpscopeError(f"{path} does not hold a CIFAR batch dictionary")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in data.items()}


CIFAR_LAYOUT = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        10,
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", 100),
}
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def cifar_folder(name: str, root: str | None) -> Path:
    """The folder under ``root`` that holds every file of CIFAR-10/100 (none is read)."""
    folder_name, train_files, test_files, _, _ = CIFAR_LAYOUT[name]
    expected = ", ".join(train_files + test_files)
    if root is None:
        raise SharpscopeError(
            f"{name} is read from a local folder: pass --data-root DIR (Python: data_root=) "
            f"holding {folder_name}/ "
            f"({expected}); sharpscope never downloads data"
        )
    root_path = Path(root).expanduser()
    for candidate in (root_path / folder_name, root_path):
        if all((candidate / f).is_file() for f in train_files + test_files):
            return candidate
    for candidate in (root_path / folder_name, root_path):
        present = [f for f in train_files + test_files if (candidate / f).is_file()]
        if present:  # a partial copy: say what is missing
            missing = [f for f in train_files + test_files if f not in present]
            raise SharpscopeError(f"{name} in {candidate} lacks {', '.join(missing)}")
    raise SharpscopeError(
        f"{name} files not found in {root_path}: expected {folder_name}/ with {expected} "
        "(--data-root DIR names the folder that holds it)"
    )


def _cifar_arrays(
    folder: Path, files: list[str], label_key: str, num_classes: int
) -> tuple[Tensor, Tensor]:
    inputs, labels = [], []
    for file in files:
        path = folder / file
        batch = _read_pickle(path)
        if "data" not in batch or label_key not in batch:
            raise SharpscopeError(f"{path} lacks the 'data' or '{label_key}' entry")
        data = np.asarray(batch["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise SharpscopeError(
                f"{path}: 'data' must be uint8 rows of 3072 values (3 x 32 x 32), got "
                f"{data.dtype} of shape {data.shape}"
            )
        label = np.asarray(batch[label_key]).reshape(-1)
        if label.dtype.kind not in "iu" and len(label):
            raise SharpscopeError(
                f"{path}: '{label_key}' must be integers, got {label.dtype} values"
            )
        label = label.astype(np.int64)
        if len(label) != len(data):
            raise SharpscopeError(f"{path}: {len(data)} images but {len(label)} labels")
        if len(label) and (label.min() < 0 or label.max() >= num_classes):
            raise SharpscopeError(
                f"{path}: labels must lie in 0..{num_classes - 1}, got {label.min()}..{label.max()}"
            )
        inputs.append(data.reshape(-1, 3, 32, 32))
        labels.append(label)
    return torch.from_numpy(np.concatenate(inputs)), torch.from_numpy(np.concatenate(labels))


def _normalise(images: Tensor, name: str) -> Tensor:
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in CIFAR_STATS[name])
    return (images.float() / 255.0 - mean) / std


def load_cifar(name: str) -> Callable[[str | None], RawData]:
    """A loader of CIFAR-10 or CIFAR-100 from the python-pickle files under a root."""

    def loader(root: str | None) -> RawData:
        folder = cifar_folder(name, root)
        _, train_files, test_files, label_key, num_classes = CIFAR_LAYOUT[name]
        x_train, y_train = _cifar_arrays(folder, train_files, label_key, num_classes)
        x_test, y_test = _cifar_arrays(folder, test_files, label_key, num_classes)
        return RawData(
            _normalise(x_train, name), y_train, _normalise(x_test, name), y_test, num_classes
        )

    return loader


SOURCES: dict[str, Callable[[str | None], RawData]] = {
    "mnist1d": load_mnist1d,
    "digits": load_digits,
    "cifar10": load_cifar("cifar10"),
    "cifar100": load_cifar("cifar100"),
}
