"""Deterministic kernels for training (``train --deterministic``).

On the CPU sharpscope's training is already reproducible: a resumed run ends with the
same weights as an uninterrupted one. On a GPU, cuDNN and atomics-based kernels may sum
in a different order on every call (a resumed run on an H200 differed by 4e-7). Inside
:func:`deterministic_algorithms` PyTorch must use deterministic algorithms
(``torch.use_deterministic_algorithms``, cuDNN's deterministic kernels, no cuDNN
benchmarking, and the cuBLAS workspace setting that NVIDIA documents for reproducible
results), so repeats and resumes are bit-identical on the same machine and software, at
some speed cost. An operation without a deterministic implementation raises
:class:`~sharpscope.errors.SharpscopeError` naming it. See PyTorch's "Reproducibility"
notes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .errors import SharpscopeError, first_line

__all__ = ["deterministic_algorithms"]

#: NVIDIA's setting for deterministic cuBLAS (CUDA >= 10.2), used unless the user set one
CUBLAS_WORKSPACE_CONFIG = ":4096:8"
_NO_DETERMINISTIC = "does not have a deterministic implementation"


def lacks_deterministic_kernel(exc: BaseException) -> bool:
    """Whether ``exc`` is PyTorch refusing an operation under deterministic algorithms."""
    return isinstance(exc, RuntimeError) and _NO_DETERMINISTIC in first_line(exc)


@contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Run the block with deterministic algorithms only (no-op if not ``enabled``).

    Restores the previous settings (and ``CUBLAS_WORKSPACE_CONFIG``) on exit.

    >>> with deterministic_algorithms():
    ...     torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    (True, True)
    >>> torch.are_deterministic_algorithms_enabled()
    False
    """
    if not enabled:
        yield
        return
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    except RuntimeError as exc:
        if not lacks_deterministic_kernel(exc):
            raise
        operation = first_line(exc).split(_NO_DETERMINISTIC)[0].strip() or "an operation"
        raise SharpscopeError(
            f"--deterministic: the model uses {operation}, which {_NO_DETERMINISTIC} on "
            "this device; train without --deterministic or replace that operation"
        ) from exc
    finally:
        enabled_before, warn_only, cudnn_deterministic, cudnn_benchmark, cublas = saved
        torch.use_deterministic_algorithms(enabled_before, warn_only=warn_only)
        torch.backends.cudnn.deterministic = cudnn_deterministic
        torch.backends.cudnn.benchmark = cudnn_benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas
