"""User-facing errors.

Anything the user can fix (a wrong name, a missing file, a bad value) raises
:class:`SharpscopeError` with one line that says what was wrong and what would be
right. The CLI prints that line to stderr and exits non-zero, without a traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from numbers import Integral, Real
from pathlib import Path
from typing import Any


class SharpscopeError(Exception):
    """An error caused by user input; its message is one complete line."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`SharpscopeError` with ``message`` unless ``condition`` holds.

    >>> check(1 + 1 == 2, "arithmetic is broken")
    """
    if not condition:
        raise SharpscopeError(message)


def check_autograd(what: str) -> None:
    """Refuse to run ``what``, which needs gradients, inside ``torch.inference_mode()``
    (whose tensors never record a graph; ``torch.no_grad()`` is fine).

    >>> check_autograd("Hessian-vector products")
    """
    import torch

    if torch.is_inference_mode_enabled():
        raise SharpscopeError(
            f"called inside torch.inference_mode(): {what} need autograd; call it outside "
            "(torch.no_grad() is fine)"
        )


def torchscript_problem(
    model: Any, fix: str = "use the Python nn.Module it was made from"
) -> str | None:
    """What is wrong with analysing ``model`` when it is, or holds, a TorchScript module
    (``torch.jit.script``/``trace``): ``torch.func`` (functional_call, vmap), and so the
    Hessian, m-sharpness, the landscape and the measures, cannot run it. None otherwise.

    >>> import torch
    >>> torchscript_problem(torch.nn.Linear(2, 2)) is None
    True
    """
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.jit.ScriptModule):
            what = f"the model's submodule '{name}' is" if name else "the model is"
            return (
                f"{what} a TorchScript module (torch.jit.script or trace), which torch.func "
                "cannot run, so no analysis (Hessian, m-sharpness, landscape, measures) could "
                f"read it: {fix}"
            )
    return None


def meta_problem(model: Any) -> str | None:
    """What is wrong with ``model`` when a parameter or buffer is on the ``meta`` device
    (shapes without values: built under ``torch.device("meta")`` and never materialized).
    None otherwise.

    >>> import torch
    >>> with torch.device("meta"):
    ...     model = torch.nn.Linear(2, 2)
    >>> meta_problem(model)[:61]
    "the model's weight is on the meta device (a shape, no values)"
    """
    import itertools

    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        if tensor.is_meta:
            return (
                f"the model's {name} is on the meta device (a shape, no values): "
                "materialize the model (model.to_empty(device=...) and initialize its "
                "weights) before using it"
            )
    return None


def check_initialized(model: Any) -> None:
    """One line for a model that has nothing to analyse yet or cannot be analysed: lazy
    parameters (``nn.LazyLinear`` before its first call) have no shape yet, ``meta``
    tensors no values (:func:`meta_problem`), and a TorchScript module cannot run under
    ``torch.func`` (:func:`torchscript_problem`). Every analysis passes here."""
    import torch

    for name, p in model.named_parameters():
        if torch.nn.parameter.is_lazy(p):
            raise SharpscopeError(
                f"the model's parameter {name} is not initialized yet (a lazy module): "
                "run the model once on an input before analysing it"
            )
    problem = meta_problem(model) or torchscript_problem(model)
    if problem is not None:
        raise SharpscopeError(problem)


#: the largest seed taken: torch's generators hold 64 bits, and derived seeds add offsets
MAX_SEED = 2**62


def check_seed(name: str, value: object) -> int:
    """Refuse a seed that is not an integer from 0 to :data:`MAX_SEED`.

    >>> check_seed("--seed", 2**70)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: --seed must be an integer from 0 to 2^62, got 1180591620717411303424
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or not 0 <= value <= MAX_SEED:
        raise SharpscopeError(f"{name} must be an integer from 0 to 2^62, got {value!r}")
    return int(value)  # NumPy integers too


def check_integers(**values: object) -> None:
    """Refuse a count given as anything but an integer (``None``: not given, passes), in
    one line that names the type, before it reaches a slice or a tensor size.

    >>> check_integers(k=5, max_steps=None)
    >>> check_integers(k=2.0)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: k must be an integer, got 2.0 (float)
    """
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, Integral)):
            raise SharpscopeError(
                f"{name} must be an integer, got {value!r} ({type(value).__name__})"
            )


