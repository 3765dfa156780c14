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
from contextlib import ExitStack, contextmanager

import torch


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Run the block (or, as a decorator, the function) in IEEE float32, restoring the
    caller's settings on exit: no TensorFloat-32 or bfloat16 matrix products and
    convolutions (on the GPU, and oneDNN's on the CPU after
    ``torch.set_float32_matmul_precision("medium")``), and no ``torch.autocast`` of the
    caller's (whose cache of half-precision weights also made every point of a landscape
    the centre's). A setting is only written where it is not IEEE already, through the
    API the caller used (PyTorch refuses to read its legacy TF32 switches once the newer
    ``fp32_precision`` ones are set, and the reverse).

    >>> with ieee_float32():
    ...     torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    (False, 'highest')
    """
    with ExitStack() as stack:
        for device in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device):
                stack.enter_context(torch.autocast(device, enabled=False))
        _tf32_off(stack)
        yield


def _tf32_off(stack: ExitStack) -> None:
    backends = torch.backends
    switches = _precision_switches()
    try:
        matmul = torch.get_float32_matmul_precision()
    except RuntimeError:  # the caller set the newer per-backend switches: the loop below
        matmul = "highest"
    onednn = getattr(getattr(backends.mkldnn, "matmul", None), "fp32_precision", "none")
    if matmul != "highest" and (not switches or onednn != "none"):
        # torch.set_float32_matmul_precision's: cuBLAS' TF32, and oneDNN's bf16 ("medium")
        # or TF32 ("high") on the CPU; before torch 2.9 also the legacy switch below
        torch.set_float32_matmul_precision("highest")
        stack.callback(torch.set_float32_matmul_precision, matmul)
    else:
        try:  # the legacy switch of cuBLAS' TF32 alone
            cublas = backends.cuda.matmul.allow_tf32
        except RuntimeError:
            cublas = False
        if cublas:
            backends.cuda.matmul.allow_tf32 = False
            stack.callback(setattr, backends.cuda.matmul, "allow_tf32", True)
    try:  # cuDNN's convolutions (TF32 by default)
        convolutions = backends.cudnn.allow_tf32
    except RuntimeError:
        convolutions = False
    if convolutions:
        backends.cudnn.allow_tf32 = False
        stack.callback(setattr, backends.cudnn, "allow_tf32", True)
    for leaf in switches:  # the newer API's, where the caller set it (torch >= 2.9)
        setting = leaf.fp32_precision
        if setting not in ("none", "ieee"):
            leaf.fp32_precision = "ieee"
            stack.callback(setattr, leaf, "fp32_precision", setting)


#: the backends' per-operation ``fp32_precision`` switches (torch >= 2.9)
_SWITCHES = (
    ("cuda", ("matmul",)),
    ("cudnn", ("conv", "rnn")),
    ("mkldnn", ("matmul", "conv", "rnn")),
)


def _precision_switches() -> list:
    """The per-backend ``fp32_precision`` switches of PyTorch 2.9 and later (none before)."""
    leaves = (
        getattr(getattr(torch.backends, parent), name, None)
        for parent, names in _SWITCHES
        for name in names
    )
    return [leaf for leaf in leaves if hasattr(leaf, "fp32_precision")]


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
