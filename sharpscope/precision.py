"""IEEE float32 inside the analyses: TensorFloat-32 off (analysis.md, "Precision").

On Ampere and later NVIDIA GPUs PyTorch runs float32 convolutions in TensorFloat-32 by
default (``torch.backends.cudnn.allow_tf32``): a 10-bit mantissa, about 1e-3 relative
error per product, which is not the float32 that analysis.md asks the forward and
backward passes to use. Hessian-vector products, m-sharpness and landscape values then
differ from the CPU's by far more than float32 rounding. The analyses therefore run with
TF32 off for convolutions and matrix products, and restore the caller's settings on
exit; training keeps PyTorch's defaults. On the CPU nothing changes.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the block (or, as a decorator, the function) with TF32 off; restore on exit.

    >>> with ieee_float32():
    ...     torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    (False, False)
    """
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = cudnn
        torch.backends.cuda.matmul.allow_tf32 = matmul


#: The half-precision dtypes, whose rounding (1e-3, 8e-3 relative) the analyses point out.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def rounding(dtype: torch.dtype) -> str:
    """A float dtype's machine epsilon as the messages write it.

    >>> rounding(torch.float16), rounding(torch.bfloat16)
    ('1e-3', '8e-3')
    """
    return f"{torch.finfo(dtype).eps:.0e}".replace("e-0", "e-")


def float_dtype(module: torch.nn.Module) -> torch.dtype | None:
    """The dtype of ``module``'s first floating-point tensor, parameters before buffers
    (None: it has none), the dtype its inputs are read in.

    >>> float_dtype(torch.nn.Linear(2, 1).double()), float_dtype(torch.nn.ReLU())
    (torch.float64, None)
    """
    return next((t.dtype for t in floating_tensors(module)), None)


def floating_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """``module``'s floating-point tensors, parameters before buffers."""
    tensors = itertools.chain(module.parameters(), module.buffers())
    return (t for t in tensors if t.is_floating_point())


def least_precise(*dtypes: torch.dtype) -> torch.dtype:
    """The floating dtype of the largest machine epsilon: the rounding of a computation
    that mixes them.

    >>> least_precise(torch.float64, torch.float32, torch.float64)
    torch.float32
    """
    return max(dtypes, key=lambda d: torch.finfo(d).eps)