def check_numbers(**values: object) -> None:
    """Refuse a quantity given as anything but a real number (a string, a bool, ...).

    >>> check_numbers(rho="0.05")
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: rho must be a number, got '0.05' (str)
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, Real):
            raise SharpscopeError(
                f"{name} must be a number, got {value!r} ({type(value).__name__})"
            )


def check_bool(name: str, value: object) -> bool:
    """Refuse a yes/no setting given as anything but ``True`` or ``False``: ``bool("no")``
    is True, so a string would turn the option on.

    >>> check_bool("same_noise", "false")
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: same_noise must be true or false, got 'false' (str)
    """
    if not isinstance(value, bool):
        raise SharpscopeError(
            f"{name} must be true or false, got {value!r} ({type(value).__name__})"
        )
    return value


def check_choice(name: str, value: object, choices: Iterable[str]) -> None:
    """Raise :class:`SharpscopeError` unless ``value`` is one of ``choices``.

    >>> check_choice("norm", "l3", ("l2", "linf"))
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: norm must be one of l2, linf, got 'l3'
    """
    choices = tuple(choices)
    if value not in choices:
        raise SharpscopeError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def model_failure(exc: BaseException, inputs: Any = None) -> SharpscopeError:
    """The one-line error for a model or loss that raised on the user's data.

    A tuple or dict where a tensor was expected (a model returning logits with features,
    an LSTM's (output, state) passed on by ``nn.Sequential``) is pointed out: the analyses
    need one tensor of outputs.

    Integer ``inputs`` (raw 8-bit images), on which a model of floating-point weights
    fails with PyTorch's dtype message, are told how to convert them.

    >>> str(model_failure(RuntimeError("shapes (2, 3) and (4,) do not match")))
    'the model or loss failed on the data: RuntimeError: shapes (2, 3) and (4,) do not match'
    """
    text = first_line(exc)
    hint = ""
    dtype = getattr(inputs, "dtype", None)
    if dtype is not None and not (inputs.is_floating_point() or inputs.is_complex()):
        name = str(dtype).replace("torch.", "")
        hint = (
            f" (the inputs are {name}: convert them to floating point in the data, e.g. "
            "x.float() / 255 for 8-bit images)"
        )
    for kind in ("tuple", "dict"):
        if f"not {kind}" in text or f"'{kind}' object" in text:
            hint = (
                f" (did the model, or a layer in it, return a {kind}? the analyses and the "
                "loss take one tensor of outputs: wrap the model so that it returns the logits)"
            )
            break
    return SharpscopeError(
        f"the model or loss failed on the data: {type(exc).__name__}: {text}{hint}"
    )


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (``""`` when it has none).

    >>> first_line(ValueError("bad value\\nmore detail"))
    'bad value'
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def loss_value_problem(value: object, *, finite: bool = True) -> str | None:
    """What is wrong with a loss value, or ``None`` when it is a (finite) scalar tensor.

    A loss must return the mean over the batch, a 0-dimensional tensor (interface.md:
    ``loss(outputs, targets) -> scalar mean``). ``finite=False`` checks the shape only,
    which reads no value (allowed under ``torch.func`` transforms, no GPU sync).

    >>> import torch
    >>> loss_value_problem(torch.tensor(0.5)) is None
    True
    >>> loss_value_problem(torch.ones(4))
    'it returned a tensor of shape (4,), not a scalar (return the mean over the batch)'
    >>> loss_value_problem(torch.tensor(float("nan")))[:33]
    'it returned nan, not a finite num'
    """
    import torch

    if not isinstance(value, torch.Tensor):
        return f"it returned {type(value).__name__}, not a scalar tensor"
    if value.dim() != 0:
        return (
            f"it returned a tensor of shape {tuple(value.shape)}, not a scalar "
            "(return the mean over the batch)"
        )
    if finite and not bool(torch.isfinite(value.detach())):
        return (
            f"it returned {value.item()}, not a finite number (the checkpoint or data holds "
            "non-finite values, the model diverged, or the loss itself is not finite)"
        )
    return None


def check_loss_value(value: object) -> None:
    """Raise one line unless the loss ``value`` is a finite scalar tensor (the check
    run on a few examples before an analysis starts).

    Raises:
        SharpscopeError: a non-tensor, a tensor with dimensions, or a NaN/infinite loss.
    """
    problem = loss_value_problem(value)
    if problem is not None:
        raise SharpscopeError(f"the loss on the data is not a finite scalar: {problem}")


def caller_level() -> int:
    """The ``stacklevel`` of the first frame outside sharpscope (and the standard library's
    contextlib/functools wrappers) for a warning issued by this module's caller, so that it
    names the user's line whatever the depth of the call."""
    package = str(Path(__file__).resolve().parent)
    frame, level = sys._getframe(1), 1  # the function that calls warnings.warn
    while frame is not None:
        file = frame.f_code.co_filename
        if not (file.startswith(package) or file.endswith(("contextlib.py", "functools.py"))):
            return level
        frame, level = frame.f_back, level + 1
    return level
