"""bSAM: Bayesian SAM (Moellenhoff & Khan, ICLR 2023, arXiv:2210.01620).

A standalone Adam-like optimizer for a diagonal Gaussian posterior
``q = N(m, diag(sigma^2))``, ``sigma^2 = 1 / (N s)``, derived from a relaxation of the
Bayes objective. ``m`` lives in the model parameters; the optimizer state holds ``gbar``
(momentum, initialised to 0), ``s`` (initialised to ``s_init``) and its noise generator.
One step (reference order, batch split into M equal chunks ``B_j``)::

    for j = 1..M:                           # fresh noise per chunk and step
        theta_j = m + xi_j / sqrt(N s),  xi_j ~ N(0, I)
        g_j     = grad L_{B_j}(theta_j)      # pass 1, at the noisy sample
        eps_j   = rho g_j / s                # preconditioned, NOT normalised
        ge_j    = grad L_{B_j}(m + eps_j)    # pass 2
        h_j     = sqrt(s) |g_j|
    ge, h = means over j (weighted by chunk size)
    gbar <- beta1 gbar + (1 - beta1)(ge + delta~ m)      delta~ = delta / N
    m    <- m - alpha gbar / s                           (s before its update, no bias correction)
    s    <- beta2 s + (1 - beta2)(h + delta~ + gamma)

``N = num_data * data_aug_factor``, ``delta = prior_precision`` (the reference's 40 for
CIFAR-10 ResNet-18; the paper appendix's 10 is a typo, bayesian-sam #2), ``gamma =
damping``. sharpscope defaults: ``lr=0.5, betas=(0.9, 0.999), rho=0.01,
prior_precision=40, damping=0.1, s_init=1.0, splits=1`` (the reference's CIFAR-10 values).

The update of ``m, gbar, s`` is a ``torch.optim.Optimizer`` of its own (the "base" of the
shared machinery), so LR schedulers move ``alpha`` and ``state_dict()["base"]`` carries
``gbar`` and ``s``; ``state_dict()["rng"]`` carries the noise generator. Without ``s``
there is no uncertainty (bayesian-sam #3).

BN: ``bn_policy="first"`` (default) lets only the noisy pass update running statistics;
``"both"`` reproduces the reference. With ``splits > 1`` the closure is called per chunk
(``closure(j, M)``, e.g. a :class:`~sharpscope.optim.closure.BatchClosure`), so BN batch
statistics are per chunk as in the reference; the chunks run one after the other.
DDP: each rank draws its own noise (the generator is seeded ``seed + rank``), ``ge`` is
all-reduced by DDP in pass 2 and ``h`` by hand, so ``s`` stays identical on all ranks.

Prediction: :meth:`BSAM.predict` returns the Bayesian model average
``p(y|x) = 1/S sum_k softmax(f(x; theta_k))`` over ``S`` samples (reference S = 32),
computed in log space (log-mean-exp of the log-softmaxes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..distributed import is_multi_process
from ..errors import SharpscopeError
from ._base import (
    PerturbationMode,
    SharpnessAware,
    StepContext,
    as_number,
    finite_number,
    rng_restore,
    rng_snapshot,
    two_betas,
)

__all__ = ["BSAM"]


class _BayesUpdate(torch.optim.Optimizer):
    """The ``gbar, m, s`` update of bSAM; the gradient ``ge`` is in ``.grad``, ``h`` in ``pending_h``."""

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        prior_precision: float = 40.0,
        damping: float = 0.1,
        s_init: float = 1.0,
        num_data: float = 1.0,
    ) -> None:
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "prior_precision": prior_precision,
            "damping": damping,
            "s_init": s_init,
            "num_data": num_data,
        }
        self.pending_h: dict[int, Tensor] | None = None
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("pending_h", None)  # torch's __getstate__ leaves it out

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            self.init_state(p, group)

    def init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = self.state[p]
        if "s" not in state:
            state["s"] = torch.full_like(
                p, float(group["s_init"]), memory_format=torch.preserve_format
            )
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        pending = self.pending_h
        if pending is None:
            raise SharpscopeError(
                "the bSAM update runs inside BSAM.step(closure); call that instead"
            )
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr = float(group["lr"])
            delta = float(group["prior_precision"]) / float(group["num_data"])
            params = [p for p in group["params"] if p.grad is not None and id(p) in pending]
            if not params:
                continue
            states = [self.init_state(p, group) for p in params]
            gbar = [st["exp_avg"] for st in states]
            s = [st["s"] for st in states]
            # gbar <- beta1 gbar + (1 - beta1)(ge + delta~ m)
            target = torch._foreach_add([p.grad for p in params], params, alpha=delta)
            torch._foreach_mul_(gbar, beta1)
            torch._foreach_add_(gbar, target, alpha=1.0 - beta1)
            # m <- m - alpha gbar / s   (s before its update)
            torch._foreach_addcdiv_(params, gbar, s, value=-lr)
            # s <- beta2 s + (1 - beta2)(h + delta~ + gamma)
            torch._foreach_mul_(s, beta2)
            torch._foreach_add_(s, [pending[id(p)] for p in params], alpha=1.0 - beta2)
            torch._foreach_add_(s, (1.0 - beta2) * (delta + float(group["damping"])))
        self.pending_h = None


class BSAM(SharpnessAware):
    """Bayesian SAM with a diagonal Gaussian posterior; see the module docstring.

    Args:
        params: parameters, parameter groups, or the model.
        num_data: number of training examples (required; ``N = num_data * data_aug_factor``).
        lr: alpha, step size of the mean; default 0.5.
        betas: (beta1, beta2) of ``gbar`` and ``s``; default (0.9, 0.999).
        rho: perturbation scale (in units of the preconditioner ``1/s``); default 0.01.
        prior_precision: delta; default 40.
        damping: gamma added to ``s``; default 0.1.
        s_init: initial ``s``; default 1.0.
        splits: M, chunks per batch; default 1.
        data_aug_factor: multiplier of ``num_data`` (reference uses 4 with augmentation).
        seed: seed of the noise generator (``+ rank`` under DDP).
        **kwargs: shared options (``bn_policy``, ``same_noise``, ``perturbation``,
            ``max_grad_norm``, ``model``, ``scaler``).

    Raises:
        SharpscopeError: on a non-positive ``num_data``/``s_init``/``splits`` or betas
            outside [0, 1).
    """

    name: ClassVar[str] = "bsam"
    supports_m: ClassVar[bool] = False
    default_perturbation: ClassVar[PerturbationMode] = "local"

    def __init__(
        self,
        params: Iterable[Any] | nn.Module,
        *,
        num_data: int | None = None,
        lr: float = 0.5,
        betas: tuple[float, float] = (0.9, 0.999),
        rho: float = 0.01,
        prior_precision: float = 40.0,
        damping: float = 0.1,
        s_init: float = 1.0,
        splits: int = 1,
        data_aug_factor: float = 1.0,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        if "base" in kwargs:
            raise SharpscopeError("bSAM is a standalone optimizer; it takes no base=")
        if num_data is None or not as_number("num_data", num_data) > 0:
            raise SharpscopeError(f"bSAM needs num_data > 0 (training set size), got {num_data!r}")
        finite_number("data_aug_factor", data_aug_factor, positive=True)
        if isinstance(splits, bool) or as_number("splits", splits) != int(splits) or splits < 1:
            raise SharpscopeError(f"splits must be a positive integer, got {splits!r}")
        finite_number("s_init", s_init, positive=True)
        betas = two_betas(betas)
        for name, value in (("prior_precision", prior_precision), ("damping", damping), ("lr", lr)):
            finite_number(name, value)
        super().__init__(
            params,
            _BayesUpdate,
            rho=rho,
            lr=float(lr),
            betas=betas,
            prior_precision=float(prior_precision),
            damping=float(damping),
            s_init=float(s_init),
            num_data=float(num_data) * float(data_aug_factor),
            **kwargs,
        )
        self.splits = int(splits)
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.seed = int(seed)
        self.generator = torch.Generator(device=self._device())
        self.generator.manual_seed(self.seed + rank)

    # ------------------------------------------------------------------ posterior

    def _trainable(self) -> list[Tensor]:
        return [p for p in self._all_params() if p.requires_grad]

    def _group_scalars(self) -> list[tuple[list[Tensor], float]]:
        return [
            ([p for p in g["params"] if p.requires_grad], float(g["num_data"]))
            for g in self.param_groups
        ]

    def _states(self, params: list[Tensor]) -> list[dict[str, Tensor]]:
        group_of = {id(p): g for g in self.param_groups for p in g["params"]}
        return [self.base.init_state(p, group_of[id(p)]) for p in params]

    def posterior_std(self) -> list[Tensor]:
        """``sigma = 1 / sqrt(N s)`` for each parameter with a state (order of
        ``param_groups``): frozen parameters (``requires_grad=False``) have none and are
        left out, so pair it with ``[p for p in model.parameters() if p.requires_grad]``."""
        out = []
        for params, n in self._group_scalars():
            s = [st["s"] for st in self._states(params)]
            if s:
                # rsqrt_ per tensor: torch._foreach_rsqrt exists only from torch 2.6 on
                out.extend(t.rsqrt_() for t in torch._foreach_mul(s, n))
        return out

    def _noise(self, params: list[Tensor], generator: torch.Generator | None) -> list[Tensor]:
        total = sum(p.numel() for p in params)
        dtype = params[0].dtype
        flat = torch.randn(total, generator=generator, device=params[0].device, dtype=dtype)
        return [
            x.view_as(p) if x.dtype == p.dtype else x.view_as(p).to(p.dtype)
            for x, p in zip(flat.split([p.numel() for p in params]), params)
        ]

    @contextmanager
    def sample(self, generator: torch.Generator | None = None) -> Iterator[None]:
        """Swap ``theta = m + xi / sqrt(N s)`` into the parameters for the body.

        Args:
            generator: draws ``xi``; ``None`` uses the global RNG.

        The mean ``m`` is copied back afterwards (bit-identical).
        """
        params = self._trainable()
        with torch.no_grad():
            mean = [p.detach().clone() for p in params]
            torch._foreach_addcmul_(params, self._noise(params, generator), self.posterior_std())
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, mean)

    @torch.no_grad()
    def predict(
        self,
        model: nn.Module,
        inputs: Tensor,
        num_samples: int = 32,
        generator: torch.Generator | None = None,
        *,
        batch_size: int | None = None,
        log: bool = False,
    ) -> Tensor:
        """Bayesian model average of the softmaxes over ``num_samples`` posterior samples.

        Args:
            model: the network whose parameters this optimizer holds (``m``).
            inputs: a tensor of inputs, first dimension indexing examples.
            num_samples: S; default 32 (reference evaluation).
            generator: draws the samples; ``None`` uses a fresh generator seeded 0, so
                evaluation is reproducible and leaves training noise and the global RNG alone.
            batch_size: evaluate the inputs in batches of this size (default: all at once).
            log: return ``log p`` (log-mean-exp of the log-softmaxes, exact in log space).

        Returns:
            ``(N, C)`` probabilities (or log probabilities), float32. The model runs in
            eval mode (training BN running statistics, as the reference) and is returned
            to its previous mode.
        """
        if int(num_samples) < 1:
            raise SharpscopeError(f"num_samples must be >= 1, got {num_samples!r}")
        if generator is None:
            generator = torch.Generator(device=self._device()).manual_seed(0)
        was_training = model.training
        model.eval()
        try:
            total: Tensor | None = None
            for _ in range(int(num_samples)):
                with self.sample(generator):
                    chunks = [inputs] if batch_size is None else list(inputs.split(batch_size))
                    logp = torch.cat([torch.log_softmax(model(x).float(), dim=-1) for x in chunks])
                total = logp if total is None else torch.logaddexp(total, logp)
        finally:
            model.train(was_training)
        assert total is not None
        out = total - math.log(int(num_samples))
        return out if log else out.exp()

    # ------------------------------------------------------------------ the step

    def perturbation(self, params: list[Tensor], grads: list[Tensor]) -> list[Tensor | None]:
        """``eps = rho g / s``, preconditioned by the precision ``s``, not normalised."""
        s = [st["s"] for st in self._states(params)]
        eps = torch._foreach_div(grads, s)
        torch._foreach_mul_(eps, self.rho)
        return list(eps)

    def _skip_second_pass(self) -> bool:
        return False

    def _two_pass_step(self, ctx: StepContext) -> Tensor:
        params = self._trainable()
        states = self._states(params)
        s = [st["s"] for st in states]
        sigma = self.posterior_std()
        sqrt_s = torch._foreach_sqrt(s)
        num_chunks = self.splits
        if num_chunks > 1:
            sizes = ctx.batch.chunk_sizes(num_chunks) if ctx.batch is not None else [1] * num_chunks
            weights = [n / sum(sizes) for n in sizes]
        else:
            weights = [1.0]
        with torch.no_grad():
            mean = self._backup(params)
        h_sum: list[Tensor] | None = None
        ge_sum: list[Tensor] | None = None
        total_loss: Tensor | None = None
        try:
            for j, weight in enumerate(weights):
                chunk = (j, num_chunks) if num_chunks > 1 else (None, None)
                with torch.no_grad():
                    if j > 0:
                        torch._foreach_copy_(params, mean)
                    torch._foreach_addcmul_(params, self._noise(params, self.generator), sigma)
                rng = rng_snapshot(ctx.device) if self.same_noise else None
                with ctx.local_sync():
                    loss = ctx.call(*chunk)
                self._require_gradients(params)  # unused parameters alone are zero-filled
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                if not ctx.unscale_(grads):
                    with torch.no_grad():
                        torch._foreach_copy_(params, mean)
                    self.base.pending_h = {}
                    self._finish(ctx)
                    self.base.pending_h = None
                    return loss
                with torch.no_grad():
                    h = torch._foreach_abs(grads)
                    torch._foreach_mul_(h, sqrt_s)
                    if h_sum is None:
                        h_sum = list(h)
                        if weight != 1.0:
                            torch._foreach_mul_(h_sum, weight)
                    else:
                        torch._foreach_add_(h_sum, h, alpha=weight)
                    eps = self.perturbation(params, grads)
                    torch._foreach_copy_(params, mean)
                    torch._foreach_add_(params, eps)
                with self._second_pass_bn(ctx):
                    if rng is not None:
                        rng_restore(rng, ctx.device)
                    ctx.call(*chunk)
                ge = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                with torch.no_grad():
                    if num_chunks == 1:
                        ge_sum = ge
                    elif ge_sum is None:
                        ge_sum = list(torch._foreach_mul(ge, weight))
                    else:
                        torch._foreach_add_(ge_sum, ge, alpha=weight)
                total_loss = loss * weight if total_loss is None else total_loss + loss * weight
        finally:
            with torch.no_grad():
                torch._foreach_copy_(params, mean)
        assert h_sum is not None and ge_sum is not None and total_loss is not None
        for p, g in zip(params, ge_sum):
            p.grad = g
        if ctx.ddp is not None and self.perturbation_mode == "local" and is_multi_process():
            flat = torch.cat([t.reshape(-1) for t in h_sum])
            dist.all_reduce(flat)
            flat /= dist.get_world_size()
            h_sum = [t.view_as(p) for t, p in zip(flat.split([p.numel() for p in params]), params)]
        self.base.pending_h = {id(p): h for p, h in zip(params, h_sum)}
        try:
            self._finish(ctx)
        finally:
            self.base.pending_h = None
        return total_loss

    # ------------------------------------------------------------------ state

    def _rng_state(self) -> Tensor:
        return self.generator.get_state()

    def rank_state(self) -> dict[str, Any]:
        """Each rank draws its own noise (``seed + rank``): its generator state."""
        return {"rng": self._rng_state()}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self._load_rng_state(state.get("rng"))

    def derive_rank_state(self, rank: int) -> None:
        """A noise stream of this rank's own, seeded from the loaded (rank 0's) stream:
        ``s + rank`` with ``s`` its next 62-bit draw, the same on every rank."""
        loaded = torch.Generator(device=self.generator.device)
        loaded.set_state(self.generator.get_state())
        draw = torch.randint(2**62, (1,), generator=loaded, device=self.generator.device)
        self.generator.manual_seed(int(draw) + rank)

    def _check_rng_state(self, state: Tensor | None) -> None:
        if state is None:
            raise SharpscopeError(
                "the checkpoint has no bSAM generator state; cannot resume exactly"
            )
        expected = self.generator.get_state().numel()
        if not isinstance(state, Tensor) or state.numel() != expected:
            size = f"{state.numel()} bytes" if isinstance(state, Tensor) else type(state).__name__
            raise SharpscopeError(
                f"the checkpoint's bSAM generator state ({size}) does not fit this device's "
                f"generator ({expected} bytes); load it on the same kind of device"
            )

    def _load_rng_state(self, state: Tensor | None) -> None:
        self._check_rng_state(state)
        self.generator.set_state(state.to(torch.uint8).cpu())
