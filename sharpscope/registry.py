"""Models, losses and user factories by name.

A model or loss is named in one of two forms (interface.md):

* a registry name with keyword options, ``{"name": "cnn1d", "norm": "batch"}``;
* an import path ``"module:function"`` or ``"path/to/file.py:function"`` naming a
  zero-argument factory, stored as ``{"factory": "module:function"}``.

Data sets live in :mod:`sharpscope.data` and optimizers in :mod:`sharpscope.optim`;
both use :func:`resolve_factory` for user factories too.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import logging
import math
import os
import sys
import types
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .device_memory import is_out_of_memory
from .errors import (
    SharpscopeError,
    caller_level,
    first_line,
    loss_value_problem,
    meta_problem,
)

LossFn = Callable[[Tensor, Tensor], Tensor]


def is_factory_path(name: str) -> bool:
    """Whether ``name`` is a ``module:function`` / ``file.py:function`` path.

    >>> is_factory_path("cnn1d"), is_factory_path("my_models:build")
    (False, True)
    """
    return ":" in name and not name.startswith(":") and not name.endswith(":")


# the flag that names each kind of spec on the command line (train and the analyses)
FLAGS = {"model": "--model", "data set": "--data", "loss": "--loss"}


def _is_file_module(module_name: str) -> bool:
    """Whether the part before ``:`` is a path to a ``.py`` file (else a module name)."""
    return module_name.endswith(".py") or "/" in module_name or "\\" in module_name


def absolute_factory(path: str) -> str:
    """``path/to/file.py:function`` with the file made absolute; anything else unchanged.

    Specs are recorded (checkpoints, ``config.json``, studies) with absolute file paths,
    so that they resolve from any working directory. The path is made absolute from the
    current folder, as :func:`resolve_factory` reads it.

    >>> absolute_factory("pkg.mod:make"), absolute_factory("resnet20")
    ('pkg.mod:make', 'resnet20')
    >>> absolute_factory("/opt/f.py:net")
    '/opt/f.py:net'
    """
    if not isinstance(path, str) or not is_factory_path(path):
        return path
    module_name, _, attr = path.rpartition(":")
    if not _is_file_module(module_name) or Path(module_name).is_absolute():
        return path
    return f"{os.path.abspath(os.path.expanduser(module_name))}:{attr}"


def absolute_spec(spec: Any) -> Any:
    """A spec (dict or string) whose file-path factory is absolute (:func:`absolute_factory`)."""
    if isinstance(spec, str):
        return absolute_factory(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("factory"), str):
        return {**spec, "factory": absolute_factory(spec["factory"])}
    return spec


@contextlib.contextmanager
def calling_user_code(what: str, hint: str) -> Iterator[None]:
    """Run a user's module or factory, named ``what``, so that a ``sys.exit`` there (an
    argparse parser reading sharpscope's own arguments, a script's ``exit()``) ends in a
    line that names it, not in argparse's usage line alone or a silent exit 0 (bug B4,
    session 28). What the code writes to ``sys.stderr`` (a data factory's progress) is
    not held back: it shows as it comes, so a usage line stays above the error.

    >>> with calling_user_code("data factory 'f.py:make'", "does it parse the command line?"):
    ...     raise SystemExit(2)
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: data factory 'f.py:make' called sys.exit(2); does it parse the command line?
    """
    try:
        yield
    except SystemExit as exc:
        raise SharpscopeError(f"{what} called sys.exit({exc.code!r}); {hint}") from None


def resolve_factory(path: str, kind: str | None = None) -> Callable[..., Any]:
    """Import the callable named by ``module:function`` or ``path/to/file.py:function``.

    Args:
        path: the factory path; a relative file path is read from the current folder.
        kind: ``"model"``, ``"data set"`` or ``"loss"``: the error for a missing file then
            names the flag that gives that kind another way (for a checkpoint's recorded
            path, relative to the folder it was trained in).

    Raises:
        SharpscopeError: when the module or function cannot be found.
    """
    if not is_factory_path(path):
        raise SharpscopeError(f"'{path}' is not of the form module:function or file.py:function")
    module_name, _, attr = path.rpartition(":")
    what = f"{kind} factory" if kind else "factory"
    flag = FLAGS.get(kind or "")
    importing = calling_user_code(
        f"importing '{module_name}' for {what} '{path}'",
        "does the module parse the command line when imported? Put that under "
        '`if __name__ == "__main__":`',
    )
    try:
        with importing:
            module = _import_user_module(module_name, what, kind, flag)
    except SharpscopeError:
        raise
    except ImportError as exc:
        hint = ""
        if exc.name and module_name.split(".")[0] == exc.name.split(".")[0]:
            hint = (
                "; put the folder holding it on PYTHONPATH, or name the file itself as "
                f"path/to/{module_name.replace('.', '/')}.py:{attr}"
            )
        raise SharpscopeError(
            f"cannot import module '{module_name}' for '{path}': {first_line(exc)}{hint}"
        ) from exc
    except Exception as exc:  # the user's module raised while importing
        raise SharpscopeError(
            f"importing '{module_name}' failed: {type(exc).__name__}: {first_line(exc)}"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise SharpscopeError(f"'{module_name}' has no callable named '{attr}'")
    return factory


def _import_user_module(
    module_name: str, what: str, kind: str | None, flag: str | None
) -> types.ModuleType:
    if not _is_file_module(module_name):
        return importlib.import_module(module_name)
    file = Path(module_name).expanduser().resolve()
    if not file.is_file():
        raise SharpscopeError(_missing_file(what, module_name, file, kind, flag))
    key = f"_sharpscope_user_{abs(hash(str(file)))}"
    module = sys.modules.get(key)
    if module is None:
        spec = importlib.util.spec_from_file_location(key, file)
        if spec is None or spec.loader is None:
            raise SharpscopeError(f"cannot import {file}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:  # a module that failed half-way is not kept for the next call
            sys.modules.pop(key, None)
            raise
    return module


#: what a factory that calls sys.exit is asked
EXIT_HINT = (
    "a factory returns its value and does not exit: does it parse the command line "
    "(argparse there reads sharpscope's own arguments)?"
)


def _missing_file(
    what: str, module_name: str, file: Path, kind: str | None, flag: str | None
) -> str:
    message = f"{what} file not found: {file}"
    override = f"override it with {flag}" if flag else f"give the {kind or 'factory'} another way"
    if not Path(module_name).expanduser().is_absolute():
        return (
            f"{message} ('{module_name}' is read from the current folder; a relative path "
            f"recorded in a checkpoint is relative to the folder it was trained in: run from "
            f"there, or {override})"
        )
    if flag:
        return f"{message} (if a checkpoint recorded this path, {override})"
    return message


def check_factory(path: str, kind: str | None = None) -> None:
    """Check, without importing anything, that a factory path can be found: a
    ``file.py:function``'s file exists, a ``module:function``'s top-level package is on
    the path. For checking a configuration before anything runs.

    Raises:
        SharpscopeError: the same line :func:`resolve_factory` would give.
    """
    if not is_factory_path(path):
        raise SharpscopeError(f"'{path}' is not of the form module:function or file.py:function")
    module_name, _, attr = path.rpartition(":")
    if _is_file_module(module_name):
        file = Path(module_name).expanduser().resolve()
        if not file.is_file():
            what = f"{kind} factory" if kind else "factory"
            raise SharpscopeError(f"{what} file not found: {file}")
        return
    top = module_name.split(".")[0]
    try:
        found = top in sys.modules or importlib.util.find_spec(top) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise SharpscopeError(
            f"cannot import module '{module_name}' for '{path}': no module named '{top}'; "
            "put the folder holding it on PYTHONPATH, or name the file itself as "
            f"path/to/{module_name.replace('.', '/')}.py:{attr}"
        )


def check_model_spec(
    spec: str | Mapping[str, Any],
    shapes: tuple[tuple[int, ...], int] | None = None,
    *,
    check_files: bool = True,
) -> nn.Module | None:
    """Check a model spec without building it for real: a registry name (and, when the
    data's ``(input_shape, num_classes)`` are known, its options, by building it on the
    ``meta`` device, which allocates nothing), or that a factory can be found.

    Returns:
        The model built on ``meta``, for checks of its size and layers before anything
        trains; None for a factory, unknown shapes, or a build that failed for another
        reason than its options (the real build will tell).

    Raises:
        SharpscopeError: an unknown name, option or value, or a factory not found.
    """
    from .models import MODELS

    spec = normalize_spec(spec, "model")
    if "factory" in spec:
        if check_files:
            check_factory(spec["factory"], "model")
        return None
    name = spec["name"]
    if name not in MODELS:
        raise unknown_name("model", name, list(MODELS))
    if shapes is None:
        return None
    options = {k: v for k, v in spec.items() if k != "name"}
    try:
        with torch.device("meta"):
            return MODELS[name](tuple(shapes[0]), int(shapes[1]), **options)
    except SharpscopeError:
        raise
    except Exception as exc:  # not an option problem; the real build will tell
        logging.getLogger(__name__).debug("trial build of %s on meta failed: %r", name, exc)
        return None


def check_loss_spec(spec: str | Mapping[str, Any], *, check_files: bool = True) -> None:
    """Check a loss spec: a built-in name, or a factory that can be found.

    Raises:
        SharpscopeError: an unknown name or a factory not found.
    """
    spec = normalize_spec(spec, "loss")
    if "factory" in spec:
        if check_files:
            check_factory(spec["factory"], "loss")
        return
    if spec["name"] not in LOSSES:
        raise unknown_name("loss", spec["name"], list(LOSSES))


def normalize_spec(spec: str | Mapping[str, Any] | None, kind: str) -> dict[str, Any]:
    """Turn ``"name"``, ``"module:fn"`` or a dict into a spec dict.

    >>> normalize_spec("cnn1d", "model")
    {'name': 'cnn1d'}
    >>> normalize_spec("pkg.mod:make", "model")
    {'factory': 'pkg.mod:make'}
    """
    if spec is None:
        raise SharpscopeError(f"no {kind} given")
    if isinstance(spec, str):
        return {"factory": spec} if is_factory_path(spec) else {"name": spec}
    if isinstance(spec, Mapping):
        out = dict(spec)
        if "name" not in out and "factory" not in out:
            raise SharpscopeError(f"{kind} spec needs a 'name' or a 'factory': {out}")
        for key in ("name", "factory"):
            if key in out and not isinstance(out[key], str):
                raise SharpscopeError(f"the {kind} spec's {key} must be a string, got {out[key]!r}")
        if "name" in out and is_factory_path(out["name"]):
            out["factory"] = out.pop("name")
        return out
    raise SharpscopeError(f"cannot read {kind} spec {spec!r}")


def factory_of(spec: Any) -> str | None:
    """The ``module:function`` / ``file.py:function`` a model, data or loss spec names, if any.

    >>> factory_of("cnn1d"), factory_of("my.py:net"), factory_of({"factory": "m:f", "width": 2})
    (None, 'my.py:net', 'm:f')
    """
    if isinstance(spec, str):
        return spec if is_factory_path(spec) else None
    if isinstance(spec, Mapping):
        for key in ("factory", "name"):
            if isinstance(spec.get(key), str) and is_factory_path(spec[key]):
                return spec[key]
    return None


#: the Python arguments that name a model or data set instead of a checkpoint's own
PYTHON_ARGS = {"model": "model_spec=", "data set": "data_spec="}


def _listed(items: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def check_trusted_factories(
    specs: Mapping[str, Any],
    source: Any,
    trusted: bool,
    *,
    given: Mapping[str, Any] | None = None,
    flags: Mapping[str, str] = FLAGS,
    python: bool = False,
    what: str = "the file",
) -> None:
    """Refuse to import the factories that a file (a checkpoint) names, unless ``trusted``.

    A checkpoint is read with ``weights_only=True``, so reading it runs no code; but a
    spec naming ``module:function`` would import and call it (``os:system`` or a file's
    top-level code), so a file from someone else could still run code. The factories a
    user names themselves (flags, configs) are theirs to run.

    Args:
        specs: kind ("model", "data set", "loss") -> the file's spec.
        source: the file, as the message names it.
        given: kind -> what the user named instead (a flag's value; None: nothing), so
            that the file's spec of that kind is not used and not checked.
        flags: the flag that names each kind instead; ``python``: also say how in Python.

    Raises:
        SharpscopeError: one line naming every factory in ``specs`` (not one at a time),
            unless ``trusted``.
    """
    if trusted:
        return
    given = given or {}
    found = {kind: factory_of(spec) for kind, spec in specs.items() if given.get(kind) is None}
    found = {kind: factory for kind, factory in found.items() if factory is not None}
    if not found:
        return
    named = _listed([f"the {kind} factory '{factory}'" for kind, factory in found.items()])
    if len(found) == 1:
        (kind,) = found
        how = f"name the {kind} yourself with {flags[kind]}"
        if python and kind in PYTHON_ARGS:
            how += f" ({PYTHON_ARGS[kind]} in Python)"
    else:
        how = f"name them yourself with {_listed([flags[kind] for kind in found])}"
    trust = " (trust_factories=True in Python)" if python else ""
    raise SharpscopeError(
        f"{source} names {named}, code that would run: pass --trust-factories if you "
        f"trust {what}{trust}, or {how}"
    )


def check_trusted_factory(spec: Any, kind: str, source: Any, trusted: bool) -> None:
    """:func:`check_trusted_factories` for one spec, as the Python API reports it."""
    check_trusted_factories({kind: spec}, source, trusted, python=True)


def unknown_name(kind: str, name: str, choices: list[str]) -> SharpscopeError:
    """The error for an unknown registry name, listing the valid ones."""
    return SharpscopeError(
        f"unknown {kind} '{name}'; choose one of: {', '.join(sorted(choices))} "
        "(or a module:function factory)"
    )


def model_names() -> list[str]:
    """Registered model names."""
    from .models import MODELS

    return sorted(MODELS)


def build_model(
    spec: str | Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """Build the model named by ``spec`` for the given input shape and class count.

    A ``factory`` spec calls the user's zero-argument function and must return an
    ``nn.Module``; a ``name`` spec looks up :data:`sharpscope.models.MODELS` and
    passes the remaining keys as options.
    """
    from .models import MODELS

    spec = normalize_spec(spec, "model")
    if "factory" in spec:
        options = {k: v for k, v in spec.items() if k != "factory"}
        try:
            factory = resolve_factory(spec["factory"], "model")
            with calling_user_code(f"model factory '{spec['factory']}'", EXIT_HINT):
                model = factory(**options)
        except SharpscopeError:
            raise
        except Exception as exc:
            raise SharpscopeError(
                f"model factory '{spec['factory']}' failed: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        if not isinstance(model, nn.Module):
            raise SharpscopeError(
                f"model factory '{spec['factory']}' returned {type(model).__name__}, "
                "not an nn.Module"
            )
        problem = meta_problem(model)
        # torch.empty, not torch.get_default_device(), which in torch 2.4 to 2.7 at least
        # does not see a `with torch.device("meta"):` block around the call
        if problem is not None and torch.empty(0).device.type != "meta":
            raise SharpscopeError(f"model factory '{spec['factory']}': {problem}")
        return model
    name = spec["name"]
    if name not in MODELS:
        raise unknown_name("model", name, list(MODELS))
    options = {k: v for k, v in spec.items() if k != "name"}
    try:
        return MODELS[name](tuple(input_shape), int(num_classes), **options)
    except SharpscopeError:
        raise
    except Exception as exc:  # an option too large to build (width=1e20), or to hold
        given = ", ".join(f"{k}={v!r}" for k, v in options.items())
        built = f"building model '{name}'" + (f" with {given}" if given else "")
        if is_out_of_memory(exc):
            size = _parameter_count(MODELS[name], tuple(input_shape), int(num_classes), options)
            raise SharpscopeError(
                f"{built} ran out of memory{size}: the model itself does not fit; choose "
                "smaller model options"
            ) from exc
        if "overflow" in str(exc).lower():
            raise SharpscopeError(
                f"{built} failed: a tensor size overflows a 64-bit integer; choose smaller "
                "model options"
            ) from exc
        raise SharpscopeError(f"{built} failed: {type(exc).__name__}: {first_line(exc)}") from exc


def _parameter_count(
    factory: Callable[..., nn.Module],
    input_shape: tuple[int, ...],
    num_classes: int,
    options: Mapping[str, Any],
) -> str:
    """`` (N parameters, X GB in float32)`` for a model built on ``meta`` (no memory), or
    nothing when that fails too."""
    try:
        with torch.device("meta"):
            count = sum(
                p.numel() for p in factory(input_shape, num_classes, **options).parameters()
            )
    except Exception:  # noqa: BLE001 - only a size for the message
        return ""
    return f" ({count:,} parameters, {count * 4 / 1e9:,.1f} GB in float32)"


def _is_transformed(tensor: Tensor) -> bool:
    """Whether ``tensor`` is wrapped by a ``torch.func`` transform (vmap, grad, ...)."""
    try:
        from torch._C._functorch import is_functorch_wrapped_tensor
    except ImportError:  # pragma: no cover - an older or newer torch without it
        return True
    return bool(is_functorch_wrapped_tensor(tensor))


def _in_forward_mode() -> bool:
    """Whether a ``torch.func.jvp`` transform is active (forward-over-reverse products).

    >>> _in_forward_mode()
    False
    """
    try:
        from torch._C._functorch import TransformType, get_interpreter_stack
    except ImportError:  # pragma: no cover - an older or newer torch without it
        return False
    stack = get_interpreter_stack() or []
    return any(level.key() == TransformType.Jvp for level in stack)


def _mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error; integer targets are one-hot encoded to the output width.

    The one-hot code compares the targets with ``arange(C)`` rather than calling
    ``F.one_hot``, which reads the largest target with ``.item()`` and so fails under
    ``torch.func.vmap`` (the vectorized m-sharpness). Targets outside ``0..C-1`` are
    refused as ``F.one_hot`` refuses them: on the CPU, outside a ``torch.func``
    transform (where reading a value is not allowed; there they get all-zero rows).

    Outputs and targets must then have the same shape: ``F.mse_loss`` would broadcast
    an (N, 1) output against (N,) targets into the mean over all N² pairs, another
    objective. That pair, the usual ``nn.Linear(d, 1)`` regression, is read as (N,)
    against (N,); any other mismatch is refused (only shapes are read, so this holds
    under ``torch.func`` transforms too).

    Under forward-mode differentiation (the Hessian's forward-over-reverse products,
    ``jvp(grad(...))``) the same mean (1/n)·Σ_i (o_i − t_i)² is written as
    ``((outputs - targets) ** 2).mean()``: ``F.mse_loss`` has no working forward-over-
    reverse derivative in torch 2.13 ("ZeroTensors are immutable"), which left mse only
    the slower reverse mode. Elsewhere ``F.mse_loss`` runs (autocast computes it in
    float32); the two give the same value bit for bit on the CPU.

    >>> round(_mse(torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 4.0])).item(), 6)
    2.0
    """
    if targets.dtype in (torch.int64, torch.int32) and outputs.dim() == 2:
        num_classes = outputs.shape[1]
        if targets.device.type == "cpu" and not _is_transformed(targets) and targets.numel():
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= num_classes:
                raise ValueError(
                    f"mse: target class {low if low < 0 else high} is outside 0..{num_classes - 1} "
                    f"(the model has {num_classes} outputs)"
                )
        classes = torch.arange(num_classes, device=targets.device)
        targets = (targets.unsqueeze(-1) == classes).to(outputs.dtype)
    if outputs.shape != targets.shape:
        if (
            targets.is_floating_point()
            and targets.dim() == 1
            and outputs.shape == (targets.shape[0], 1)
        ):
            outputs = outputs.squeeze(1)
        else:
            raise SharpscopeError(
                f"mse: the outputs have shape {tuple(outputs.shape)} but the targets "
                f"{tuple(targets.shape)}; give targets of the outputs' shape (integer class "
                "labels are one-hot encoded, and an (N, 1) output with (N,) float targets "
                "is read as (N,))"
            )
    if _in_forward_mode():
        return ((outputs - targets.to(outputs.dtype)) ** 2).mean()
    return F.mse_loss(outputs, targets.to(outputs.dtype))


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(outputs, targets)


LOSSES: dict[str, LossFn] = {"cross_entropy": _cross_entropy, "mse": _mse}


class ScalarLoss:
    """A user's loss (from a factory) that refuses a non-scalar value in one line.

    Without it a loss returning one value per example ends in a traceback deep in
    ``torch.func.grad`` or ``backward``. Only the shape is checked, which reads no
    value: allowed under ``torch.func`` transforms, and no GPU synchronization.
    """

    def __init__(self, loss: LossFn, path: str) -> None:
        self.loss = loss
        self.path = path
        functools.update_wrapper(self, loss, updated=())  # type: ignore[arg-type]

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        value = self.loss(outputs, targets)
        problem = loss_value_problem(value, finite=False)
        if problem is not None:
            raise SharpscopeError(f"loss factory '{self.path}': {problem}")
        return value

    def __repr__(self) -> str:
        return f"ScalarLoss({self.path!r})"


#: examples the parameter-reading check runs the model on
LOSS_CHECK_EXAMPLES = 8


def check_loss_reads_outputs_only(
    loss_fn: LossFn,
    outputs: Tensor,
    targets: Tensor,
    parameters: Iterable[Tensor],
    analysis: str,
) -> None:
    """Refuse, in one line, a loss whose value depends on the model's ``parameters``.

    The analyses that differentiate or evaluate the loss at parameter values of their
    own (the Hessian operator and dense Hessian, m-sharpness, epsilon-sharpness, PAC-Bayes
    flatness) run the model through ``functional_call`` on those values
    and then call ``loss_fn(outputs, targets)``: a term that reads ``model.parameters()``
    inside the loss (an L2 regulariser (λ/2)·||θ||², a
    temperature held on the model) sees the model's own tensors instead, so it would be
    held fixed at the current weights: dropped from the Hessian and the gradient,
    silently. The test: ``loss_fn(outputs.detach(), targets)`` has a gradient with respect
    to one of ``parameters`` (a backward through the loss alone; a loss with learnable
    state of its own, not the model's, passes). A loss that fails here is left to the
    analysis's own checks, which name the cause.

    >>> net = nn.Linear(2, 2)
    >>> out, y = net(torch.ones(3, 2)), torch.tensor([0, 1, 0])
    >>> check_loss_reads_outputs_only(F.cross_entropy, out, y, net.parameters(), "the Hessian")
    >>> def regularised(o, t):
    ...     return F.cross_entropy(o, t) + 0.1 * net.weight.square().sum()
    >>> check_loss_reads_outputs_only(regularised, out, y, net.parameters(), "the Hessian")
    Traceback (most recent call last):
    ...
    sharpscope.errors.SharpscopeError: the loss reads the model's parameters (a regulariser \
over model.parameters(), say), which the Hessian does not follow: it runs the model on parameter \
values of its own and then calls loss(outputs, targets), so that term would stay fixed at the \
current weights; make the loss a function of the outputs and targets alone (an L2 term \
(wd/2)·||θ||² is weight_decay= of the Hessian functions)
    """
    watched = [p for p in parameters if isinstance(p, Tensor) and p.requires_grad]
    if not watched:
        return
    try:
        with torch.enable_grad():
            value = loss_fn(outputs.detach(), targets)
            if not isinstance(value, Tensor) or not value.requires_grad:
                return
            grads = torch.autograd.grad(value.sum(), watched, allow_unused=True)
    except Exception:  # noqa: BLE001 - the analysis's own checks name the failure
        return
    if any(g is not None for g in grads):
        raise SharpscopeError(
            "the loss reads the model's parameters (a regulariser over model.parameters(), "
            f"say), which {analysis} does not follow: it runs the model on parameter values "
            "of its own and then calls loss(outputs, targets), so that term would stay fixed "
            "at the current weights; make the loss a function of the outputs and targets "
            "alone (an L2 term (wd/2)·||θ||² is weight_decay= of the Hessian functions)"
        )


#: relative rounding allowed in the summed-loss test (float32 sums of a few terms)
_SUM_TOLERANCE = 1e-4


def warn_if_loss_sums(loss_fn: LossFn, outputs: Tensor, targets: Tensor, analysis: str) -> None:
    """Warn, in one line, when ``loss_fn`` sums over the examples instead of averaging.

    The analyses take the mean loss L(θ) = (1/N) Σᵢ ℓ(f_θ(xᵢ), yᵢ) (analysis.md,
    *Objective*); a loss made with ``reduction="sum"`` scales every result by the batch
    size, and with several batches the result depends on how the data is split. The test
    splits ``outputs`` (no model pass) into halves A and B of n_A and n_B examples: a mean
    satisfies ℓ(A∪B) = (n_A ℓ(A) + n_B ℓ(B)) / n, a sum ℓ(A∪B) = ℓ(A) + ℓ(B). It warns only
    when the sum identity holds to rounding and the mean identity does not, so a loss that
    is neither (contrastive, batch statistics) passes silently.

    >>> out, y = torch.randn(8, 3), torch.arange(8) % 3
    >>> warn_if_loss_sums(F.cross_entropy, out, y, "the Hessian")  # a mean: silent
    >>> import warnings
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     warn_if_loss_sums(nn.CrossEntropyLoss(reduction="sum"), out, y, "the Hessian")
    >>> print(caught[0].message)  # doctest: +ELLIPSIS
    the loss sums over the examples instead of averaging them (reduction='sum'?): ...
    """
    if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor):
        return  # a model returning a tuple, say: named by the analysis's own checks
    n = outputs.shape[0] if outputs.dim() > 0 else 0
    if n < 2 or targets.shape[:1] != (n,):
        return
    outputs = outputs.detach()
    half = n // 2
    try:
        with torch.no_grad():
            values = [
                loss_fn(outputs[part], targets[part]).detach()
                for part in (slice(None), slice(None, half), slice(half, None))
            ]
        whole, first, second = (float(v.double()) for v in values)
    except Exception:  # noqa: BLE001 - not a scalar per call: the analysis's checks name it
        return
    scale = max(abs(whole), abs(first), abs(second))
    if not math.isfinite(scale) or scale == 0:
        return
    mean = (half * first + (n - half) * second) / n
    summed = first + second
    if abs(whole - summed) <= _SUM_TOLERANCE * scale < abs(whole - mean):
        warnings.warn(
            "the loss sums over the examples instead of averaging them (reduction='sum'?): "
            f"{analysis} takes the mean loss (1/N) Σ ℓ, so a summed loss scales it by the "
            "batch size, and with several batches by how the data is split; use "
            "reduction='mean'",
            RuntimeWarning,
            stacklevel=caller_level(),
        )


def check_loss_on_outputs(
    loss_fn: LossFn, outputs: Tensor, targets: Tensor, parameters: Iterable[Tensor], analysis: str
) -> None:
    """The pre-flight checks of a loss on a few of the model's ``outputs``: it must not read
    the model's ``parameters`` (:func:`check_loss_reads_outputs_only`) and should average
    over the examples (:func:`warn_if_loss_sums`)."""
    check_loss_reads_outputs_only(loss_fn, outputs, targets, parameters, analysis)
    warn_if_loss_sums(loss_fn, outputs, targets, analysis)


def check_model_loss(
    loss_fn: LossFn, model: nn.Module, inputs: Tensor, targets: Tensor, analysis: str
) -> None:
    """:func:`check_loss_on_outputs` on the outputs of ``model`` (in eval mode,
    without gradients, modes restored) for the first :data:`LOSS_CHECK_EXAMPLES` of
    ``inputs``; a model that fails here is left to the analysis's own checks."""
    from .modes import eval_mode

    if any(nn.parameter.is_lazy(p) for p in model.parameters()):
        return  # a forward would initialize the user's lazy modules; refused elsewhere
    try:
        with torch.no_grad(), eval_mode(model):
            outputs = model(inputs[:LOSS_CHECK_EXAMPLES])
    except Exception:  # noqa: BLE001 - reported by the analysis, with its context
        return
    if isinstance(outputs, Tensor):
        check_loss_on_outputs(
            loss_fn, outputs, targets[:LOSS_CHECK_EXAMPLES], model.parameters(), analysis
        )


def loss_name(loss: Any) -> str:
    """A printable name for a loss spec (recorded in results).

    >>> loss_name("mse"), loss_name({"name": "cross_entropy"})
    ('mse', 'cross_entropy')
    """
    if isinstance(loss, str):
        return loss
    if isinstance(loss, Mapping):
        return str(loss.get("name") or loss.get("factory"))
    return getattr(loss, "__name__", type(loss).__name__)


def get_loss(spec: str | Mapping[str, Any] | LossFn | None = "cross_entropy") -> LossFn:
    """The loss named by ``spec``: a built-in name, a factory path or a callable.

    Built-ins: ``cross_entropy`` (default) and ``mse``. A ``module:function`` factory
    returns a callable ``loss(outputs, targets) -> scalar mean``.

    >>> get_loss("mse")(torch.zeros(2, 3), torch.tensor([0, 1])).item()
    0.3333333432674408
    """
    if spec is None:
        spec = "cross_entropy"
    if callable(spec) and not isinstance(spec, (str, Mapping)):
        return spec
    spec = normalize_spec(spec, "loss")
    if "factory" in spec:
        path = spec["factory"]
        options = {k: v for k, v in spec.items() if k != "factory"}
        try:
            factory = resolve_factory(path, "loss")
            with calling_user_code(f"loss factory '{path}'", EXIT_HINT):
                loss = factory(**options)
        except SharpscopeError:
            raise
        except Exception as exc:
            raise SharpscopeError(
                f"loss factory '{path}' failed: {type(exc).__name__}: {first_line(exc)}"
            ) from exc
        if not callable(loss):
            raise SharpscopeError(
                f"loss factory '{path}' returned {type(loss).__name__}, not a callable "
                "loss(outputs, targets) -> scalar mean"
            )
        return ScalarLoss(loss, path)
    if spec["name"] not in LOSSES:
        raise unknown_name("loss", spec["name"], list(LOSSES))
    return LOSSES[spec["name"]]
